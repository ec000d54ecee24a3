"""unet_quant int8 while loading: each transformer-block Linear becomes integer as its weight is read.

The streamed load must give exactly the UNet that loading it whole and then
running ``quantize_unet`` gives, while never holding all the half-precision
transformer-block weights at once.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import kstory  # noqa: F401  (before anything that imports torchvision/diffsynth)
import pytest
import torch
from diffsynth.models.model_manager import ModelManager
from diffsynth.models.sdxl_unet import SDXLUNet
from diffsynth.models.utils import init_weights_on_device
from torchao.utils import TorchAOBaseTensor

from kstory.core.errors import KstoryError
from kstory.core.models.pipeline import _streamable_unet, load_kolors_model_manager
from kstory.core.models.quantize import in_transformer_block, quantize_unet
from kstory.core.models.random_full import kolors_entries, write_random_kolors
from kstory.core.models.resolve import resolve_model
from kstory.core.models.tensor_files import WINDOW_BYTES, read_tensors, tensor_shapes
from kstory.core.models.tiny import KOLORS_SPEC, TinyKolorsSpec, from_diffusers, tiny_unet
from kstory.core.models.unet_int8_load import TRIM_EVERY_BYTES, converted_names, fill_quantised
from kstory.core.models.weights import KolorsWeights

DTYPE = torch.bfloat16
# Two transformer blocks at the second level, three at the third (the tests read it in many small windows).
SMALL = replace(TinyKolorsSpec(), unet_channels=(32, 64, 96), unet_transformer_depth=(2, 3))
# A few hundred MB in bf16, 70% of it in transformer-block Linears: the saving stands well above the noise.
BIG = replace(TinyKolorsSpec(), unet_channels=(128, 256, 512), unet_head_dim=64, unet_transformer_depth=(2, 4),
              cross_attention_dim=512, addition_time_embed_dim=64)


def _unet_file(root: Path, spec: TinyKolorsSpec) -> Path:
    """A random-weight Kolors at ``spec``'s widths in the Kwai-Kolors/Kolors layout (diffusers UNet keys, fp16)."""
    write_random_kolors(root, spec, layout="official")
    return root / "unet" / "diffusion_pytorch_model.safetensors"


def _empty_unet(spec: TinyKolorsSpec) -> SDXLUNet:
    with torch.device("meta"):
        unet, _ = tiny_unet(spec)
    return unet.eval()


def _load_then_quantize(path: Path, spec: TinyKolorsSpec, window_bytes: int = WINDOW_BYTES) -> tuple[SDXLUNet, int]:
    """The whole UNet read and converted (DiffSynth's converter, ``load_state_dict(assign=True)``), then quantised."""
    unet = _empty_unet(spec)
    converted, _ = from_diffusers(unet, read_tensors(path, DTYPE, window_bytes))
    unet.load_state_dict(converted, assign=True)
    return unet, quantize_unet(unet, "int8")


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _unet_file(tmp_path_factory.mktemp("small") / "kolors", SMALL)


def _quantised(unet: torch.nn.Module) -> set[str]:
    return {name for name, module in unet.named_modules()
            if isinstance(getattr(module, "weight", None), TorchAOBaseTensor)}


def test_streamed_int8_equals_load_then_quantize_bit_for_bit(small_file: Path) -> None:
    whole, whole_count = _load_then_quantize(small_file, SMALL)
    streamed = _empty_unet(SMALL)
    count = fill_quantised(streamed, small_file, DTYPE, "int8", window_bytes=256 * 2**10)  # many windows

    assert count == whole_count > 0
    assert _quantised(streamed) == _quantised(whole)
    assert all(in_transformer_block(module, name) for name, module in streamed.named_modules()
               if name in _quantised(streamed))
    ours, theirs = streamed.state_dict(), whole.state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        mine = ours[key]
        assert type(mine) is type(tensor) and mine.dtype == tensor.dtype, key
        if isinstance(tensor, TorchAOBaseTensor):
            assert torch.equal(mine.qdata, tensor.qdata) and torch.equal(mine.scale, tensor.scale), key
            assert torch.equal(mine.dequantize(), tensor.dequantize()), key
        else:
            assert not mine.is_meta and torch.equal(mine, tensor), key
    assert ([p.requires_grad for p in streamed.parameters()] == [p.requires_grad for p in whole.parameters()])

    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        sample=torch.randn(2, 4, 8, 8, generator=generator).to(DTYPE), timestep=torch.tensor([500.0, 50.0]),
        encoder_hidden_states=torch.randn(2, 7, SMALL.text_hidden_size, generator=generator).to(DTYPE),
        add_text_embeds=torch.randn(2, SMALL.text_hidden_size, generator=generator).to(DTYPE),
        add_time_id=torch.tensor([64, 64, 0, 0, 64, 64] * 2),
    )
    with torch.no_grad():
        out_streamed, out_whole = streamed(**inputs), whole(**inputs)
    assert out_streamed.dtype == DTYPE and torch.isfinite(out_streamed).all()
    assert torch.equal(out_streamed, out_whole)


