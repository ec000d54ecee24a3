"""Make ``import torchvision`` work when its compiled ops cannot load.

PyPI's only Linux torchvision wheels are CUDA builds. Next to a CPU-only torch
their ``_C`` extension fails to load (it links ``libtorch_cuda``), and
torchvision then dies at import with ``operator torchvision::nms does not
exist`` because it registers fake kernels for ops that were never defined.
DiffSynth, open_clip and Data-Juicer's image dedup all import torchvision.

The fix is narrow: before torchvision is first imported, try to load its own
extension. Only when that fails do we define the two op schemas it registers
unconditionally (``nms``, ``qnms``) and give ``nms`` a pure-PyTorch CPU kernel,
so ``torchvision.ops.nms`` still gives correct answers. On machines where the
extension loads (any matching CUDA or CPU build) nothing is touched.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from pathlib import Path

_lock = threading.RLock()
_state: dict[str, object] = {"checked": False, "patched": False, "library": None}


def _nms_cpu(dets, scores, iou_threshold: float):
    """Greedy non-maximum suppression, same contract as torchvision's kernel."""
    import torch

    if dets.numel() == 0:
        return torch.empty((0,), dtype=torch.long, device=dets.device)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    order = scores.argsort(descending=True, stable=True)
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        xx1 = torch.maximum(x1[i], x1)
        yy1 = torch.maximum(y1[i], y1)
        xx2 = torch.minimum(x2[i], x2)
        yy2 = torch.minimum(y2[i], y2)
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[i] + areas - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def _extension_loads(package_dir: Path) -> bool:
    import torch

    for candidate in sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(candidate))
            return True
        except OSError:
            return False
    return False


def ensure_torchvision_ops() -> bool:
    """Define torchvision's missing op schemas if its extension cannot load.

    Returns True when the compatibility ops were installed, False when
    torchvision is absent, already imported, or works on its own.
    """
    with _lock:
        if _state["checked"]:
            return bool(_state["patched"])
        _state["checked"] = True
        _remove_import_hook()
        if "torchvision" in sys.modules:
            return False
        spec = importlib.util.find_spec("torchvision")
        if spec is None or spec.origin is None:
            return False
        import torch

        if hasattr(torch.ops, "torchvision") and _has_op(torch, "nms"):
            return False
        if _extension_loads(Path(spec.origin).parent):
            return False
        library = torch.library.Library("torchvision", "DEF")
        for name in ("nms", "qnms"):
            if not _has_op(torch, name):
                library.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.impl("nms", _nms_cpu, "CPU")
        _state["library"] = library  # keep the registration alive
        _state["patched"] = True
        return True


def _has_op(torch_module, name: str) -> bool:
    try:
        getattr(torch_module.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


class _TorchvisionImportHook(importlib.abc.MetaPathFinder):
    """Runs :func:`ensure_torchvision_ops` right before torchvision's first import."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D401 - importlib API
        if fullname == "torchvision":
            ensure_torchvision_ops()
        return None


def _remove_import_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _TorchvisionImportHook)]


def install_import_hook() -> None:
    """Arrange for the fix to run lazily, so importing kstory stays cheap."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(finder, _TorchvisionImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionImportHook())
