"""The Kolors IP-Adapter-FaceID-Plus port against diffusers, its token path, and its errors.

diffusers is the reference where it can express Kolors' FaceID-Plus: its own
loader converts the published keys into ``IPAdapterFaceIDPlusImageProjection``
and the IP attention processors (its loader fixes the token count at 4, the
SDXL FaceID-Plus value; Kolors' adapter has 6, so the test passes 6), and the
face tokens pass through the UNet's Kolors text projection as the official
pipeline routes them. All weights are random and small, in the published layout.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffsynth.pipelines.dancer import lets_dance_xl
from PIL import Image

from kstory.core.errors import KstoryError
from kstory.core.models import resolve_model
from kstory.core.models.tiny import TinyKolorsSpec, load_tiny_models
from kstory.story.face_adapter import (check_embedding, check_face_compatible, face_keys_values, face_shape,
                                       face_tokens, identify_face_adapter, load_face_projection,
                                       negative_face_tokens, read_face_adapter)
from kstory.story.face_detect import detect_face, load_embedding, load_face_analysis, square_box
from kstory.story.image_encoder import encode_references, image_processor, load_image_encoder
from kstory.story.tiny_face_adapter import write_tiny_face_adapter
from kstory.story.tiny_ip_adapter import write_tiny_ip_adapter

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SPEC = TinyKolorsSpec()


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    folder = write_tiny_face_adapter(tmp_path_factory.mktemp("faceid") / "Kolors-IP-Adapter-FaceID-Plus")
    return identify_face_adapter(folder), resolve_model("tiny")


def _crops():
    generator = torch.Generator().manual_seed(4)
    return [Image.fromarray((torch.rand(336, 336, 3, generator=generator) * 255).to(torch.uint8).numpy())
            for _ in range(2)]


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


@pytest.fixture(scope="module")
def both(published):
    """(kstory's UNet, diffusers' UNet with the FaceID-Plus loaded by its loader, projection, layers, inputs)."""
    from diffusers.loaders import unet as unet_loader
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    from kstory.submissions.parity import load_tiny_diffusers_unet

    adapter, weights = published
    state = {part: {k: v.float() for k, v in tensors.items()} for part, tensors in read_face_adapter(adapter.adapter).items()}
    reference = load_tiny_diffusers_unet(weights)
    with pytest.MonkeyPatch.context() as patch:  # Kolors' FaceID-Plus has 6 tokens; diffusers' loader assumes 4
        patch.setattr(unet_loader, "IPAdapterFaceIDPlusImageProjection",
                      functools.partial(IPAdapterFaceIDPlusImageProjection, num_tokens=6))
        reference._load_ip_adapter_weights([state])
    projection_layer = reference.encoder_hid_proj.image_projection_layers[0]
    projection_layer.shortcut = True  # the official pipeline's default (scale 1)
    # the official routing: face tokens go through Kolors' text projection before the cross-attention layers
    reference.encoder_hid_proj.image_projection_layers[0] = torch.nn.Sequential(projection_layer,
                                                                              reference.text_encoder_hid_proj)
    unet = load_tiny_models(weights)["sdxl_unet"]
    encoder = load_image_encoder(adapter.encoder, "cpu", torch.float32)
    hidden, _ = encode_references(encoder, image_processor(adapter.encoder), _crops())
    embedding = torch.randn(2, 512, generator=torch.Generator().manual_seed(9))
    projection = load_face_projection(state, adapter.adapter)
    layers = face_keys_values(state, unet, adapter.adapter)
    return unet, reference.eval(), projection_layer, projection, layers, embedding, hidden


@torch.no_grad()
def _diffusers(both, x, scale):
    _, reference, projection_layer, _, _, embedding, hidden = both
    for processor in reference.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [scale]
    projection_layer.clip_embeds = hidden.unsqueeze(1)
    added = {"text_embeds": x["pooled"], "time_ids": x["time_ids"], "image_embeds": [embedding.unsqueeze(1)]}
    return reference(x["sample"], x["timestep"], encoder_hidden_states=x["text"], added_cond_kwargs=added).sample


def test_published_layout_is_read_as_kolors_faceid_plus(published):
    adapter, _ = published
    state = read_face_adapter(adapter.adapter)  # the .bin's "adapter_modules" become the UNet part
    shape = face_shape(state, adapter.adapter)
    assert (shape.embedding, shape.tokens, shape.depth, shape.width, shape.features) == (512, 6, 4, 32, 32)
    assert shape.layers == 11 and all(v.dtype == torch.float16 for part in state.values() for v in part.values())
    assert adapter.record()["kind"] == "kolors-ip-adapter-faceid-plus" and len(adapter.sha256) == 64


def test_the_projection_matches_diffusers_faceid_plus(both):
    _, _, projection_layer, projection, _, embedding, hidden = both
    projection_layer.clip_embeds = hidden.unsqueeze(1)
    expected = projection_layer(embedding)
    got = projection(embedding, hidden)
    assert got.shape == (2, 6, SPEC.text_hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [0.8, 1.5])
def test_port_matches_diffusers_with_kolors_routing(both, scale):
    unet, _, _, projection, layers, embedding, hidden = both
    x = _inputs()
    tokens = face_tokens(projection, unet, embedding, hidden)
    assert tokens.shape == (2, 6, SPEC.cross_attention_dim)  # after the text projection
    got = _ours(unet, x, layers.kwargs_list(tokens, torch.full((2, 1, 1, 1), scale)))
    expected = _diffusers(both, x, scale)
    plain = _ours(unet, x)
    assert (got - plain).abs().max() > 1e-2 * plain.abs().max()  # the face tokens change the prediction
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_scale_zero_is_bit_identical_to_no_faceid(both):
    unet, _, _, projection, layers, embedding, hidden = both
    x = _inputs()
    tokens = face_tokens(projection, unet, embedding, hidden)
    mixed = _ours(unet, x, layers.kwargs_list(tokens, torch.tensor([0.0, 0.8]).view(2, 1, 1, 1)))
    plain = _ours(unet, x)
    assert torch.equal(mixed[0], plain[0])
    assert not torch.equal(mixed[1], plain[1])


def test_negative_branch_is_zero_embedding_and_zero_features(both):
    unet, _, _, projection, _, embedding, hidden = both
    negative = negative_face_tokens(projection, unet, embedding[:1], hidden[:1])
    expected = unet.text_intermediate_proj(projection(torch.zeros(1, 512), torch.zeros_like(hidden[:1])))
    assert torch.equal(negative, expected)
    assert not torch.allclose(negative, face_tokens(projection, unet, embedding[:1], hidden[:1]))


# --- bad input ------------------------------------------------------------------------------------------------


def test_a_plus_adapter_or_wrong_sizes_are_named(tmp_path, published):
    adapter, weights = published
    plus = write_tiny_ip_adapter(tmp_path / "plus")
    state = read_face_adapter(plus / "ip_adapter_plus_general.safetensors")
    with pytest.raises(KstoryError, match="this is the IP-Adapter-Plus .*character.reference.adapter"):
        face_shape(state, plus)
    face = read_face_adapter(adapter.adapter)
    shape = face_shape(face, adapter.adapter)
    unet = load_tiny_models(weights)["sdxl_unet"]
    with pytest.raises(KstoryError, match="wrong face image encoder: it gives 1664-wide features"):
        check_face_compatible(shape, unet, 1664, adapter.adapter, adapter.encoder)
    from dataclasses import replace

    with pytest.raises(KstoryError, match="4096-wide face tokens, this UNet's text projection takes 32"):
        check_face_compatible(replace(shape, width=4096), unet, 32, adapter.adapter, adapter.encoder)
    with pytest.raises(KstoryError, match="face keys/values for 70 cross-attention layers, this UNet has 11"):
        check_face_compatible(replace(shape, layers=70), unet, 32, adapter.adapter, adapter.encoder)
    check_face_compatible(shape, unet, 32, adapter.adapter, adapter.encoder)
    with pytest.raises(KstoryError, match=r"shape \(1, 128\), the adapter needs one 512-d insightface antelopev2"):
        check_embedding(torch.zeros(1, 128), shape, "face.npy")
    assert check_embedding(torch.zeros(512), shape, "face.npy").shape == (1, 512)


def test_unsafe_or_missing_files_are_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    folder = tmp_path / "evil"
    (folder / "clip-vit-large-patch14-336").mkdir(parents=True)
    torch.save({"image_proj": {"x": Payload()}}, folder / "ipa-faceid-plus.bin", pickle_module=pickle)
    with pytest.raises(KstoryError, match="refusing a pickle that does not load with weights_only=True"):
        read_face_adapter(identify_face_adapter(folder).adapter)
    with pytest.raises(KstoryError, match="IP-Adapter-FaceID-Plus not found"):
        identify_face_adapter(tmp_path / "nowhere")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "ipa-faceid-plus.bin").write_bytes(b"")
    with pytest.raises(KstoryError, match="no clip-vit-large-patch14-336/ folder"):
        identify_face_adapter(bare)
    np.save(tmp_path / "names.npy", np.array(["a", "b"]))
    with pytest.raises(KstoryError, match="names.npy: the face embedding holds <U1 values"):
        load_embedding(tmp_path / "names.npy")
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    with pytest.raises(KstoryError, match="broken.npy: the face embedding cannot be read"):
        load_embedding(tmp_path / "broken.npy")


def test_without_insightface_the_error_names_what_to_install_and_download(tmp_path, monkeypatch):
    try:
        import insightface  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("insightface is installed here: the missing-package path cannot be reached")
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "insightface"))
    with pytest.raises(KstoryError) as caught:
        load_face_analysis()
    text = str(caught.value)
    assert "detecting a face needs insightface" in text and "pip install insightface onnxruntime" in text
    assert str(tmp_path / "insightface" / "models" / "antelopev2") in text
    with pytest.raises(KstoryError, match="needs insightface"):
        detect_face(Image.new("RGB", (64, 64)), tmp_path / "person.png")


def test_the_largest_face_is_cropped_square_at_336(tmp_path):
    """The crop rule on a detector's answer, shaped as insightface's ``FaceAnalysis.get`` returns it (insightface
    itself is not installed here, so its answer is written out)."""
    class Found(dict):
        pass

    small = Found(bbox=np.array([0.0, 0.0, 10.0, 10.0]), embedding=np.zeros(512, np.float32))
    large = Found(bbox=np.array([20.0, 10.0, 60.0, 70.0]), embedding=np.ones(512, np.float32))

    class Detector:
        def get(self, bgr):
            assert bgr.shape == (80, 100, 3)
            return [small, large]

    image = Image.fromarray(np.arange(80 * 100 * 3, dtype=np.uint8).reshape(80, 100, 3))
    embedding, crop = detect_face(image, tmp_path / "p.png", app=Detector())
    assert embedding.shape == (512,) and embedding[0] == 1.0
    assert crop.size == (336, 336)
    assert square_box((20.0, 10.0, 60.0, 70.0)) == (10.0, 10.0, 70.0, 70.0)
    with pytest.raises(KstoryError, match="p.png: insightface found no face"):
        detect_face(image, tmp_path / "p.png", app=type("None_", (), {"get": lambda self, bgr: []})())