def test_a_file_that_does_not_fit_the_model_is_refused_naming_it(small_file: Path) -> None:
    with pytest.raises(KstoryError, match="does not fit the Kolors UNet") as error:
        fill_quantised(_empty_unet(replace(SMALL, unet_transformer_depth=(1, 3))), small_file, DTYPE, "int8")
    assert error.value.path == small_file and "unexpected" in error.value.message


def test_the_full_size_kolors_unet_file_takes_the_streamed_load() -> None:
    """DiffSynth's detector recognises the published Kolors UNet by names and shapes alone (none read), and its
    converter's names fit ``SDXLUNet(is_kolors=True)`` exactly: built on meta, nothing allocated."""
    shapes = {entry.name: entry.shape for entry in kolors_entries(KOLORS_SPEC)["unet"][0]}
    manager = ModelManager(torch_dtype=DTYPE, device="cpu")
    assert _streamable_unet(manager, "unet.safetensors", shapes) is SDXLUNet
    targets, extra = converted_names(SDXLUNet, shapes)
    assert extra == {"is_kolors": True}
    with init_weights_on_device():
        unet = SDXLUNet(**extra)
    expected = {name: tuple(tensor.shape) for name, tensor in unet.state_dict().items()}
    assert {name: tuple(placeholder.shape) for name, placeholder in targets.items()} == expected
    assert len({placeholder.name for placeholder in targets.values()}) == len(shapes)


