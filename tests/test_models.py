"""Model resolution and the tiny offline Kolors, run through real DiffSynth code on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import pickle
import shutil
from pathlib import Path

import kstory  # noqa: F401  (before anything that imports torchvision/diffsynth)
import numpy as np
import pytest
import torch
from diffsynth.configs.model_config import model_loader_configs
from diffsynth.models.model_manager import ModelDetectorFromSingleFile
from diffsynth.models.sdxl_unet import SDXLUNet
from diffsynth.models.utils import hash_state_dict_keys
from diffsynth.models.sdxl_vae_decoder import SDXLVAEDecoder
from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder
from diffsynth.prompters import KolorsPrompter
from safetensors import safe_open
from safetensors.torch import load_file

from kstory.core.errors import KstoryError
from kstory.core.models import resolve_model
from kstory.core.models.pipeline import kolors_models, load_kolors_model_manager, load_kolors_pipeline
from kstory.core.models.resolve import default_cache_dir
from kstory.core.models.tiny import (
    KOLORS_SPEC,
    TinyKolorsSpec,
    build_tiny_kolors,
    from_diffusers,
    tiny_unet,
    tiny_vae_decoder,
    tiny_vae_encoder,
    unet_to_diffusers,
    vae_to_diffusers,
)

LAYOUT = [
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "kstory_tiny.json",
]
REAL_WIDTHS = KOLORS_SPEC  # the real widths the tiny builder uses for random-full, checked against DiffSynth


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kstory-cache")


@pytest.fixture(scope="module")
def tiny(cache_dir: Path):
    return resolve_model("tiny", cache_dir)


@pytest.fixture(scope="module")
def pipe(tiny):
    return load_kolors_pipeline(tiny)


def _copy(tiny, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny.root, tmp_path / "model"))


def _generate(pipe, seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    image = pipe(
        "a lighthouse at dusk", negative_prompt="blurry", cfg_scale=4.0, height=height, width=width,
        num_inference_steps=3, seed=seed, progress_bar_cmd=lambda steps: steps,
    )
    return np.asarray(image)


# --- tiny build ---------------------------------------------------------------


def test_tiny_build_is_deterministic(tmp_path: Path) -> None:
    first = build_tiny_kolors(tmp_path / "a")
    second = build_tiny_kolors(tmp_path / "b")
    other_seed = build_tiny_kolors(tmp_path / "c", TinyKolorsSpec(seed=1))
    for name in LAYOUT:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / LAYOUT[2]).read_bytes() != (other_seed / LAYOUT[2]).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_tiny_build_refuses_to_overwrite(tiny) -> None:
    with pytest.raises(FileExistsError):
        build_tiny_kolors(tiny.root)


def test_tiny_files_follow_the_published_layout(tiny) -> None:
    assert sorted(p.relative_to(tiny.root).as_posix() for p in tiny.root.rglob("*") if p.is_file()) == sorted(LAYOUT)
    for name in LAYOUT[1:4]:
        with safe_open(tiny.root / name, framework="pt") as handle:  # fails on anything but safetensors
            assert handle.metadata() == {"format": "pt"}
    unet, vae = load_file(tiny.unet), load_file(tiny.vae)
    for key in [
        "encoder_hid_proj.weight",  # Kolors' ChatGLM -> cross-attention projection
        "add_embedding.linear_1.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "up_blocks.0.upsamplers.0.conv.weight",
    ]:
        assert key in unet, key
    for key in [
        "encoder.mid_block.attentions.0.to_q.weight",
        "decoder.up_blocks.3.resnets.2.conv2.weight",
        "quant_conv.weight",
    ]:
        assert key in vae, key
    spec = TinyKolorsSpec()
    # The UNet's conditioning widths follow the text encoder: hidden states and pooled state.
    assert unet["encoder_hid_proj.weight"].shape == (spec.cross_attention_dim, spec.text_hidden_size)
    assert unet["add_embedding.linear_1.weight"].shape[1] == spec.text_hidden_size + 6 * spec.addition_time_embed_dim


def test_diffsynth_converters_round_trip(tiny) -> None:
    spec = TinyKolorsSpec()
    unet_file, vae_file = load_file(tiny.unet), load_file(tiny.vae)
    with torch.device("meta"):
        unet, unet_prefixes = tiny_unet(spec)
        encoder, encoder_prefixes = tiny_vae_encoder(spec)
        decoder, decoder_prefixes = tiny_vae_decoder(spec)

    unet_sd, extra = from_diffusers(unet, unet_file)
    assert extra == {"is_kolors": True}
    assert {k: v.shape for k, v in unet_sd.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    assert unet_to_diffusers(unet_sd, unet_prefixes).keys() == unet_file.keys()

    encoder_sd, _ = from_diffusers(encoder, vae_file)
    decoder_sd, _ = from_diffusers(decoder, vae_file)
    assert encoder_sd.keys() == encoder.state_dict().keys()
    assert decoder_sd.keys() == decoder.state_dict().keys()
    back = vae_to_diffusers(encoder_sd, encoder_prefixes, decoder_sd, decoder_prefixes)
    assert back.keys() == vae_file.keys()
    assert all(torch.equal(back[k], vae_file[k]) for k in vae_file)


def test_tiny_topology_is_the_real_topology_at_real_widths() -> None:
    """Built at Kolors' widths, the tiny builders give exactly DiffSynth's full-size models."""
    with torch.device("meta"):
        pairs = [
            (tiny_unet(REAL_WIDTHS)[0], SDXLUNet(is_kolors=True)),
            (tiny_vae_encoder(REAL_WIDTHS)[0], SDXLVAEEncoder()),
            (tiny_vae_decoder(REAL_WIDTHS)[0], SDXLVAEDecoder()),
        ]
    for ours, real in pairs:
        assert [type(b) for b in ours.blocks] == [type(b) for b in real.blocks]
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
        assert getattr(ours, "scaling_factor", None) == getattr(real, "scaling_factor", None)


# --- pipeline -------------------------------------------------------------------


def test_tiny_text_to_image_is_seeded(pipe) -> None:
    assert isinstance(pipe.prompter, KolorsPrompter)
    first, again, other = _generate(pipe, seed=1), _generate(pipe, seed=1), _generate(pipe, seed=2)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert first.std() > 0
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert _generate(pipe, seed=1, height=64, width=128).shape == (64, 128, 3)


def test_models_are_exposed_separately(tiny) -> None:
    models = kolors_models(load_kolors_model_manager(tiny))
    assert isinstance(models.unet, SDXLUNet) and models.unet.is_kolors
    assert isinstance(models.vae_encoder, SDXLVAEEncoder) and isinstance(models.vae_decoder, SDXLVAEDecoder)
    image = torch.zeros(1, 3, 64, 64)
    latents = models.vae_encoder(image)
    assert latents.shape == (1, 4, 8, 8)  # 4 channels, 8x down, like the real VAE
    assert models.vae_decoder(latents).shape == (1, 3, 64, 64)
    hidden = models.text_encoder(input_ids=torch.tensor([[64790, 64792, 30910]]), output_hidden_states=True)
    assert hidden.hidden_states[-1].shape[-1] == TinyKolorsSpec().text_hidden_size


# --- resolution -----------------------------------------------------------------


def test_resolve_tiny_reuses_and_repairs_the_cache(cache_dir: Path, tiny) -> None:
    assert tiny.is_tiny and tiny.identity == f"kstory/tiny-kolors@{tiny.fingerprint[:12]}"
    assert tiny.root == (cache_dir / "tiny-kolors-v1").resolve()
    mtime = tiny.unet.stat().st_mtime_ns
    assert resolve_model("tiny", cache_dir) == tiny
    assert tiny.unet.stat().st_mtime_ns == mtime  # reused, not rebuilt
    tiny.vae.unlink()
    repaired = resolve_model("tiny", cache_dir)
    assert repaired.vae.is_file() and repaired.fingerprint == tiny.fingerprint


def test_local_path_resolves_like_the_published_layout(tiny, tmp_path: Path) -> None:
    root = _copy(tiny, tmp_path)
    (root / "kstory_tiny.json").rename(tmp_path / "moved.json")  # now just "a folder of Kolors weights"
    local = resolve_model(str(root))
    assert not local.is_tiny and local.identity == f"local:{root.resolve()}"
    assert local.fingerprint == tiny.fingerprint  # same content, same cache key
    assert local.text_encoder == root.resolve() / "text_encoder"


def test_a_fine_tune_with_the_same_size_and_ends_gets_another_fingerprint(tiny, tmp_path: Path) -> None:
    """Same header, same first and last MiB, same size: only the middle tensors differ, as in a fine-tune."""
    from safetensors.torch import save_file

    edge = torch.zeros(1 << 19)  # 2 MiB of float32 at each end
    fingerprints = []
    for name, seed in (("base", 0), ("tuned", 1)):
        root = Path(shutil.copytree(tiny.root, tmp_path / name))
        middle = torch.randn(1 << 20, generator=torch.Generator().manual_seed(seed))  # 4 MiB
        unet = root / "unet" / "diffusion_pytorch_model.safetensors"
        save_file({"a_first": edge, "b_middle": middle, "c_last": edge.clone()}, str(unet))
        fingerprints.append(resolve_model(str(root)).fingerprint)
    base, tuned = tmp_path / "base" / "unet", tmp_path / "tuned" / "unet"
    first, second = (p.joinpath("diffusion_pytorch_model.safetensors").read_bytes() for p in (base, tuned))
    assert len(first) == len(second) and first[: 1 << 20] == second[: 1 << 20] and first[-(1 << 20):] == second[-(1 << 20):]
    assert fingerprints[0] != fingerprints[1]


def test_fingerprint_of_a_large_file_reads_sampled_pages_only(tmp_path: Path) -> None:
    from kstory.core.hashing import PAGE_BYTES, PAGES, page_offsets, sampled_digest

    big = tmp_path / "shard.bin"
    with open(big, "wb") as handle:
        handle.truncate(64 << 20)
    offsets = page_offsets(64 << 20)
    assert len(offsets) == PAGES and offsets[0] == 0 and offsets[-1] == (64 << 20) - PAGE_BYTES
    before = sampled_digest(big)
    with open(big, "r+b") as handle:  # one byte inside a sampled page of the middle
        handle.seek(offsets[PAGES // 2] + 7)
        handle.write(b"x")
    after = sampled_digest(big)
    assert after != before
    moved = big.rename(tmp_path / "elsewhere.bin")
    os.utime(moved, (0, 0))
    assert sampled_digest(moved) == after  # content, not place or time


def test_real_weights_path_names_a_file_diffsynth_does_not_recognise(tiny, tmp_path: Path) -> None:
    """Without kstory_tiny.json the folder takes the real-weights path: DiffSynth's ModelManager
    detects files by their key hashes, and tiny widths match no known Kolors UNet."""
    root = _copy(tiny, tmp_path)
    (root / "kstory_tiny.json").unlink()
    with pytest.raises(KstoryError, match="did not recognise") as caught:
        load_kolors_model_manager(resolve_model(str(root)))
    assert caught.value.path == root.resolve() / "unet/diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("missing", LAYOUT[:4])
def test_local_path_missing_file_is_named(tiny, tmp_path: Path, missing: str) -> None:
    root = _copy(tiny, tmp_path)
    (root / missing).unlink()
    with pytest.raises(KstoryError) as caught:
        resolve_model(str(root))
    assert caught.value.path == root.resolve() / missing
    assert "missing" in caught.value.message and caught.value.fix


def test_local_path_missing_shard_is_named(tiny, tmp_path: Path) -> None:
    root = _copy(tiny, tmp_path)
    (root / "text_encoder/pytorch_model.bin.index.json").write_text(
        '{"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}'
    )
    (root / "text_encoder/model.safetensors").unlink()
    torch.save({"a": torch.zeros(1)}, root / "text_encoder/pytorch_model-00001-of-00002.bin")
    with pytest.raises(KstoryError) as caught:
        resolve_model(str(root))
    assert caught.value.path == root.resolve() / "text_encoder/pytorch_model-00002-of-00002.bin"


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KstoryError, match="does not exist") as caught:
        resolve_model(str(tmp_path / "nowhere"))
    assert "kolors" in caught.value.fix and "tiny" in caught.value.fix


class _Payload:
    """Any class outside torch's weights_only allow-list: unpickling it could run code."""


