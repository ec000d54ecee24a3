"""Bringing your own LoRAs: every format gives the same merged UNet, scales stack, foreign LoRAs are refused.

The test LoRAs are built on the tiny Kolors UNet's real module names; the
names in each spelling come from DiffSynth's own converters (``from_diffusers``,
``from_civitai``) and from the tiny model's diffusers writer, not from the code
under test, except where that code's table is itself checked against DiffSynth.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import kstory  # noqa: F401
from kstory.core.errors import KstoryError
from kstory.core.lora_stack import LoraRequest, merge_loras, plan_loras
from kstory.core.models import resolve_model
from kstory.core.unet_names import diffusers_module, module_spellings, sgm_module

RANK, ALPHA = 4, 3.0  # alpha != rank, so a lost alpha would show


@pytest.fixture(scope="module")
def weights():
    return resolve_model("tiny")


@pytest.fixture(scope="module")
def base_unet(weights) -> torch.nn.Module:
    from kstory.core.models.tiny import load_tiny_models

    return load_tiny_models(weights)["sdxl_unet"]


def _layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


@pytest.fixture(scope="module")
def factors(base_unet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (down, up) for every Linear and Conv2d of the tiny UNet but Kolors' own text projection (no SGM name)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, module in _layers(base_unet).items():
        if name == "text_intermediate_proj":
            continue
        w = module.weight
        down = torch.randn((RANK, *w.shape[1:]), generator=g) * 0.1
        up = torch.randn((w.shape[0], RANK, *([1, 1] if w.dim() == 4 else [])), generator=g) * 0.1
        out[name] = (down, up)
    return out


def _diffusers_names(names: list[str]) -> dict[str, str]:
    """DiffSynth module -> diffusers module, by the tiny model's diffusers writer (independent of unet_names)."""
    from kstory.core.models.tiny import TinyKolorsSpec, tiny_unet, unet_to_diffusers

    with torch.device("meta"):
        _, prefixes = tiny_unet(TinyKolorsSpec())
    renamed = unet_to_diffusers({f"{n}.weight": None for n in names}, prefixes)
    return {n: k.removesuffix(".weight") for n, k in zip(names, renamed)}


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


def _kohya(path: Path, factors, names: dict[str, str], alphas: dict[str, float] | float = ALPHA,
           metadata: dict[str, str] | None = None) -> Path:
    tensors = {}
    for module, (down, up) in factors.items():
        key = "lora_unet_" + names[module].replace(".", "_")
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        alpha = alphas[module] if isinstance(alphas, dict) else alphas
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    return _write(path, tensors, metadata)


def _merged(base_unet, *requests: LoraRequest, own_scale: float | None = None) -> dict[str, torch.Tensor]:
    unet = copy.deepcopy(base_unet)
    merge_loras(unet, plan_loras(list(requests), unet, own_scale=own_scale))
    return unet.state_dict()


def test_spellings_agree_with_diffsynth_converters(base_unet):
    """Every module of the real Kolors UNet and the tiny one: the SGM name maps back through DiffSynth's own
    from_civitai table, the diffusers name through its from_diffusers converter, each to the same module."""
    from diffsynth.models.sdxl_unet import SDXLUNet, SDXLUNetStateDictConverter

    with torch.device("meta"):
        real = SDXLUNet(is_kolors=True)
    converter = SDXLUNetStateDictConverter()
    for unet in (real, base_unet):
        names = list(_layers(unet))
        marked = {diffusers_module(n) + ".weight": torch.tensor(float(i)) for i, n in enumerate(names)}
        back = converter.from_diffusers(marked)[0]
        assert {k: int(v) for k, v in back.items()} == {f"{n}.weight": i for i, n in enumerate(names)}
        for name in names:
            sgm = sgm_module(diffusers_module(name))
            if name == "text_intermediate_proj":
                assert sgm is None  # Kolors' own layer: the SGM checkpoints never had it
                continue
            out = converter.from_civitai({f"model.diffusion_model.{sgm}.weight": torch.zeros(1)})
            assert list(out) == [f"{name}.weight"], (name, sgm, list(out))
    assert len(module_spellings(real)) > 4 * len(_layers(real))