def test_other_files_keep_the_whole_load_and_an_unrecognised_one_is_still_refused(
        small_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shapes = tensor_shapes(small_file)
    assert shapes == {entry.name: entry.shape for entry in kolors_entries(SMALL)["unet"][0]}
    manager = ModelManager(torch_dtype=DTYPE, device="cpu")
    assert _streamable_unet(manager, str(small_file), shapes) is None  # DiffSynth knows no such UNet

    root = small_file.parent.parent
    weights = KolorsWeights(root=root, text_encoder=root / "text_encoder", unet=small_file,
                            vae=root / "vae" / "diffusion_pytorch_model.safetensors", identity="reduced",
                            is_tiny=False, fingerprint="reduced")
    with pytest.raises(KstoryError, match="did not recognise this file as a Kolors unet"):
        load_kolors_model_manager(weights, torch_dtype=DTYPE, parts=("unet",), unet_quant="int8")
    with pytest.raises(KstoryError, match="unknown unet_quant 'int4'"):
        load_kolors_model_manager(weights, torch_dtype=DTYPE, parts=("unet",), unet_quant="int4")

    tiny = resolve_model("tiny", tmp_path / "cache")  # built at tiny width: loaded whole, then quantised
    with caplog.at_level(logging.INFO, logger="kstory"):
        manager = load_kolors_model_manager(tiny, torch_dtype=DTYPE, parts=("unet",), unet_quant="int8")
    unet = manager.model[manager.model_name.index("sdxl_unet")]
    reference, _ = _load_then_quantize(tiny.unet, TinyKolorsSpec())
    assert _quantised(unet) == _quantised(reference) != set()
    assert "stored as int8 (QLoRA-style), after loading" in caplog.text


_PEAK = r"""
import json, sys
import kstory
import torch
from kstory.core.models.quantize import quantize_unet
from kstory.core.models.tiny import TinyKolorsSpec
from kstory.core.models.unet_int8_load import fill_quantised
from tests.test_unet_quant_load import DTYPE, _empty_unet, _load_then_quantize
def status(field):  # this process's own numbers (ru_maxrss keeps the parent's peak across exec)
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024
path, way, spec, window = sys.argv[1], sys.argv[2], TinyKolorsSpec.from_json(json.loads(sys.argv[3])), int(sys.argv[4])
torch.set_num_threads(1)
quantize_unet(torch.nn.Sequential(torch.nn.Linear(64, 64)), "int8")  # torchao's imports and setup, not counted
base = status("VmRSS")
if way == "streamed":
    fill_quantised(_empty_unet(spec), path, DTYPE, "int8", window_bytes=window)
else:
    _load_then_quantize(path, spec, window_bytes=window)
print(status("VmHWM") - base)
"""


def test_streaming_never_holds_all_the_half_precision_block_weights(tmp_path: Path) -> None:
    """Loading whole holds every bf16 weight before quantising; streaming holds the int8 Linears instead.

    The whole load peaks at the bf16 model at least. The streamed one ends at
    the model less half its block weights (one byte each instead of two); its
    peak adds one file window and what the weights dropped since the last heap
    trim left (their fp16 read, bf16 copy and torchao's float32 work: four
    times ``TRIM_EVERY_BYTES`` at most).
    """
    path = _unet_file(tmp_path / "kolors", BIG)
    unet = _empty_unet(BIG)
    whole_bytes = sum(p.numel() for p in unet.parameters()) * 2
    block_bytes = sum(m.weight.numel() for name, m in unet.named_modules() if in_transformer_block(m, name)) * 2
    assert block_bytes > 256 * 2**20, block_bytes  # a saving well above allocator noise
    window = 16 * 2**20
    peaks = {}
    for way in ("streamed", "whole"):
        run = subprocess.run([sys.executable, "-c", _PEAK, str(path), way, json.dumps(BIG.to_json()), str(window)],
                             capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
        peaks[way] = int(run.stdout.strip().splitlines()[-1])
    assert peaks["whole"] >= whole_bytes, (peaks, whole_bytes)
    bound = whole_bytes - block_bytes / 2 + window + 4 * TRIM_EVERY_BYTES
    assert peaks["streamed"] < bound, (peaks, bound)
    assert peaks["whole"] - peaks["streamed"] > block_bytes / 2 - window - 4 * TRIM_EVERY_BYTES, peaks


class _SmallKolorsUNet:
    """DiffSynth's SDXLUNet at SMALL's widths wherever the loader would build the full-size one (DiffSynth's
    detectors know only the published sizes; the converter is DiffSynth's own)."""

    state_dict_converter = SDXLUNet.state_dict_converter

    def __new__(cls, **extra):
        return tiny_unet(SMALL)[0]


def test_the_loader_streams_a_recognised_unet_into_the_manager(small_file: Path, monkeypatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """``load_kolors_model_manager(..., unet_quant="int8")`` on a file the detectors take for the Kolors UNet:
    the streamed branch builds, fills and registers it as the whole load would, with the same numbers."""
    from kstory.core.models import pipeline

    monkeypatch.setattr(pipeline, "_streamable_unet", lambda manager, path, shapes: _SmallKolorsUNet)
    root = small_file.parent.parent
    weights = KolorsWeights(root=root, text_encoder=root / "text_encoder", unet=small_file,
                            vae=root / "vae" / "diffusion_pytorch_model.safetensors", identity="reduced",
                            is_tiny=False, fingerprint="reduced")
    with caplog.at_level(logging.INFO, logger="kstory"):
        manager = load_kolors_model_manager(weights, torch_dtype=DTYPE, parts=("unet",), unet_quant="int8")
    assert manager.model_name == ["sdxl_unet"] and manager.model_path == [str(small_file)]
    assert "stored as int8 (QLoRA-style), each as it was read" in caplog.text
    unet = manager.fetch_model("sdxl_unet")
    whole, count = _load_then_quantize(small_file, SMALL)
    assert len(_quantised(unet)) == count and _quantised(unet) == _quantised(whole)
    ours, theirs = unet.state_dict(), whole.state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        mine = ours[key]
        same = (torch.equal(mine.dequantize(), tensor.dequantize()) if isinstance(tensor, TorchAOBaseTensor)
                else not mine.is_meta and torch.equal(mine, tensor))
        assert same, key
