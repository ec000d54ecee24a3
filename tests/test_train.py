"""LoRA training on the tiny Kolors: real DiffSynth UNet, peft LoRA and a Lightning Trainer, on CPU at 64 px."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import signal
import struct
from pathlib import Path

import kstory  # noqa: F401  (before anything that imports torchvision/diffsynth)
import lightning as pl
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from kstory.core.errors import KstoryError
from tests.faultfs import fill, small_tmpfs
from kstory.core.models import load_kolors_pipeline, resolve_model
from kstory.train import TrainSettings, load_lora_into_pipeline, train_lora
from kstory.train.batches import step_generator
from kstory.train.buckets import bucket_sizes, nearest_bucket
from kstory.train.cache import build_cache
from kstory.train.checkpoint import latest_checkpoint, list_checkpoints
from kstory.train.dataset import read_samples
from kstory.train.lora_io import (
    META_ALPHA, META_BASE, META_CONFIG, META_DIFFSYNTH_ALPHA, META_FINGERPRINT, META_KSTORY_FORMAT, META_RANK,
    META_STEP, META_TARGETS, META_TRIGGER, META_VERSION, inject_lora, load_lora_state,
)
from kstory.train.module import KolorsLoraModule
from kstory.train.validation import kolors_scheduler

FAST = dict(resolution=64, gradient_checkpointing=False, checkpoint_every=0, batch_size=2)


def make_dataset(root: Path, count: int = 4, sizes: tuple[tuple[int, int], ...] = ((64, 64),), seed: int = 0) -> Path:
    """A few random images with captions in DiffSynth's layout (DATA/train/metadata.csv)."""
    folder = root / "train"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["file_name,text"]
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(f'{i}.png,"a red square, number {i}"')
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train-cache")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data: Path, cache: Path):
    """One finished run that several tests inspect (alpha != rank so the scale is visible)."""
    out = tmp_path_factory.mktemp("run")
    settings = TrainSettings(
        **FAST, rank=4, alpha=8, max_steps=8, learning_rate=1e-2, trigger_word="kstyle", validation_every=4,
        validation_steps=2, validation_prompts=[{"prompt": "kstyle, a fox", "seed": 1}, {"prompt": "a tree", "seed": 2}],
    )
    return train_lora(data, out, settings, model="tiny", cache_dir=cache), settings


def _lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _fixed_batch(data: Path, root: Path, trigger: str | None = None) -> dict[str, torch.Tensor]:
    """Every sample twice, with noise and timesteps from a fixed generator."""
    entries = build_cache(read_samples(data, trigger), None, root, resolution=64, center_crop=False, random_flip=False)
    latents = torch.stack([load_file(str(s.latent))["latent"] for s in entries.samples]).repeat(2, 1, 1, 1)
    texts = [load_file(str(s.text)) for s in entries.samples]
    generator = step_generator(123, 0)
    return {
        "latents": latents,
        "prompt_emb": torch.stack([t["prompt_emb"] for t in texts]).repeat(2, 1, 1),
        "pooled": torch.stack([t["pooled"] for t in texts]).repeat(2, 1),
        "noise": torch.randn(latents.shape, generator=generator),
        "timestep_ids": torch.randint(0, 1100, (latents.shape[0],), generator=generator),
    }


def _loss(unet: torch.nn.Module, batch: dict[str, torch.Tensor], settings: TrainSettings) -> float:
    scheduler = kolors_scheduler()
    scheduler.set_timesteps(1100)
    module = KolorsLoraModule(
        unet, settings, alphas_cumprod=torch.tensor(scheduler.alphas_cumprod, dtype=torch.float64),
        timesteps=scheduler.timesteps, prediction_type="epsilon", total_steps=1,
    )
    with torch.no_grad():
        return float(module.compute_loss(batch))