def test_kohya_both_spellings_diffusers_and_diffsynth_give_the_same_merged_unet(base_unet, factors, tmp_path):
    names = list(factors)
    diffusers = _diffusers_names(names)
    sgm = {n: sgm_module(diffusers[n]) for n in names}
    files = {
        "kohya": _kohya(tmp_path / "kohya.safetensors", factors, diffusers),
        "kohya-sgm": _kohya(tmp_path / "kohya_sgm.safetensors", factors, sgm),
        "diffusers": _write(tmp_path / "peft.safetensors", {
            f"unet.{diffusers[n]}.lora_{side}.weight": t for n, (down, up) in factors.items()
            for side, t in (("A", down), ("B", up))},
            {"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": ALPHA})}),
        "diffsynth": _write(tmp_path / "diffsynth.safetensors", {
            f"{n}.lora_{side}.default.weight": t for n, (down, up) in factors.items()
            for side, t in (("A", down), ("B", up))},
            {"kstory.rank": str(RANK), "kstory.alpha": str(ALPHA)}),
    }
    merged = {}
    for fmt, path in files.items():
        planned = plan_loras([LoraRequest(path, scale=0.7)], base_unet)
        assert planned[0].file.format == fmt
        assert len(planned[0].targets) == len(factors) and not planned[0].unmatched
        merged[fmt] = _merged(base_unet, LoraRequest(path, scale=0.7))
    reference = merged.pop("kohya")
    base = base_unet.state_dict()
    assert any(not torch.equal(reference[k], base[k]) for k in base), "the LoRA changed nothing"
    for fmt, state in merged.items():
        different = [k for k in reference if not torch.equal(reference[k], state[k])]
        assert not different, (fmt, different[:3])
    # the change is exactly scale * alpha / rank * up @ down, conv kernels included
    down, up = factors["blocks.0.conv1"]
    expected = base["blocks.0.conv1.weight"] + 0.7 * ALPHA / RANK * (up.flatten(1) @ down.flatten(1)).reshape(
        base["blocks.0.conv1.weight"].shape)
    torch.testing.assert_close(reference["blocks.0.conv1.weight"], expected)


def test_a_kstory_lora_merges_as_diffsynths_own_loader_does(base_unet, weights, tmp_path):
    """The story's trained LoRA goes through DiffSynth's GeneralLoRAFromPeft; the same file, and its kohya export,
    brought as extra LoRAs, must give the same UNet."""
    from types import SimpleNamespace

    from kstory.core.lora import load_lora_into_pipeline
    from kstory.submissions import export_lora
    from kstory.train.lora_io import build_metadata, inject_lora, lora_state_dict, save_lora

    donor = copy.deepcopy(base_unet)
    inject_lora(donor, RANK, ALPHA, ["to_q", "to_k", "to_v", "to_out"], seed=0)
    g = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in lora_state_dict(donor).items()}
    meta = build_metadata(rank=RANK, alpha=ALPHA, target_modules=["to_q", "to_k", "to_v", "to_out"],
                          base_model=weights.identity, base_fingerprint=weights.fingerprint,
                          trigger_word="", training_config="{}", step=1)
    lora = save_lora(tmp_path / "lora.safetensors", state, meta)
    exports = export_lora(lora, tmp_path / "exports")
    by_diffsynth = copy.deepcopy(base_unet)
    load_lora_into_pipeline(SimpleNamespace(unet=by_diffsynth), lora, scale=0.5)
    expected = by_diffsynth.state_dict()
    for path in (lora, exports["kohya"], exports["diffusers"]):
        state = _merged(base_unet, LoraRequest(path, scale=0.5))
        for key in expected:
            torch.testing.assert_close(state[key], expected[key], rtol=0, atol=1e-6, msg=f"{path.name}: {key}")


def test_two_loras_stack_with_their_scales(base_unet, factors, tmp_path):
    names = list(factors)
    diffusers = _diffusers_names(names)
    style = _kohya(tmp_path / "style.safetensors", factors, diffusers)
    flipped = {n: (down.flip(0), -up) for n, (down, up) in factors.items()}  # another LoRA on the same modules
    character = _kohya(tmp_path / "character.safetensors", flipped, diffusers, alphas=2.0)
    base = base_unet.state_dict()
    one = {k: v - base[k] for k, v in _merged(base_unet, LoraRequest(style)).items()}
    two = {k: v - base[k] for k, v in _merged(base_unet, LoraRequest(character)).items()}
    both = _merged(base_unet, LoraRequest(style, scale=0.8), LoraRequest(character, scale=0.6))
    for key in base:
        torch.testing.assert_close(both[key], base[key] + 0.8 * one[key] + 0.6 * two[key], rtol=1e-5, atol=1e-6)


def test_per_module_alpha_is_honoured(base_unet, factors, tmp_path):
    names = list(factors)
    diffusers = _diffusers_names(names)
    alphas = {n: [1.0, 2.0, 8.0][i % 3] for i, n in enumerate(names)}
    varied = _kohya(tmp_path / "varied.safetensors", factors, diffusers, alphas=alphas)
    prescaled = {n: (down, up * (alphas[n] / RANK)) for n, (down, up) in factors.items()}
    flat = _kohya(tmp_path / "flat.safetensors", prescaled, diffusers, alphas=float(RANK))
    a, b = _merged(base_unet, LoraRequest(varied)), _merged(base_unet, LoraRequest(flat))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def _one_module(path: Path, module: str, down: torch.Tensor, up: torch.Tensor, extra=None, metadata=None) -> Path:
    key = f"lora_unet_{module}"
    return _write(path, {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, **(extra or {})}, metadata)


