"""One phase at a time, half precision on the CPU, and memory profiles, on the tiny Kolors (real DiffSynth)."""

from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import kstory  # noqa: F401  (before anything that imports torchvision/diffsynth)
import lightning as pl
import pytest
import torch

import kstory.core.models.pipeline as pipeline_module
import kstory.story as story
from kstory.core.errors import KstoryError
from kstory.core.memory import KOLORS_COUNTS, plan_memory
from kstory.core.models import resolve_model
from tests.test_story_generate import write_spec
from tests.test_train import FAST, make_dataset
from kstory.train import TrainSettings, train_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LoadWatch:
    """Wraps kstory's model loading: keeps a weak reference to every ChatGLM loaded and checks,
    each time a UNet is about to load, that none of them is still alive."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.parts: list[tuple[str, ...]] = []
        self.encoders: list[weakref.ref] = []
        self.alive_at_unet: list[int] = []
        real = pipeline_module.load_kolors_model_manager

        def watched(weights, device="cpu", torch_dtype=torch.float32, parts=pipeline_module.PARTS, unet_quant="none"):
            self.parts.append(tuple(parts))
            if "unet" in parts:
                gc.collect()
                self.alive_at_unet.append(sum(ref() is not None for ref in self.encoders))
            manager = real(weights, device, torch_dtype, parts, unet_quant)
            if "kolors_text_encoder" in manager.model_name:
                self.encoders.append(weakref.ref(manager.fetch_model("kolors_text_encoder")))
            return manager

        monkeypatch.setattr(pipeline_module, "load_kolors_model_manager", watched)
        import kstory.core.models

        monkeypatch.setattr(kstory.core.models, "load_kolors_model_manager", watched)


def test_training_frees_chatglm_before_the_unet_loads_and_skips_it_when_cached(tmp_path: Path, monkeypatch):
    data = make_dataset(tmp_path / "data")
    watch = LoadWatch(monkeypatch)
    train_lora(data, tmp_path / "a", TrainSettings(**FAST, max_steps=1), cache_dir=tmp_path / "cache")
    assert watch.parts == [("text_encoder", "vae"), ("unet",)]
    assert len(watch.encoders) == 1 and watch.alive_at_unet == [0]  # gone before the UNet loaded
    watch.parts.clear()
    train_lora(data, tmp_path / "b", TrainSettings(**FAST, max_steps=1), cache_dir=tmp_path / "cache")
    assert watch.parts == [("unet",)]  # warm cache: neither ChatGLM nor the VAE encoder is loaded


def test_story_frees_chatglm_before_the_unet_loads_for_runs_and_rerolls(tmp_path: Path, monkeypatch):
    spec = write_spec(tmp_path / "s.yaml", [{"prompt": "x", "seed": 1}, {"prompt": "y", "seed": 2}],
                      generation={"batch_size": 2})
    watch = LoadWatch(monkeypatch)
    result = story.generate_story(spec, tmp_path / "out", model="tiny")
    assert watch.parts == [("text_encoder",), ("unet", "vae")] and watch.alive_at_unet == [0]
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["memory"]["profile"] == "none" and manifest["memory"]["requested"] == "auto"
    watch.parts.clear()
    story.reroll(tmp_path / "out", 2, prompt="z")
    assert watch.parts == [("text_encoder",), ("unet", "vae")] and watch.alive_at_unet == [0, 0]


def test_bf16_training_on_the_cpu_keeps_lora_and_optimizer_in_float32(tmp_path: Path):
    seen = {}

    class Inspect(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            unet = module.unet
            frozen = {p.dtype for p in unet.parameters() if not p.requires_grad}
            trainable = {p.dtype for p in unet.parameters() if p.requires_grad}
            state = {t.dtype for s in trainer.optimizers[0].state.values() for k, t in s.items() if k != "step"}
            seen.update(frozen=frozen, trainable=trainable, state=state)

    data = make_dataset(tmp_path / "data")
    result = train_lora(data, tmp_path / "out", TrainSettings(**{**FAST, "mixed_precision": "bf16"}, max_steps=2),
                        cache_dir=tmp_path / "cache", callbacks=[Inspect()])
    assert seen == {"frozen": {torch.bfloat16}, "trainable": {torch.float32}, "state": {torch.float32}}
    assert result.final_loss is not None and torch.isfinite(torch.tensor(result.final_loss))
    summary = json.loads((tmp_path / "out" / "train.json").read_text())
    assert summary["precision"] == "bf16" and summary["memory"]["profile"] in ("none", "cpu")
    assert "-bfloat16" in summary["cache"]


def test_cpu_profile_generates_bf16_frames_tiled_and_deterministic(tmp_path: Path):
    spec = write_spec(tmp_path / "s.yaml", [{"prompt": "x", "seed": 1}, {"prompt": "y", "seed": 2}])
    first = story.generate_story(spec, tmp_path / "a", model="tiny", memory="cpu")
    again = story.generate_story(spec, tmp_path / "b", model="tiny", memory="cpu")
    default = story.generate_story(spec, tmp_path / "c", model="tiny")
    manifest = json.loads(first.manifest_path.read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["vae_decode"] == "tiled" and manifest["batch_size"] == 1
    assert manifest["memory"]["profile"] == "cpu"
    assert first.frame_hashes == again.frame_hashes and first.frame_hashes != default.frame_hashes
    assert manifest["setup_id"] != json.loads(default.manifest_path.read_text())["setup_id"]


def test_float32_on_the_cpu_that_cannot_fit_is_refused_naming_the_profile_that_fits():
    """Weights sized so float32 needs 1.4x the available RAM and bf16 about 0.7x: none is refused, auto picks cpu."""
    from kstory.core.memory import _TABLE, estimate, free_memory

    available = free_memory("cpu")
    weights_only = estimate(KOLORS_COUNTS, _TABLE["none"], task="train").peak
    counts = {part: int(n * 1.4 * available / weights_only) for part, n in KOLORS_COUNTS.items()}
    with pytest.raises(KstoryError, match="memory profile none cannot fit this train: it needs about") as error:
        plan_memory("none", counts, task="train", device="cpu")
    assert "memory: cpu" in error.value.fix
    auto = plan_memory("auto", counts, task="train", device="cpu")
    assert auto.profile == "cpu" and auto.half and "float32 would need" in auto.reason


def test_profiles_are_checked_against_the_device_and_the_request():
    with pytest.raises(KstoryError, match="for a CUDA GPU"):
        plan_memory("16gb", KOLORS_COUNTS, task="story", device="cpu")
    with pytest.raises(KstoryError, match="unknown memory profile"):
        plan_memory("4gb", KOLORS_COUNTS, task="story", device="cpu")
    huge = {part: n * 100 for part, n in KOLORS_COUNTS.items()}
    with pytest.raises(KstoryError, match="memory profile cpu cannot fit") as error:
        plan_memory("cpu", huge, task="train", device="cpu")
    assert "more memory" in error.value.fix
    tiny = plan_memory("auto", resolve_model("tiny"), task="story", device="cpu")
    assert tiny.profile == "none" and not tiny.half and "float32 needs" in tiny.reason
    assert plan_memory("auto", resolve_model("tiny"), task="train", device="cpu",
                       text_encoder_device="cpu").text_encoder_device == "cpu"


def test_weights_converted_tensor_by_tensor_load_through_diffsynths_own_detectors(tmp_path: Path):
    """A full-size SDXL VAE (real widths, random fp16 weights; the UNet's detector works the same way) is
    found by DiffSynth's detector from the already-converted state dict: same networks and values as
    DiffSynth's own ``load_model``."""
    from dataclasses import replace

    from diffsynth.models.model_manager import ModelManager
    from safetensors.torch import save_file

    from kstory.core.models.pipeline import _load_converted
    from kstory.core.models.tiny import TinyKolorsSpec, _materialise, tiny_vae_decoder, tiny_vae_encoder, vae_to_diffusers

    spec = replace(TinyKolorsSpec(), vae_channels=(128, 256, 512, 512))
    with torch.device("meta"):
        encoder, encoder_prefixes = tiny_vae_encoder(spec)
        decoder, decoder_prefixes = tiny_vae_decoder(spec)
    _materialise(encoder, 0, "vae_encoder")
    _materialise(decoder, 0, "vae_decoder")
    half = lambda module: {k: v.half().contiguous() for k, v in module.state_dict().items()}  # noqa: E731
    path = tmp_path / "vae.safetensors"
    save_file(vae_to_diffusers(half(encoder), encoder_prefixes, half(decoder), decoder_prefixes), str(path))
    del encoder, decoder
    ours, theirs = ModelManager(torch_dtype=torch.float32, device="cpu"), ModelManager(torch_dtype=torch.float32, device="cpu")
    _load_converted(ours, str(path), torch.float32)  # each fp16 tensor widened as it is read
    theirs.load_model(str(path))  # DiffSynth: the whole file in fp16, the built model converted
    assert ours.model_name == theirs.model_name == ["sdxl_vae_encoder", "sdxl_vae_decoder"]
    for a, b in zip(ours.model, theirs.model):
        assert a.state_dict().keys() == b.state_dict().keys()
        for name, x in a.state_dict().items():
            assert x.dtype == torch.float32 and torch.equal(x, b.state_dict()[name]), name


def test_integer_text_encoder_weights_have_a_bounded_error_and_their_own_records(tmp_path: Path):
    """int8/int4 ChatGLM (torchao): embeddings close to half precision; frames deterministic and recorded apart."""
    import contextlib
    import io

    from diffsynth.prompters import KolorsPrompter

    from kstory.core.models import load_kolors_model_manager
    from kstory.core.models.quantize import quantize_text_encoder
    from kstory.story.generate import recorded_memory
    from kstory.train.runtime import Runtime

    weights = resolve_model("tiny")

    def embedding(mode: str) -> torch.Tensor:
        manager = load_kolors_model_manager(weights, device="cpu", torch_dtype=torch.bfloat16, parts=("text_encoder",))
        prompter = KolorsPrompter()
        with contextlib.redirect_stdout(io.StringIO()):
            prompter.fetch_models(manager.fetch_model("kolors_text_encoder"))
        quantize_text_encoder(prompter.text_encoder, mode)
        with torch.no_grad():
            return prompter.encode_prompt("a fox in the snow", clip_skip=1, clip_skip_2=2, device="cpu")[1].float()

    half, int8, int4 = embedding("none"), embedding("int8"), embedding("int4")
    cosine = lambda a, b: torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()  # noqa: E731
    assert not torch.equal(half, int8) and cosine(half, int8) > 0.999 and cosine(half, int4) > 0.95

    spec = write_spec(tmp_path / "s.yaml", [{"prompt": "x", "seed": 1}, {"prompt": "y", "seed": 2}])
    first = story.generate_story(spec, tmp_path / "a", model="tiny", memory="cpu", text_encoder_quant="int8")
    again = story.generate_story(spec, tmp_path / "b", model="tiny", memory="cpu", text_encoder_quant="int8")
    plain = story.generate_story(spec, tmp_path / "c", model="tiny", memory="cpu")
    manifest = json.loads(first.manifest_path.read_text())
    assert manifest["memory"]["text_encoder_quant"] == "int8" and manifest["text_encoder_quant"] == "int8"
    assert recorded_memory(manifest).text_encoder_quant == "int8"  # what verify and re-rolls load
    assert first.frame_hashes == again.frame_hashes and first.frame_hashes != plain.frame_hashes
    assert manifest["setup_id"] != json.loads(plain.manifest_path.read_text())["setup_id"]
    cpu = torch.device("cpu")
    assert Runtime("cpu", "bf16", torch.bfloat16, cpu, text_quant="int8").cache_tag == "-text-int8"
    with pytest.raises(KstoryError, match="unknown text_encoder_quant"):
        plan_memory("cpu", KOLORS_COUNTS, task="story", device="cpu", text_encoder_quant="int3")


def test_chatglm_streamed_block_by_block_gives_the_whole_models_numbers(tmp_path: Path, monkeypatch):
    """The cpu profile reads ChatGLM one block at a time: same embeddings in every published layout, same frames
    and the same caption cache as the whole model, and the whole model is never loaded."""
    import contextlib
    import io

    from diffsynth.prompters import KolorsPrompter
    from safetensors.torch import load_file

    import kstory.core.memory as memory_module
    from kstory.core.models import load_kolors_model_manager
    from kstory.core.models.streamed_text_encoder import StreamedChatGLM
    from kstory.core.models.tiny import TinyKolorsSpec, build_tiny_kolors

    prompts = [("a fox in the snow, watercolour", True), ("blurry, low quality", False)]
    for layout in ("single", "official", "diffusers"):
        weights = resolve_model(str(build_tiny_kolors(tmp_path / layout, TinyKolorsSpec(), layout=layout)))
        manager = load_kolors_model_manager(weights, device="cpu", torch_dtype=torch.bfloat16, parts=("text_encoder",))
        prompter = KolorsPrompter()
        with contextlib.redirect_stdout(io.StringIO()):
            prompter.fetch_models(manager.fetch_model("kolors_text_encoder"))
        with torch.no_grad():
            whole = [prompter.encode_prompt(p, clip_skip=1, clip_skip_2=2, device="cpu", positive=pos) for p, pos in prompts]
        streamed = StreamedChatGLM(weights.text_encoder, device="cpu", dtype=torch.bfloat16).encode(prompts)
        for (pooled, emb), (s_pooled, s_emb) in zip(whole, streamed):
            assert torch.equal(pooled, s_pooled) and torch.equal(emb, s_emb), layout

    spec = write_spec(tmp_path / "s.yaml", [{"prompt": "x", "seed": 1}, {"prompt": "y", "seed": 2}])
    data = make_dataset(tmp_path / "data")
    settings = TrainSettings(**{**FAST, "mixed_precision": "bf16"}, max_steps=1)
    watch = LoadWatch(monkeypatch)
    streamed_story = story.generate_story(spec, tmp_path / "streamed", model="tiny", memory="cpu")
    train_lora(data, tmp_path / "lora-streamed", settings, cache_dir=tmp_path / "cache-streamed", memory="cpu")
    assert all("text_encoder" not in parts for parts in watch.parts)  # never the whole ChatGLM
    manifest = json.loads(streamed_story.manifest_path.read_text())
    assert manifest["memory"]["text_encoder_streamed"] is True

    monkeypatch.setitem(memory_module._TABLE, "cpu", {**memory_module._TABLE["cpu"], "text_encoder_streamed": False})
    whole_story = story.generate_story(spec, tmp_path / "whole", model="tiny", memory="cpu")
    train_lora(data, tmp_path / "lora-whole", settings, cache_dir=tmp_path / "cache-whole", memory="cpu")
    assert ("text_encoder",) in watch.parts
    assert streamed_story.frame_hashes == whole_story.frame_hashes
    captions = sorted((tmp_path / "cache-streamed").rglob("text/*.safetensors"))
    assert captions
    for path in captions:
        twin = tmp_path / "cache-whole" / path.relative_to(tmp_path / "cache-streamed")
        a, b = load_file(str(path)), load_file(str(twin))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_profiles_holding_a_batchs_controlnets_count_the_most_one_frame_uses():
    """12gb, 8gb and cpu load a ControlNet only for the frames that use it (one frame per batch), so their
    estimate counts the frame that uses the most, where the others count every ControlNet the story names."""
    from kstory.core.memory import _row, estimate
    from kstory.story import build_tiny_controlnets

    nets = build_tiny_controlnets()
    pose, canny = nets["pose"], nets["canny"]
    one = estimate(KOLORS_COUNTS, _row("cpu"), task="story", controlnets=[pose]).work
    apart = estimate(KOLORS_COUNTS, _row("cpu"), task="story", controlnets=[pose, canny],
                     frame_controlnets=[[pose], [canny], []]).work
    together = estimate(KOLORS_COUNTS, _row("cpu"), task="story", controlnets=[pose, canny],
                        frame_controlnets=[[pose], [pose, canny]]).work
    assert apart == one < together == estimate(KOLORS_COUNTS, _row("cpu"), task="story",
                                               controlnets=[pose, canny]).work
    held = [estimate(KOLORS_COUNTS, _row("24gb"), task="story", controlnets=[pose, canny], frame_controlnets=used).work
            for used in ([[pose], [canny]], None)]
    assert held[0] == held[1]  # a profile that holds them all counts them all