def _unet_output(unet: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return unet(
            batch["noise"][:2], timestep=torch.tensor([500.0, 50.0]), encoder_hidden_states=batch["prompt_emb"][:2],
            add_text_embeds=batch["pooled"][:2], add_time_id=torch.tensor([64, 64, 0, 0, 64, 64] * 2),
        )


def _cache_root(result) -> Path:
    return Path(json.loads((result.out_dir / "train.json").read_text())["cache"])


# --- training works -----------------------------------------------------------------


def test_training_lowers_the_loss_on_a_fixed_batch(trained, data: Path, cache: Path):
    result, settings = trained
    batch = _fixed_batch(data, _cache_root(result), settings.trigger_word)
    pipe = load_kolors_pipeline(resolve_model("tiny", cache))
    before = _loss(pipe.unet, batch, settings)
    load_lora_into_pipeline(pipe, result.lora_path)
    after = _loss(pipe.unet, batch, settings)
    assert after < before * 0.97, (before, after)
    rows = (result.out_dir / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr" and len(rows) == 1 + settings.max_steps
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, settings.max_steps + 1))


def test_lora_file_has_documented_metadata_and_no_pickle(trained, cache: Path):
    result, settings = trained
    raw = result.lora_path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])  # a safetensors header: JSON, no pickle anywhere
    metadata = header.pop("__metadata__")
    weights = resolve_model("tiny", cache)
    assert metadata[META_KSTORY_FORMAT] == "kstory-lora/1"
    assert metadata[META_RANK] == "4" and float(metadata[META_ALPHA]) == 8.0
    assert float(metadata[META_DIFFSYNTH_ALPHA]) == 2.0
    assert metadata[META_TARGETS] == "to_q,to_k,to_v,to_out"
    assert metadata[META_BASE] == weights.identity and metadata[META_FINGERPRINT] == weights.fingerprint
    assert metadata[META_TRIGGER] == "kstyle" and metadata[META_STEP] == "8"
    assert metadata[META_VERSION] == kstory.__version__
    assert json.loads(metadata[META_CONFIG]) == settings.model_dump(mode="json")
    assert header and all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k for k in header)
    assert all(v["dtype"] == "F32" for v in header.values())
    for path in result.out_dir.rglob("*"):
        if path.is_file():
            assert path.suffix in {".safetensors", ".json", ".csv", ".png"}, path
    summary = json.loads((result.out_dir / "train.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 8 and summary["lora_path"].endswith("lora.safetensors")


def test_validation_images_at_fixed_prompts_and_seeds(trained):
    result, settings = trained
    for step in (4, 8):
        folder = result.out_dir / "validation" / f"step-{step:06d}"
        index = json.loads((folder / "prompts.json").read_text())
        assert [image["file"] for image in index["images"]] == ["00-seed1.png", "01-seed2.png"]
        for image in index["images"]:
            with Image.open(folder / image["file"]) as png:
                assert png.size == (64, 64)
    assert result.validation_dir == result.out_dir / "validation" / "step-000008"


def test_merged_lora_reproduces_training_time_unet_and_changes_generation(trained, data: Path, cache: Path):
    result, settings = trained
    weights = resolve_model("tiny", cache)
    batch = _fixed_batch(data, _cache_root(result), settings.trigger_word)
    # The training-time model: peft LoRA layers (scale alpha/rank) on the base UNet.
    peft_pipe = load_kolors_pipeline(weights)
    inject_lora(peft_pipe.unet, settings.rank, settings.lora_alpha, settings.target_modules, seed=0)
    load_lora_state(peft_pipe.unet, _lora_tensors(result.lora_path))
    expected = _unet_output(peft_pipe.unet, batch)

    merged = load_kolors_pipeline(weights)
    info = load_lora_into_pipeline(merged, result.lora_path)
    assert info["strength"] == pytest.approx(2.0)
    torch.testing.assert_close(_unet_output(merged.unet, batch), expected, rtol=1e-4, atol=1e-5)

    # DiffSynth's own loader, given the recorded alpha, agrees.
    from kstory.core.models.pipeline import load_kolors_model_manager
    from diffsynth.pipelines.sdxl_image import SDXLImagePipeline

    manager = load_kolors_model_manager(weights)
    manager.load_lora(str(result.lora_path), lora_alpha=float(info[META_DIFFSYNTH_ALPHA]))
    torch.testing.assert_close(
        _unet_output(SDXLImagePipeline.from_model_manager(manager).unet, batch), expected, rtol=1e-4, atol=1e-5
    )

    base = load_kolors_pipeline(weights)
    base_out = _unet_output(base.unet, batch)
    assert not torch.allclose(base_out, expected, atol=1e-4)
    zero = load_kolors_pipeline(weights)
    load_lora_into_pipeline(zero, result.lora_path, scale=0.0)
    torch.testing.assert_close(_unet_output(zero.unet, batch), base_out)

    def generate(pipe) -> np.ndarray:
        image = pipe("kstyle, a red square", height=64, width=64, num_inference_steps=4, cfg_scale=3.0, seed=7,
                     progress_bar_cmd=lambda steps: steps)
        return np.asarray(image, dtype=np.int16)

    assert np.abs(generate(merged) - generate(base)).max() > 0


class _Interrupt(pl.Callback):
    """Presses Ctrl-C (a real SIGINT) during a given optimizer step."""

    def __init__(self, step: int, accumulation: int):
        self.step, self.accumulation = step, accumulation

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == (self.step - 1 - module.start_step) * self.accumulation:
            os.kill(os.getpid(), signal.SIGINT)


class _Exhausted(pl.Callback):
    """Asks the CPU allocator for an impossible tensor during a given optimizer step: its own out-of-memory error."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module.step + 1 == self.step:
            torch.empty(1 << 60, dtype=torch.uint8)


def test_out_of_memory_names_the_knobs_keeps_the_checkpoints_and_a_rerun_resumes(tmp_path: Path, cache: Path,
                                                                                   monkeypatch):
    data = make_dataset(tmp_path / "data")
    settings = TrainSettings(**{**FAST, "checkpoint_every": 1}, max_steps=3)
    with pytest.raises(KstoryError, match=r"ran out of memory training, 1 step\(s\) done \(64 px, batch_size 2\): "
                                          r".*can't allocate memory") as info:
        train_lora(data, tmp_path / "out", settings, model="tiny", cache_dir=cache, callbacks=[_Exhausted(2)])
    assert "the last checkpoint is" in str(info.value) and "step-000001" in str(info.value)
    # Only knobs that would lower the need: these settings leave checkpointing off, a batch of 2 and a bf16 base.
    fix = info.value.fix
    assert "gradient_checkpointing: true" in fix and "batch_size: 1 with grad_accumulation: 2" in fix
    assert "unet_quant: int8" in fix and "resumes from the last checkpoint" in fix
    assert "resolution" not in fix and "use_8bit_adam" not in fix  # 64 px already; bitsandbytes is CUDA only
    assert [step for step, _ in list_checkpoints(tmp_path / "out")] == [1]
    resumed = train_lora(data, tmp_path / "out", settings, model="tiny", cache_dir=cache)
    assert (resumed.resumed_from, resumed.steps) == (1, 3)

    # Caching: pictures no other test has cached meet the same allocator while being encoded.
    from kstory.train.cache import Encoders

    monkeypatch.setattr(Encoders, "encode_image", lambda self, pixels: torch.empty(1 << 60, dtype=torch.uint8))
    with pytest.raises(KstoryError, match="ran out of memory encoding captions and images for the cache at 64 px") \
            as info:
        train_lora(make_dataset(tmp_path / "other", seed=31), tmp_path / "other-out", settings, model="tiny",
                   cache_dir=cache)
    assert "--text-encoder-quant int8" in info.value.fix
    assert "--memory cpu (ChatGLM read and run one block at a time)" in info.value.fix  # the CPU's own profile
    assert "12gb" not in info.value.fix

    # Any other error is the library's own, unchanged.
    def broken(self, pixels):
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(Encoders, "encode_image", broken)
    with pytest.raises(RuntimeError, match="same device") as raised:
        train_lora(make_dataset(tmp_path / "third", seed=32), tmp_path / "third-out", settings, model="tiny",
                   cache_dir=cache)
    assert not isinstance(raised.value, KstoryError)


def test_out_of_memory_loading_the_unet_and_knobs_already_set_are_not_offered(tmp_path: Path, cache: Path,
                                                                             monkeypatch):
    from kstory.core import memory
    from kstory.core.models import pipeline
    from kstory.train.memory_advice import caching_memory_fix, training_memory_fix
    from kstory.train.runtime import Runtime

    monkeypatch.setattr(pipeline, "load_kolors_model_manager",
                        lambda *args, **kwargs: torch.empty(1 << 60, dtype=torch.uint8))
    with pytest.raises(KstoryError, match="ran out of memory loading the UNet: .*can't allocate memory") as info:
        train_lora(make_dataset(tmp_path / "data"), tmp_path / "out", TrainSettings(**FAST, max_steps=1),
                   model="tiny", cache_dir=cache)
    assert "unet_quant: int8" in info.value.fix
    assert "half-precision weights (--memory cpu" in info.value.fix  # the tiny model runs in float32 here

    lean = TrainSettings(resolution=512, batch_size=1, gradient_checkpointing=True, unet_quant="int8")
    cpu = memory.MemoryPlan(profile="cpu", requested="cpu", reason="asked for", device="cpu", **memory._TABLE["cpu"])
    assert training_memory_fix(lean, cpu) == caching_memory_fix(
        lean, Runtime("cpu", "bf16", torch.bfloat16, torch.device("cpu"), text_quant="int8", text_streamed=True))
    assert "already at its lowest" in training_memory_fix(lean, cpu)
    gpu = memory.MemoryPlan(profile="16gb", requested="auto", reason="", device="cuda", **memory._TABLE["16gb"])
    assert training_memory_fix(lean, gpu).startswith("use a smaller memory profile (--memory 12gb or 8gb); "
                                                     "use_8bit_adam: true (CUDA);")


def test_interrupted_then_resumed_run_is_bit_identical(tmp_path: Path, cache: Path):
    data = make_dataset(tmp_path / "data", count=5, sizes=((64, 64), (128, 64)))
    settings = TrainSettings(
        **{**FAST, "checkpoint_every": 2}, max_steps=6, grad_accumulation=2, learning_rate=5e-3,
        lr_scheduler="cosine", warmup_steps=2, random_flip=True, caption_dropout=0.3, seed=3,
    )
    straight = train_lora(data, tmp_path / "straight", settings, model="tiny", cache_dir=cache)

    # Python's own Ctrl-C handler, as in a terminal (a background job starts with Ctrl-C ignored, which training keeps)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_lora(
                data, tmp_path / "resumed", settings, model="tiny", cache_dir=cache, callbacks=[_Interrupt(3, 2)]
            )
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back as it was
    finally:
        signal.signal(signal.SIGINT, outer)
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed")] == [2, 3]
    assert not (tmp_path / "resumed" / "lora.safetensors").exists()

    resumed = train_lora(data, tmp_path / "resumed", settings, model="tiny", cache_dir=cache)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    a, b = _lora_tensors(straight.lora_path), _lora_tensors(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / "loss.csv").read_text() == (tmp_path / "resumed" / "loss.csv").read_text()
    for name in ("optimizer.safetensors", "lora.safetensors"):
        x = load_file(str(tmp_path / "straight" / "checkpoints" / "step-000006" / name))
        y = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-000006" / name))
        assert all(torch.equal(x[k], y[k]) for k in x)

    # A shorter schedule stops at its own last step: the LoRA is step 4's, the later checkpoint stays.
    shorter = train_lora(data, tmp_path / "straight", settings.model_copy(update={"max_steps": 4}), model="tiny",
                         cache_dir=cache)
    assert (shorter.resumed_from, shorter.steps) == (4, 4) and shorter.final_loss is not None
    assert [step for step, _ in list_checkpoints(tmp_path / "straight")] == [2, 4, 6]
    c = _lora_tensors(tmp_path / "straight" / "checkpoints" / "step-000004" / "lora.safetensors")
    d = _lora_tensors(shorter.lora_path)
    assert c.keys() == d.keys() and all(torch.equal(c[k], d[k]) for k in c)


def test_training_again_on_a_finished_output_is_a_no_op(trained, data: Path, cache: Path):
    result, settings = trained
    files = {name: (result.out_dir / name).read_bytes() for name in ("lora.safetensors", "train.json", "loss.csv")}
    again = train_lora(data, result.out_dir, settings, model="tiny", cache_dir=cache)
    assert (again.resumed_from, again.steps) == (8, 8) and again.final_loss == result.final_loss
    assert {name: (result.out_dir / name).read_bytes() for name in files} == files


def test_cache_is_keyed_by_content_and_bucket(tmp_path: Path, cache: Path):
    from kstory.core.models import kolors_models, load_kolors_model_manager
    from kstory.train.cache import Encoders, MissingCache

    data = make_dataset(tmp_path / "data", count=2, sizes=((192, 96), (96, 96)))
    samples = read_samples(data)
    nets = kolors_models(load_kolors_model_manager(resolve_model("tiny", cache)))
    encoders = Encoders(nets.text_encoder, nets.vae_encoder, torch.device("cpu"))
    root = tmp_path / "cache"
    options = dict(resolution=192, random_flip=True)
    bucketed = build_cache(samples, encoders, root, center_crop=False, **options)
    assert [s.size for s in bucketed.samples] == [(256, 128), (192, 192)]
    assert load_file(str(bucketed.samples[0].latent))["latent"].shape == (4, 16, 32)
    assert set(load_file(str(bucketed.samples[0].latent))) == {"latent", "latent_flipped"}
    again = build_cache(samples, None, root, center_crop=False, **options)  # all cached: no encoder needed
    assert again.samples == bucketed.samples
    with pytest.raises(MissingCache):  # another crop mode is another size, so another entry
        build_cache(samples, None, root, center_crop=True, **options)
    cropped = build_cache(samples, encoders, root, center_crop=True, **options)
    assert [s.size for s in cropped.samples] == [(192, 192), (192, 192)]
    Image.new("RGB", (96, 96), "red").save(data / "train" / "1.png")  # new content, same name
    with pytest.raises(MissingCache):
        build_cache(read_samples(data), None, root, center_crop=False, **options)


def test_a_16_bit_picture_is_cached_as_what_it_shows(tmp_path: Path, cache: Path):
    """Decoded by prep's rule: the latent of a 16-bit grey PNG is its 8-bit twin's, not a white square's."""
    from kstory.core.models import kolors_models, load_kolors_model_manager
    from kstory.train.cache import Encoders

    folder = tmp_path / "data" / "train"
    folder.mkdir(parents=True)
    grey = np.random.default_rng(1).integers(0, 256, (64, 64)).astype(np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "deep.png")  # Pillow writes it as I;16
    Image.fromarray(grey).convert("RGB").save(folder / "eight.png")
    Image.new("RGB", (64, 64), "white").save(folder / "white.png")
    (folder / "metadata.csv").write_text("file_name,text\ndeep.png,a\neight.png,b\nwhite.png,c\n", encoding="utf-8")
    with Image.open(folder / "deep.png") as deep:
        assert deep.mode == "I;16"
    nets = kolors_models(load_kolors_model_manager(resolve_model("tiny", cache)))
    encoders = Encoders(nets.text_encoder, nets.vae_encoder, torch.device("cpu"))
    options = dict(resolution=64, center_crop=True, random_flip=False)
    built = build_cache(read_samples(tmp_path / "data"), encoders, tmp_path / "cache", **options)
    deep, eight, white = (load_file(str(sample.latent))["latent"] for sample in built.samples)
    assert torch.equal(deep, eight) and not torch.allclose(deep, white)


def test_pixels_without_a_white_level_are_named(tmp_path: Path):
    from kstory.train.cache import open_rgb

    path = tmp_path / "odd.tif"
    Image.fromarray(np.array([[0.0, 300.0]], dtype=np.float32)).save(path)
    with pytest.raises(KstoryError, match="float picture with values 0..300") as error:
        open_rgb(path)
    assert error.value.path == path and error.value.fix


def test_encoders_are_freed_before_the_unet_trains(tmp_path: Path, data: Path, cache: Path, monkeypatch):
    import kstory.train.prepare as prepare_module
    freed = []
    real_free = prepare_module.free_models
    monkeypatch.setattr(prepare_module, "free_models", lambda *models: (freed.extend(models), real_free(*models)))
    train_lora(data, tmp_path / "out", TrainSettings(**FAST, max_steps=1), cache_dir=tmp_path / "cold-cache")
    names = sorted(type(model).__name__ for model in freed)
    assert names == ["ChatGLMModel", "SDXLVAEDecoder", "SDXLVAEEncoder"]  # no validation prompts: decoder too
    assert all(p.device.type == "meta" for model in freed for p in model.parameters())


# --- bad input ----------------------------------------------------------------------


def test_missing_or_empty_dataset_names_metadata_csv(tmp_path: Path, cache: Path):
    settings = TrainSettings(**FAST, max_steps=1)
    with pytest.raises(KstoryError, match="metadata.csv") as missing:
        train_lora(tmp_path / "nothing", tmp_path / "out", settings, cache_dir=cache)
    assert missing.value.fix
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(KstoryError, match="metadata.csv lists no images"):
        train_lora(tmp_path / "empty", tmp_path / "out", settings, cache_dir=cache)
    (tmp_path / "empty" / "train" / "metadata.csv").write_text("image,caption\na.png,x\n")
    with pytest.raises(KstoryError, match="lacks column"):
        train_lora(tmp_path / "empty", tmp_path / "out", settings, cache_dir=cache)


def test_undecodable_image_is_named(tmp_path: Path, cache: Path):
    data = make_dataset(tmp_path / "data", count=2)
    (data / "train" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(KstoryError, match="cannot decode image") as error:
        train_lora(data, tmp_path / "out", TrainSettings(**FAST, max_steps=1), cache_dir=cache)
    assert error.value.path == data / "train" / "1.png"


def test_resume_refuses_another_rank_or_base_model(tmp_path: Path, data: Path, cache: Path):
    out = tmp_path / "out"
    train_lora(data, out, TrainSettings(**FAST, max_steps=1, rank=2), cache_dir=cache)
    with pytest.raises(KstoryError, match="LoRA rank 2, this run uses 4") as error:
        train_lora(data, out, TrainSettings(**FAST, max_steps=2, rank=4), cache_dir=cache)
    assert "fresh" in error.value.fix
    state_path = latest_checkpoint(out) / "state.json"
    state = json.loads(state_path.read_text())
    state["identity"]["base_fingerprint"] = "0" * 64
    state["identity"]["base_model"] = "someone/else"
    state_path.write_text(json.dumps(state))
    with pytest.raises(KstoryError, match="base model someone/else"):
        train_lora(data, out, TrainSettings(**FAST, max_steps=2, rank=2), cache_dir=cache)
    fresh = train_lora(data, out, TrainSettings(**FAST, max_steps=2, rank=4), cache_dir=cache, resume=False)
    assert fresh.resumed_from == 0 and fresh.steps == 2


class _Poison(pl.Callback):
    """Puts a NaN into a LoRA weight after the given step."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.step == self.step:
            with torch.no_grad():
                next(p for _, p in module.trainable_parameters()).fill_(float("nan"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, data: Path, cache: Path):
    out = tmp_path / "out"
    settings = TrainSettings(**{**FAST, "checkpoint_every": 2}, max_steps=6)
    with pytest.raises(KstoryError, match=r"loss is nan at step 3.*step-000002") as error:
        train_lora(data, out, settings, cache_dir=cache, callbacks=[_Poison(2)])
    assert "learning_rate" in error.value.fix
    assert [step for step, _ in list_checkpoints(out)] == [2]
    assert not (out / "lora.safetensors").exists()
    tensors = load_file(str(out / "checkpoints" / "step-000002" / "lora.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())


class _FillDisk(pl.Callback):
    """Fills the file system holding ``folder`` after the given step: a real full disk, not a mocked error."""

    def __init__(self, step: int, folder: Path):
        self.step, self.folder, self.filler = step, folder, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.step == self.step and self.filler is None:
            self.filler = fill(self.folder)


def test_failed_save_on_a_full_disk_leaves_previous_checkpoint_as_latest(tmp_path: Path, data: Path, cache: Path):
    with small_tmpfs(tmp_path / "disk", size="8m") as disk:
        out = disk / "out"
        full = _FillDisk(3, disk)
        with pytest.raises(KstoryError, match="could not save the checkpoint for step 4: disk full") as raised:
            train_lora(data, out, TrainSettings(**{**FAST, "checkpoint_every": 2}, max_steps=6), cache_dir=cache,
                       callbacks=[full])
        assert "free space" in raised.value.fix and "resumes from the last complete checkpoint" in raised.value.fix
        causes, error = [], raised.value
        while error is not None:
            causes.append(error)
            error = error.__cause__
        assert isinstance(causes[-1], SafetensorError), causes  # safetensors' own type, mapped by its "(os error 28)"
        full.filler.unlink()
        assert latest_checkpoint(out).name == "step-000002"
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # no staging left over
        assert not (out / "lora.safetensors").exists()


def test_settings_are_strict():
    with pytest.raises(ValueError, match="extra"):
        TrainSettings(rnak=4)
    with pytest.raises(ValueError, match="multiple of 64"):
        TrainSettings(resolution=100)
    with pytest.raises(ValueError, match="not both"):
        TrainSettings(max_steps=3, epochs=2)
    assert TrainSettings(rank=8).lora_scale == 1.0 and TrainSettings(rank=8, alpha=4).lora_scale == 0.5


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(tmp_path: Path, data: Path, cache: Path):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(KstoryError, match="bitsandbytes"):
        train_lora(data, tmp_path / "out", TrainSettings(**FAST, max_steps=1, use_8bit_adam=True), cache_dir=cache)


def test_buckets_keep_area_and_multiples_of_64():
    sizes = bucket_sizes(1024)
    assert (1024, 1024) in sizes and all(w % 64 == 0 and h % 64 == 0 for w, h in sizes)
    assert all(0.8 * 1024**2 <= w * h <= 1024**2 for w, h in sizes)
    assert nearest_bucket(1600, 900, sizes)[0] > nearest_bucket(1600, 900, sizes)[1]
    assert nearest_bucket(900, 1600, sizes)[0] < nearest_bucket(900, 1600, sizes)[1]
    assert bucket_sizes(64) == [(64, 64)]


def test_a_job_started_with_ctrl_c_ignored_keeps_ignoring_it() -> None:
    from kstory.train.callbacks import RunRecorder

    recorder = RunRecorder(
        accumulation=1, checkpoint_every=0, validation_every=0, total_steps=1, loss_log=None,
        save=lambda module: None, validate=None,
    )
    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        recorder.install_signal_handler()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        recorder.restore_signal_handler()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)