def test_loras_for_other_base_models_are_refused_with_the_reason(base_unet, tmp_path):
    attn = "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    width = 64  # the tiny UNet's level-1 width; its cross-attention reads 32-wide text states
    sd15 = _one_module(tmp_path / "sd15.safetensors", attn, torch.zeros(4, 768), torch.zeros(width, 4))
    with pytest.raises(KstoryError, match=r"SD1\.5.*768") as error:
        plan_loras([LoraRequest(sd15)], base_unet)
    assert "sd15.safetensors" in error.value.render()
    sdxl_te = _one_module(tmp_path / "sdxl.safetensors", attn, torch.zeros(4, 32), torch.zeros(width, 4), extra={
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280)})
    with pytest.raises(KstoryError, match="SDXL.*two CLIP text encoders"):
        plan_loras([LoraRequest(sdxl_te)], base_unet)
    pooled = _one_module(tmp_path / "pooled.safetensors", "add_embedding_linear_1", torch.zeros(4, 2816),
                         torch.zeros(128, 4))
    with pytest.raises(KstoryError, match="SDXL's pooled CLIP"):
        plan_loras([LoraRequest(pooled)], base_unet)
    said = _one_module(tmp_path / "said.safetensors", attn, torch.zeros(4, 32), torch.zeros(width, 4),
                       metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(KstoryError, match="metadata says it was trained on SDXL"):
        plan_loras([LoraRequest(said)], base_unet)


def test_no_matching_key_is_an_error_and_unmatched_keys_are_counted(base_unet, tmp_path, caplog):
    nothing = _one_module(tmp_path / "nothing.safetensors", "down_blocks_0_attentions_0_proj_in",
                          torch.zeros(4, 32), torch.zeros(32, 4))
    with pytest.raises(KstoryError, match="no key of this kohya LoRA matches"):
        plan_loras([LoraRequest(nothing)], base_unet)
    with pytest.raises(KstoryError, match="no LoRA keys found"):
        plan_loras([LoraRequest(_write(tmp_path / "plain.safetensors", {"weight": torch.zeros(2)}))], base_unet)
    some = _one_module(tmp_path / "some.safetensors", "down_blocks_1_attentions_0_proj_in", torch.zeros(4, 64),
                       torch.zeros(64, 4), extra={
                           "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                           "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
                           "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
                           "lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(2)},
                       metadata={"ss_network_dim": "16", "ss_network_alpha": "8"})
    caplog.set_level(logging.INFO, logger="kstory")
    planned = plan_loras([LoraRequest(some, scale=1.5), LoraRequest(some, scale=1.2)], base_unet)
    assert len(planned[0].targets) == 1 and planned[0].unmatched == ["down_blocks_0_attentions_0_proj_in"]
    text = caplog.text
    assert "1 module(s) match nothing" in text and "down_blocks_0_attentions_0_proj_in" in text
    assert "1 text-encoder key(s) ignored" in text
    assert "hada_w1_a" in text  # a LyCORIS key: counted, never merged
    assert "metadata says rank 16, its tensors have rank 4" in text
    assert "add up to 2.7" in text
    record = planned[0].record()
    assert record["ignored"] == {"text_encoder": 1, "unmatched": 1, "unknown": 1}
    assert record["rank"] == 4 and record["alpha"] == 4.0  # no .alpha tensor: alpha = rank, strength 1


def test_pickles_load_only_with_weights_only(base_unet, tmp_path):
    attn = "lora_unet_down_blocks_1_attentions_0_proj_in"
    good = tmp_path / "good.pt"
    torch.save({f"{attn}.lora_down.weight": torch.ones(2, 64), f"{attn}.lora_up.weight": torch.ones(64, 2)}, good)
    assert len(plan_loras([LoraRequest(good)], base_unet)[0].targets) == 1
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {f"{attn}.lora_down.weight": torch.ones(2, 64)}, "extra": Path("x")}, evil)
    with pytest.raises(KstoryError, match="weights_only") as error:
        plan_loras([LoraRequest(evil)], base_unet)
    assert "evil.ckpt" in error.value.render()
    with pytest.raises(KstoryError, match="not found"):
        plan_loras([LoraRequest(tmp_path / "missing.safetensors")], base_unet)