def test_pickle_that_needs_arbitrary_code_is_refused(tiny, tmp_path: Path) -> None:
    root = _copy(tiny, tmp_path)
    unet = root / "unet/diffusion_pytorch_model.safetensors"
    state = load_file(unet)
    unet.unlink()
    torch.save({**state, "extra": _Payload()}, root / "unet/diffusion_pytorch_model.bin")
    with pytest.raises(KstoryError, match="refusing pickle weights") as caught:
        resolve_model(str(root))
    assert caught.value.path == root.resolve() / "unet/diffusion_pytorch_model.bin"
    assert "weights_only" in caught.value.message and "safetensors" in caught.value.fix


def test_legacy_pickle_is_refused(tiny, tmp_path: Path) -> None:
    root = _copy(tiny, tmp_path)
    (root / "vae/diffusion_pytorch_model.safetensors").unlink()
    with open(root / "vae/diffusion_pytorch_model.bin", "wb") as handle:
        pickle.dump({"w": [0.0]}, handle)
    with pytest.raises(KstoryError, match="legacy"):
        resolve_model(str(root))


def test_weights_only_pickles_are_accepted_and_load(tiny, tmp_path: Path) -> None:
    """The real Kolors text encoder ships .bin shards; tensors-only pickles are fine."""
    root = _copy(tiny, tmp_path)
    for safetensors, pickled in [
        ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin"),
        ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
    ]:
        torch.save(load_file(root / safetensors), root / pickled)
        (root / safetensors).unlink()
    weights = resolve_model(str(root))
    assert weights.is_tiny and weights.unet.suffix == ".bin" and weights.fingerprint != tiny.fingerprint
    reference = kolors_models(load_kolors_model_manager(tiny))
    loaded = kolors_models(load_kolors_model_manager(weights))
    for part in ("text_encoder", "unet"):
        expected, actual = getattr(reference, part).state_dict(), getattr(loaded, part).state_dict()
        assert expected.keys() == actual.keys()
        assert all(torch.equal(actual[k], expected[k]) for k in expected), part


