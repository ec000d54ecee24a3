"""The Kolors IP-Adapter-Plus port against diffusers' own IP-Adapter loading, and the adapter's loading errors.

diffusers is the reference: its ``UNet2DConditionModel`` with Kolors' text
projection gets the adapter through its own loader (``_load_ip_adapter_weights``:
``IPAdapterPlusImageProjection`` and the IP attention processors), and its
noise prediction must equal kstory's DiffSynth UNet with the port. All weights
are random and small, in the published key layout.
"""

from __future__ import annotations

import pytest
import torch
from diffsynth.pipelines.dancer import lets_dance_xl
from PIL import Image
from safetensors.torch import save_file

from kstory.core.errors import KstoryError
from kstory.core.models import resolve_model
from kstory.core.models.tiny import TinyKolorsSpec, load_tiny_models
from kstory.story.image_encoder import encode_references, image_processor, inspect_encoder, load_image_encoder
from kstory.story.ip_adapter import (ImageKeysValues, adapter_shape, check_compatible, cross_attention_sites,
                                     identify_ip_adapter, load_resampler, read_adapter)
from kstory.story.tiny_ip_adapter import write_tiny_image_encoder, write_tiny_ip_adapter

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SPEC = TinyKolorsSpec()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The tiny adapter as the published fp16 pickle, and the tiny Kolors."""
    folder = write_tiny_ip_adapter(tmp_path_factory.mktemp("ipa") / "Kolors-IP-Adapter-Plus", pickle=True)
    return identify_ip_adapter(folder), resolve_model("tiny")


def _float(state):
    return {part: {k: v.float() for k, v in tensors.items()} for part, tensors in state.items()}


def _images():
    generator = torch.Generator().manual_seed(3)
    pixels = [(torch.rand(48, 40, 3, generator=generator) * 255).to(torch.uint8).numpy() for _ in range(2)]
    return [Image.fromarray(p) for p in pixels]


def _inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([637.0]),
        "text": torch.randn(batch, 7, SPEC.text_hidden_size, generator=generator),
        "pooled": torch.randn(batch, SPEC.text_hidden_size, generator=generator),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
    }


@torch.no_grad()
def _ours(unet, x, kwargs_list=None):
    return lets_dance_xl(unet, sample=x["sample"], timestep=x["timestep"], encoder_hidden_states=x["text"],
                         add_time_id=x["time_ids"].flatten(), add_text_embeds=x["pooled"],
                         ipadapter_kwargs_list=kwargs_list or {}, unet_batch_size=len(x["sample"]), device="cpu")


@torch.no_grad()
def _diffusers(unet, x, hidden, scale: float):
    for processor in unet.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [scale]
    added = {"text_embeds": x["pooled"], "time_ids": x["time_ids"], "image_embeds": [hidden.unsqueeze(1)]}
    return unet(x["sample"], x["timestep"], encoder_hidden_states=x["text"], added_cond_kwargs=added).sample


@pytest.fixture(scope="module")
def both(published):
    """(kstory's UNet + port, diffusers' UNet + its loader, CLIP hidden states of two references and of zeros)."""
    from kstory.submissions.parity import load_tiny_diffusers_unet

    adapter, weights = published
    state = _float(read_adapter(adapter.adapter))
    reference = load_tiny_diffusers_unet(weights)
    reference._load_ip_adapter_weights([state])
    unet = load_tiny_models(weights)["sdxl_unet"]
    sites = cross_attention_sites(unet)
    layers = ImageKeysValues(sites, SPEC.cross_attention_dim).load_published(state["ip_adapter"], adapter.adapter)
    resampler = load_resampler(state, adapter.adapter)
    encoder = load_image_encoder(adapter.encoder, "cpu", torch.float32)
    hidden, zero = encode_references(encoder, image_processor(adapter.encoder), _images())
    return unet, reference.eval(), layers, resampler, hidden, zero


def test_published_layout_is_read_as_kolors_plus(published):
    adapter, _ = published
    state = read_adapter(adapter.adapter)
    shape = adapter_shape(state, adapter.adapter)
    assert (shape.tokens, shape.depth, shape.features, shape.output) == (16, 4, 32, SPEC.cross_attention_dim)
    assert all(v.dtype == torch.float16 for part in state.values() for v in part.values())
    # the tiny UNet has 11 cross-attention layers (the real one 70): keys 1, 3, ..., 21
    assert sorted(int(k.split(".")[0]) for k in state["ip_adapter"] if "to_k_ip" in k) == list(range(1, 22, 2))
    assert inspect_encoder(adapter.encoder).hidden_size == 32


def test_clip_states_are_the_second_to_last_layer_of_577(both):
    *_, hidden, zero = both
    assert hidden.shape == (2, 577, 32) and zero.shape == (1, 577, 32)
    assert not torch.equal(hidden[0], hidden[1])


@pytest.mark.parametrize("scale", [0.5, 1.3])
def test_port_matches_diffusers_ip_adapter(both, scale):
    unet, reference, layers, resampler, hidden, _ = both
    x = _inputs()
    expected = _diffusers(reference, x, hidden, scale)
    tokens = resampler(hidden)
    assert tokens.shape == (2, 16, SPEC.cross_attention_dim)
    got = _ours(unet, x, layers.kwargs_list(tokens, torch.full((2, 1, 1, 1), scale)))
    plain = _ours(unet, x)
    assert (got - plain).abs().max() > 1e-2 * plain.abs().max()  # the adapter changes the prediction
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_the_resampler_matches_diffusers_image_projection(both):
    _, reference, _, resampler, hidden, _ = both
    expected = reference.encoder_hid_proj([hidden.unsqueeze(1)])[0][:, 0]
    torch.testing.assert_close(resampler(hidden), expected, rtol=1e-5, atol=1e-5)


def test_each_frame_keeps_its_own_tokens_and_scale(both):
    """Frame 0 at scale 0.5 and frame 1 at 1.3 in one batch: each equals diffusers at its own scale; a frame at
    scale 0 beside one with a reference gets exactly the prediction it gets without the adapter."""
    unet, reference, layers, resampler, hidden, _ = both
    x, tokens = _inputs(), resampler(hidden)
    mixed = _ours(unet, x, layers.kwargs_list(tokens, torch.tensor([0.5, 1.3]).view(2, 1, 1, 1)))
    for row, scale in ((0, 0.5), (1, 1.3)):
        expected = _diffusers(reference, x, hidden, scale)[row]
        torch.testing.assert_close(mixed[row], expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    off = _ours(unet, x, layers.kwargs_list(tokens, torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)))
    assert torch.equal(off[0], _ours(unet, x)[0])


def test_negative_tokens_come_from_an_all_zero_input(both):
    _, _, _, resampler, hidden, zero = both
    assert not torch.allclose(resampler(zero), resampler(hidden[:1]))
    encoder_states = zero[0]
    assert torch.isfinite(encoder_states).all()


# --- bad input ------------------------------------------------------------------------------------------------


def test_sdxl_adapter_is_named_not_shape_dumped(tmp_path, published):
    adapter, _ = published
    folder = tmp_path / "sdxl"
    (folder / "image_encoder").mkdir(parents=True)
    save_file({"image_proj.proj.weight": torch.zeros(4 * 2048, 1280), "image_proj.proj.bias": torch.zeros(4 * 2048),
               "image_proj.norm.weight": torch.ones(2048), "image_proj.norm.bias": torch.zeros(2048),
               "ip_adapter.1.to_k_ip.weight": torch.zeros(640, 2048)}, str(folder / "ip-adapter_sdxl.safetensors"))
    write_tiny_image_encoder(folder / "image_encoder")
    found = identify_ip_adapter(folder)
    with pytest.raises(KstoryError, match="4 image tokens .*ViT-bigG.*this is the SDXL IP-Adapter"):
        adapter_shape(read_adapter(found.adapter), found.adapter)


def test_wrong_image_encoder_is_named(published):
    adapter, _ = published
    shape = adapter_shape(read_adapter(adapter.adapter), adapter.adapter)
    unet = load_tiny_models(published[1])["sdxl_unet"]
    sites = cross_attention_sites(unet)
    with pytest.raises(KstoryError, match="wrong image encoder: it gives 1664-wide features \\(ViT-bigG/14"):
        check_compatible(shape, 1664, 48, sites, SPEC.cross_attention_dim, adapter.adapter, adapter.encoder)
    with pytest.raises(KstoryError, match="image keys/values for 11 cross-attention layers, this UNet has 70"):
        check_compatible(shape, 32, 3, (sites * 7)[:70], SPEC.cross_attention_dim, adapter.adapter,
                         adapter.encoder)
    check_compatible(shape, 32, 3, sites, SPEC.cross_attention_dim, adapter.adapter, adapter.encoder)


def test_unsafe_or_broken_files_are_refused(tmp_path, published):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    folder = tmp_path / "evil"
    (folder / "image_encoder").mkdir(parents=True)
    torch.save({"image_proj": {"x": Payload()}, "ip_adapter": {}}, folder / "ip_adapter_plus_general.bin",
               pickle_module=pickle)
    found = identify_ip_adapter(folder)
    with pytest.raises(KstoryError, match="refusing a pickle that does not load with weights_only=True"):
        read_adapter(found.adapter)
    (folder / "ip_adapter_plus_general.bin").write_bytes(b"not a zip")
    with pytest.raises(KstoryError, match="refusing a pickle"):
        read_adapter(found.adapter)
    with pytest.raises(KstoryError, match="IP-Adapter not found"):
        identify_ip_adapter(tmp_path / "nowhere")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "ip_adapter_plus_general.bin").write_bytes(b"")
    with pytest.raises(KstoryError, match="no image_encoder/ folder"):
        identify_ip_adapter(bare)
