"""The Kolors-ControlNet port against diffusers' own ControlNetModel, and ControlNet loading errors.

diffusers is a test-only dependency: it is the reference the port must match.
All weights are random and small; the zero-initialised output convolutions
are randomised too, or every residual would trivially be zero.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from kstory.core.errors import KstoryError
from kstory.story.controlnet_kolors import WEIGHTS_NAME, KolorsControlNetConfig, load_kolors_controlnet
from kstory.story.controlnet_union import load_union_controlnet
from kstory.story.controlnets import identify
from kstory.story.tiny import build_tiny_controlnets, tiny_kolors_controlnet_config

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = tiny_kolors_controlnet_config()
# A second layout: conv projections, one layer per block, deeper attention, BGR input, pooled residuals.
VARIANT = replace(
    TINY, layers_per_block=1, use_linear_projection=False, transformer_layers=(1, 2, 1), heads=(1, 1, 2),
    bgr=True, global_pool=True, conditioning_embedding_out_channels=(16, 16, 32, 32),
)


def _random_diffusers_controlnet(config: KolorsControlNetConfig, tmp_path):
    model = diffusers.ControlNetModel.from_config(config.to_diffusers())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    folder = tmp_path / "controlnet"
    model.save_pretrained(folder)
    return model.eval(), folder


def _inputs(config: KolorsControlNetConfig, batch: int = 2, size: int = 64):
    generator = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(batch, 4, size // 8, size // 8, generator=generator),
        "timestep": torch.tensor([637.0]),
        "hidden": torch.randn(batch, 256, config.encoder_hid_dim, generator=generator),
        "pooled": torch.randn(batch, config.encoder_hid_dim, generator=generator),
        "cond": torch.rand(batch, 3, size, size, generator=generator),
        "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32),
    }


@torch.no_grad()
def _reference(model, x) -> list[torch.Tensor]:
    """diffusers' residuals as the Kolors pipeline gets them: the ControlNet projects the ChatGLM states itself."""
    down, mid = model(
        x["sample"], x["timestep"], encoder_hidden_states=model.encoder_hid_proj(x["hidden"]),
        controlnet_cond=x["cond"], added_cond_kwargs={"text_embeds": x["pooled"], "time_ids": x["time_ids"]},
        return_dict=False,
    )
    return [*down, mid]


@torch.no_grad()
def _ours(model, x) -> list[torch.Tensor]:
    return model(x["sample"], x["timestep"], x["hidden"], x["cond"],
                 add_time_id=x["time_ids"].flatten(), add_text_embeds=x["pooled"])


@pytest.mark.parametrize("config", [TINY, VARIANT], ids=["kolors-layout", "variant-layout"])
def test_port_matches_diffusers_controlnet_residuals(tmp_path, config):
    reference_model, folder = _random_diffusers_controlnet(config, tmp_path)
    port = load_kolors_controlnet(folder)
    x = _inputs(config)
    expected, got = _reference(reference_model, x), _ours(port, x)
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert a.shape == b.shape
        assert a.abs().max() > 0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def test_tiny_kolors_controlnet_is_a_valid_diffusers_folder(tmp_path):
    folder = build_tiny_controlnets()["pose"]
    reference_model, info = diffusers.ControlNetModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = _inputs(TINY, batch=1)
    for a, b in zip(_reference(reference_model.eval(), x), _ours(load_kolors_controlnet(folder), x)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


def test_tiny_union_loads_through_diffsynths_converter(tmp_path):
    paths = build_tiny_controlnets()
    assert identify("union", paths["union"]).kind == "union"
    assert identify("pose", paths["pose"]).kind == "kolors"
    model = load_union_controlnet(paths["union"])
    assert type(model).__name__ == "SDXLControlNetUnion"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_unknown_layouts_are_refused(tmp_path):
    paths = build_tiny_controlnets()
    config = json.loads((paths["canny"] / "config.json").read_text())

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / WEIGHTS_NAME).write_bytes((paths["canny"] / WEIGHTS_NAME).read_bytes())
    (odd / "config.json").write_text(json.dumps({**config, "addition_embed_type": None}))
    with pytest.raises(KstoryError, match="unknown ControlNet layout: config.json has addition_embed_type=None"):
        load_kolors_controlnet(odd)

    (odd / "config.json").write_text(json.dumps({**config, "block_out_channels": [32, 64, 128]}))
    with pytest.raises(KstoryError, match="unknown ControlNet layout .*wrong shape"):
        load_kolors_controlnet(odd)

    stray = tmp_path / "stray.safetensors"
    save_file({"weight": torch.zeros(2)}, str(stray))
    with pytest.raises(KstoryError, match="unknown layout"):
        identify("x", stray)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KstoryError, match="unknown layout"):
        identify("x", tmp_path / "empty")
