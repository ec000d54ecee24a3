"""Load the Kolors UNet with its transformer-block Linears quantised as each weight arrives.

Loading the whole UNet in the run's dtype and quantising afterwards
(``quantize_unet``) holds all of it (5.1 GB in bf16 at full size) before it
shrinks to about 2.9 GB. Here the UNet is built empty on the meta device, as
DiffSynth builds it; DiffSynth's own ``from_diffusers`` converter is run over
placeholders that carry only a name and a shape, which says where each file
tensor goes without reading any; then the file is read window by window, each
tensor is assigned as it arrives, and each transformer-block Linear is
quantised as soon as its weight is in. The host holds the int8 Linears, the
rest in the run's dtype, one window of the file and one Linear's weight in
transit. Every 16 MiB of weights quantised, the C heap's freed pages go back to
the system (``kstory.core.heap``): glibc keeps the holes the dropped weights
leave between the int8 ones resident otherwise, and the footprint would grow
as if nothing had been dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffsynth.models.utils import init_weights_on_device

from kstory.core.errors import KstoryError
from kstory.core.heap import trim_heap
from kstory.core.models.quantize import in_transformer_block, quantize_linear, unet_quant_config
from kstory.core.models.tensor_files import WINDOW_BYTES, iter_tensors, tensor_shapes

TRIM_EVERY_BYTES = 16 * 2**20  # half-precision weights quantised and dropped between two heap trims


@dataclass(frozen=True)
class _Placeholder:
    """A file tensor as DiffSynth's converter sees it here: a name and a shape (it only renames and squeezes)."""

    name: str
    shape: tuple[int, ...]
    squeezed: bool = False

    def squeeze(self) -> _Placeholder:
        return _Placeholder(self.name, tuple(size for size in self.shape if size != 1), squeezed=True)


def converted_names(model_class: type, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """DiffSynth's ``from_diffusers`` for ``model_class`` over placeholders: (target name -> placeholder, init kwargs).

    Each placeholder names its source tensor and whether the converter squeezed it.
    """
    placeholders = {name: _Placeholder(name, shape) for name, shape in shapes.items()}
    result = model_class.state_dict_converter().from_diffusers(placeholders)
    return result if isinstance(result, tuple) else (result, {})


def load_quantised_unet(path: Path | str, model_class: type, torch_dtype: torch.dtype, mode: str,
                        device: str = "cpu", window_bytes: int = WINDOW_BYTES,
                        shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[torch.nn.Module, int]:
    """``model_class`` (DiffSynth's ``SDXLUNet``) built from the diffusers-layout file ``path``, quantised while
    loading; returns the model and how many Linears were quantised. ``shapes``: the file's header, if read."""
    targets, extra = converted_names(model_class, shapes if shapes is not None else tensor_shapes(path))
    with init_weights_on_device():
        model = model_class(**extra).eval()
    count = fill_quantised(model, path, torch_dtype, mode, window_bytes, targets=targets)
    if torch.device(device).type != "cpu":
        model.to(device=device)
    return model, count


def fill_quantised(model: torch.nn.Module, path: Path | str, torch_dtype: torch.dtype, mode: str,
                   window_bytes: int = WINDOW_BYTES, targets: dict[str, Any] | None = None) -> int:
    """Assign the tensors of ``path`` into ``model`` (built on meta), quantising each transformer-block Linear
    (with ``quantize_unet``'s config) once its weight is in; returns how many were quantised.

    Each module takes its tensors through ``load_state_dict(assign=True)``, as DiffSynth loads the whole
    model, once all of them have been read. ``targets``: :func:`converted_names`' mapping, if already made.
    """
    config = unet_quant_config(mode)
    if targets is None:
        targets, _ = converted_names(type(model), tensor_shapes(path))
    _check_targets(targets, model.state_dict(), path)
    source_to_target = {placeholder.name: (target, placeholder.squeezed) for target, placeholder in targets.items()}
    owned: dict[str, int] = {}
    for target in targets:
        owner = target.rpartition(".")[0]
        owned[owner] = owned.get(owner, 0) + 1
    modules = dict(model.named_modules())
    pending: dict[str, dict[str, torch.Tensor]] = {}
    count, dropped = 0, 0
    for key, tensor in iter_tensors(path, torch_dtype, window_bytes):
        target, squeezed = source_to_target[key]
        owner, _, leaf = target.rpartition(".")
        arrived = pending.setdefault(owner, {})
        arrived[leaf] = tensor.squeeze() if squeezed else tensor
        del tensor
        if len(arrived) < owned[owner]:
            continue
        module = modules[owner]
        module.load_state_dict(pending.pop(owner), strict=False, assign=True)
        if config is not None and in_transformer_block(module, owner):
            dropped += module.weight.nbytes
            quantize_linear(module, config)
            count += 1
            if dropped >= TRIM_EVERY_BYTES:  # the dropped weights' holes would otherwise stay resident
                trim_heap()
                dropped = 0
    return count


def _check_targets(targets: dict[str, Any], expected: dict[str, torch.Tensor], path: Path | str) -> None:
    """The converted names and shapes must be exactly the model's, as ``load_state_dict(strict=True)`` demands."""
    missing, unexpected = sorted(set(expected) - set(targets)), sorted(set(targets) - set(expected))
    wrong = sorted(name for name in set(targets) & set(expected)
                   if tuple(targets[name].shape) != tuple(expected[name].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                           for label, names in (("missing", missing), ("unexpected", unexpected),
                                                ("other shape", wrong)) if names)
        raise KstoryError(f"this UNet file does not fit the Kolors UNet ({detail})", path=path,
                          fix="use the published Kolors unet file unchanged, or set unet_quant: none")
