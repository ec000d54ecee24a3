"""LoRA exports: every tensor in every format, lossless round trip, same UNet output in diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import kstory  # noqa: F401
from kstory.core.errors import KstoryError
from kstory.core.models import resolve_model
from kstory.submissions import export_lora
from kstory.submissions.lora_export import (
    diffusers_to_diffsynth, kohya_to_diffsynth, read_safetensors, sdxl_block_prefixes,
)
from kstory.submissions.parity import export_parity
from kstory.train.lora_io import build_metadata, inject_lora, lora_state_dict, save_lora

RANK, ALPHA = 4, 3.0  # alpha != rank, so a lost alpha would show


@pytest.fixture(scope="module")
def weights():
    return resolve_model("tiny")


@pytest.fixture(scope="module")
def lora(weights, tmp_path_factory) -> Path:
    """A kstory LoRA on the tiny UNet with random (non-zero) A and B factors."""
    from kstory.core.models.tiny import load_tiny_models

    unet = load_tiny_models(weights)["sdxl_unet"]
    inject_lora(unet, RANK, ALPHA, ["to_q", "to_k", "to_v", "to_out"], seed=0)
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in lora_state_dict(unet).items()}
    meta = build_metadata(rank=RANK, alpha=ALPHA, target_modules=["to_q", "to_k", "to_v", "to_out"],
                          base_model=weights.identity, base_fingerprint=weights.fingerprint,
                          trigger_word="kstory style", training_config="{}", step=1)
    return save_lora(tmp_path_factory.mktemp("lora") / "lora.safetensors", state, meta)


@pytest.fixture(scope="module")
def exports(lora, tmp_path_factory) -> dict[str, Path]:
    return export_lora(lora, tmp_path_factory.mktemp("exports"))


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def test_block_table_matches_diffsynth_kolors_and_tiny_unet():
    from diffsynth.models.sdxl_unet import SDXLUNet

    from kstory.core.models.tiny import TinyKolorsSpec, tiny_unet

    with torch.device("meta"):
        tiny, prefixes = tiny_unet(TinyKolorsSpec())
        real = SDXLUNet(is_kolors=True)
    assert prefixes == sdxl_block_prefixes()
    assert [type(b).__name__ for b in real.blocks] == [type(b).__name__ for b in tiny.blocks]


def test_every_tensor_in_every_export_and_lossless_round_trip(lora, exports):
    from kstory.train import read_lora

    state, _ = read_lora(lora)
    assert set(exports) == {"diffsynth", "diffusers", "kohya"}
    modules = len(state) // 2
    diffusers_keys = _keys(exports["diffusers"])
    kohya_keys = _keys(exports["kohya"])
    assert len(diffusers_keys) == 2 * modules and all(k.startswith("unet.") for k in diffusers_keys)
    assert len(kohya_keys) == 3 * modules and all(k.startswith("lora_unet_") for k in kohya_keys)
    assert sum(k.endswith(".alpha") for k in kohya_keys) == modules
    back_diffusers = diffusers_to_diffsynth(read_safetensors(exports["diffusers"])[0])
    back_kohya, alphas = kohya_to_diffsynth(read_safetensors(exports["kohya"])[0])
    for back in (back_diffusers, back_kohya):
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)
    assert set(alphas.values()) == {ALPHA}
    assert read_safetensors(exports["diffsynth"])[0].keys() == state.keys()
    meta = json.loads(read_safetensors(exports["diffusers"])[1]["lora_adapter_metadata"])
    assert meta["unet.r"] == RANK and meta["unet.lora_alpha"] == ALPHA


def test_exports_give_diffsynth_merged_unet_output_in_diffusers_kolors(lora, exports, weights):
    result = export_parity(lora, exports, weights)
    assert result.base_diff < 1e-4, "the diffusers Kolors UNet config does not match the tiny UNet"
    assert result.lora_effect > 1e-2, "the LoRA changes nothing: the comparison would be vacuous"
    for fmt in ("diffusers", "kohya"):
        assert result.max_abs_diff[fmt] < 1e-4, (fmt, result.max_abs_diff)
        assert result.injected[fmt] == result.modules, (fmt, result.injected)
        # diffusers warns "... led to unexpected/missing keys ..." for LoRA keys it could not place
        unexpected = [m for m in result.warnings[fmt] if "led to unexpected keys" in m or "led to missing keys" in m]
        assert not unexpected, unexpected


def test_missing_or_foreign_lora_is_refused(tmp_path: Path):
    with pytest.raises(KstoryError, match="not found"):
        export_lora(tmp_path / "nope.safetensors", tmp_path / "out")
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(other), metadata={"format": "pt"})
    with pytest.raises(KstoryError, match="kstory-lora"):
        export_lora(other, tmp_path / "out")


def test_kohya_key_names_are_the_diffusers_unet_module_names(exports, weights):
    """The kohya file spells each module as diffusers names it (``down_blocks_1_attentions_0_...``), which is what
    diffusers' KolorsPipeline and ComfyUI's LoRA key map read; sd-scripts' SGM spelling (``input_blocks_...``)
    would break ``KolorsPipeline.load_lora_weights``."""
    from kstory.submissions.parity import load_tiny_diffusers_unet

    unet = load_tiny_diffusers_unet(weights)
    linear = {name.replace(".", "_") for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear)}
    modules = {key.removeprefix("lora_unet_").rsplit(".", 2)[0] if key.endswith(".weight")
               else key.removeprefix("lora_unet_").rsplit(".", 1)[0] for key in _keys(exports["kohya"])}
    assert modules and modules <= linear, sorted(modules - linear)[:5]
    assert not any(m.startswith(("input_blocks", "middle_block", "output_blocks")) for m in modules)
    assert any(m.startswith("down_blocks_") for m in modules) and any(m.startswith("up_blocks_") for m in modules)
