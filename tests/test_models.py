"""Model resolution and the tiny offline Kolors, run through real DiffSynth code on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pickle
import shutil
from pathlib import Path

import kstory  # noqa: F401  (before anything that imports torchvision/diffsynth)
import numpy as np
import pytest
import torch
from diffsynth.models.sdxl_unet import SDXLUNet
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
REAL_WIDTHS = TinyKolorsSpec(
    unet_channels=(320, 640, 1280),
    unet_head_dim=64,
    unet_transformer_depth=(2, 10),
    cross_attention_dim=2048,
    addition_time_embed_dim=256,
    text_hidden_size=4096,
    vae_channels=(128, 256, 512, 512),
)


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