def test_fp16_fix_vae_only_applies_to_kolors(cache_dir: Path) -> None:
    with pytest.raises(KstoryError, match="fp16-fix"):
        resolve_model("tiny", cache_dir, fp16_fix_vae=True)


def test_default_cache_dir_follows_kstory_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KSTORY_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("KSTORY_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "kstory"


# --- published layouts ------------------------------------------------------------

LAYOUT_FILES = {
    "official": [
        *(f"text_encoder/pytorch_model-{i:05d}-of-00007.bin" for i in range(1, 8)),
        "text_encoder/pytorch_model.bin.index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ],
    "diffusers": [
        *(f"text_encoder/model.fp16-{i:05d}-of-00003.safetensors" for i in range(1, 4)),
        "text_encoder/model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ],
    "single": LAYOUT[1:4],
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {layout: build_tiny_kolors(root / layout, layout=layout) for layout in LAYOUT_FILES}


def _written_tensors(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor as written, read back with the plain libraries, keyed as the loaded models name them."""
    text: dict[str, torch.Tensor] = {}
    for path in sorted((root / "text_encoder").iterdir()):
        if path.suffix == ".safetensors":
            text.update(load_file(path))
        elif path.suffix == ".bin":
            text.update(torch.load(path, weights_only=True))
    text = {k.removeprefix("transformer."): v for k, v in text.items()}
    unet_file = next((root / "unet").glob("*.safetensors"))
    vae_file = next((root / "vae").glob("*.safetensors"))
    spec = TinyKolorsSpec()
    with torch.device("meta"):
        unet, encoder, decoder = tiny_unet(spec)[0], tiny_vae_encoder(spec)[0], tiny_vae_decoder(spec)[0]
    vae = load_file(vae_file)
    return {
        "text_encoder": text,
        "unet": from_diffusers(unet, load_file(unet_file))[0],
        "vae_encoder": from_diffusers(encoder, vae)[0],
        "vae_decoder": from_diffusers(decoder, vae)[0],
    }


@pytest.mark.parametrize("layout", list(LAYOUT_FILES))
def test_each_published_layout_resolves_and_loads_what_was_written(layouts, layout: str) -> None:
    root = layouts[layout]
    written = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert written == sorted([*LAYOUT_FILES[layout], "text_encoder/config.json", "kstory_tiny.json"])
    weights = resolve_model(str(root))
    half = "float32" if layout == "single" else "float16"  # read from the tensors, whatever the file names say
    assert (weights.text_encoder_dtype, weights.unet_dtype, weights.vae_dtype) == (half, half, half)
    assert weights.text_encoder_variant == ("fp16" if layout == "diffusers" else None)
    assert weights.unet == root.resolve() / LAYOUT_FILES[layout][-2]

    models = kolors_models(load_kolors_model_manager(weights))
    expected = _written_tensors(root)
    for part, tensors in expected.items():
        loaded = getattr(models, part).state_dict()
        assert loaded.keys() == tensors.keys(), part
        for key, tensor in tensors.items():
            assert torch.equal(loaded[key], tensor.to(loaded[key].dtype)), f"{part}: {key}"
    if layout != "single":
        assert all(t.dtype == torch.float16 for part in expected.values() for t in part.values())


def test_a_published_layout_generates(layouts) -> None:
    pipe = load_kolors_pipeline(resolve_model(str(layouts["diffusers"])))
    image = _generate(pipe, seed=1)
    assert image.shape == (64, 64, 3) and image.std() > 0


def test_official_shards_are_torch_zip_pickles_with_an_index(layouts) -> None:
    folder = layouts["official"] / "text_encoder"
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    shard_names = [name.removeprefix("text_encoder/") for name in LAYOUT_FILES["official"][:7]]
    assert sorted(set(index["weight_map"].values())) == shard_names and all(
        key.startswith("transformer.") for key in index["weight_map"]
    )
    sizes = 0
    for i in range(1, 8):
        shard = torch.load(folder / f"pytorch_model-{i:05d}-of-00007.bin", weights_only=True)
        assert shard and all(index["weight_map"][key] == f"pytorch_model-{i:05d}-of-00007.bin" for key in shard)
        sizes += sum(t.numel() * t.element_size() for t in shard.values())
    assert index["metadata"]["total_size"] == sizes


# --- half downloads -----------------------------------------------------------------


def _layout_copy(layouts, layout: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(layouts[layout], tmp_path / layout))


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(keep)


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_a_missing_shard_is_named(layouts, tmp_path: Path, layout: str) -> None:
    root = _layout_copy(layouts, layout, tmp_path)
    shard = root / LAYOUT_FILES[layout][1]
    shard.unlink()
    with pytest.raises(KstoryError, match="missing text encoder shard") as caught:
        resolve_model(str(root))
    assert caught.value.path == shard.resolve()


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_shards_without_their_index_name_the_index(layouts, tmp_path: Path, layout: str) -> None:
    root = _layout_copy(layouts, layout, tmp_path)
    index = root / next(name for name in LAYOUT_FILES[layout] if name.endswith(".json"))
    index.unlink()
    with pytest.raises(KstoryError, match="without the index") as caught:
        resolve_model(str(root))
    assert caught.value.path == index.resolve()


def test_an_index_naming_a_file_that_is_not_there_is_named(layouts, tmp_path: Path) -> None:
    root = _layout_copy(layouts, "diffusers", tmp_path)
    index_path = root / "text_encoder/model.safetensors.index.fp16.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "model.fp16-00004-of-00004.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(KstoryError, match="listed in the index") as caught:
        resolve_model(str(root))
    assert caught.value.path == root.resolve() / "text_encoder/model.fp16-00004-of-00004.safetensors"


@pytest.mark.parametrize(
    "relative", ["unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16-00002-of-00003.safetensors"]
)
@pytest.mark.parametrize("cut", ["data", "header"])
def test_a_truncated_safetensors_file_is_named(layouts, tmp_path: Path, relative: str, cut: str) -> None:
    root = _layout_copy(layouts, "diffusers", tmp_path)
    path = root / relative
    _truncate(path, path.stat().st_size - 1000 if cut == "data" else 100)
    with pytest.raises(KstoryError, match="truncated safetensors") as caught:
        resolve_model(str(root))
    assert caught.value.path == path.resolve() and "download" in caught.value.fix


def test_a_truncated_bin_shard_is_named(layouts, tmp_path: Path) -> None:
    root = _layout_copy(layouts, "official", tmp_path)
    shard = root / "text_encoder/pytorch_model-00001-of-00007.bin"
    _truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(KstoryError, match="truncated .bin") as caught:
        resolve_model(str(root))
    assert caught.value.path == shard.resolve() and "download" in caught.value.fix


def test_safetensors_with_bytes_beyond_its_header_are_refused(layouts, tmp_path: Path) -> None:
    root = _layout_copy(layouts, "official", tmp_path)
    vae = root / "vae/diffusion_pytorch_model.safetensors"
    with open(vae, "ab") as handle:
        handle.write(b"\0" * 64)
    with pytest.raises(KstoryError, match="more than its header") as caught:
        resolve_model(str(root))
    assert caught.value.path == vae.resolve()


# --- full-size random weights ---------------------------------------------------------


def test_random_full_matches_the_real_sizes_and_shards() -> None:
    """On the meta device: the real key set, 12.49 GB of ChatGLM cut into the published 7 shards, a 5.16 GB UNet."""
    from kstory.core.models.random_full import kolors_entries
    from kstory.core.models.writers import TRANSFORMERS_MAX_SHARD_BYTES, plan_shards

    parts = kolors_entries()
    totals = {part: sum(entry.nbytes for entry in entries) for part, (entries, _) in parts.items()}
    assert totals == {"text_encoder": 12_487_168_064, "unet": 5_158_917_640, "vae": 167_307_726}
    shards = plan_shards(parts["text_encoder"][0], 7, TRANSFORMERS_MAX_SHARD_BYTES)
    assert [round(sum(e.nbytes for e in shard) / 1e9, 2) for shard in shards] == [1.83, 1.97, 1.93, 1.82, 1.97, 1.93, 1.05]
    with torch.device("meta"):
        unet, encoder = SDXLUNet(is_kolors=True), SDXLVAEEncoder()
    unet_keys = from_diffusers(unet, {e.name: torch.empty(e.shape, device="meta") for e in parts["unet"][0]})[0]
    assert {k: v.shape for k, v in unet_keys.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    vae_keys = from_diffusers(encoder, {e.name: torch.empty(e.shape, device="meta") for e in parts["vae"][0]})[0]
    assert vae_keys.keys() == encoder.state_dict().keys()
    # DiffSynth's ModelManager recognises files by a hash of their keys and shapes: these are Kolors' own.
    detector = ModelDetectorFromSingleFile(model_loader_configs)
    for part, names in (("unet", ["sdxl_unet"]), ("vae", ["sdxl_vae_encoder", "sdxl_vae_decoder"])):
        keys = {e.name: torch.empty(e.shape, device="meta") for e in parts[part][0]}
        assert detector.keys_hash_with_shape_dict[hash_state_dict_keys(keys, with_shape=True)][0] == names


def test_random_full_at_reduced_size_writes_the_official_layout_and_runs(tmp_path: Path) -> None:
    from kstory.core.models.random_full import MARKER, STD, write_random_kolors

    spec = TinyKolorsSpec(text_layers=3)
    root = write_random_kolors(tmp_path / "random", spec=spec, seed=3)
    written = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert written == sorted([*LAYOUT_FILES["official"], "text_encoder/config.json", MARKER])
    weights = resolve_model(str(root))
    assert (weights.text_encoder_dtype, weights.unet_dtype, weights.vae_dtype) == ("float16",) * 3
    text = _written_tensors(root)["text_encoder"]
    assert torch.equal(text["encoder.layers.0.input_layernorm.weight"], torch.ones(spec.text_hidden_size, dtype=torch.float16))
    assert abs(text["encoder.layers.0.mlp.dense_h_to_4h.weight"].float().std().item() - STD) < 0.002
    again = write_random_kolors(tmp_path / "again", spec=spec, seed=3)
    assert (again / LAYOUT_FILES["official"][-2]).read_bytes() == (root / LAYOUT_FILES["official"][-2]).read_bytes()

    # At tiny widths DiffSynth cannot detect the UNet by its keys; mark it as a tiny build to load it.
    (root / "kstory_tiny.json").write_text(json.dumps({"spec": spec.to_json()}))
    image = _generate(load_kolors_pipeline(resolve_model(str(root))), seed=0)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_cli_random_full_refuses_an_existing_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kstory.cli import main

    assert main(["model", "random-full", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["model", "random-full"]) == 2
