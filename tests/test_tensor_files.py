"""Weights read window by window: the same tensors, converted as read, with the file never mapped whole."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kstory  # noqa: F401  (before anything that imports torchvision/diffsynth)
import torch
from safetensors.torch import load_file, save_file

from kstory.core.models.tensor_files import _windows, read_tensors


def test_windows_cover_every_key_once_in_order() -> None:
    sizes = {"a": 60, "b": 50, "c": 200, "d": 10, "e": 10}
    windows = list(_windows(sizes, 100))
    assert windows == [["a"], ["b"], ["c"], ["d", "e"]]
    assert [key for window in windows for key in window] == list(sizes)


def test_read_tensors_equals_the_whole_file_read_and_converts(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    stored = {f"block.{i}.weight": torch.randn(32, 48, generator=generator).half() for i in range(9)}
    stored["step"] = torch.arange(7, dtype=torch.int64)
    path = tmp_path / "weights.safetensors"
    save_file(stored, str(path))
    whole = load_file(str(path))
    as_stored = read_tensors(path, window_bytes=4096)  # several windows
    assert set(as_stored) == set(whole)
    for key, tensor in whole.items():
        assert as_stored[key].dtype == tensor.dtype and torch.equal(as_stored[key], tensor)
    converted = read_tensors(path, torch.bfloat16, window_bytes=4096)
    assert converted["block.3.weight"].dtype == torch.bfloat16
    assert torch.equal(converted["block.3.weight"], whole["block.3.weight"].to(torch.bfloat16))


_PEAK = r"""
import sys
import torch
from kstory.core.models.tensor_files import read_tensors
from safetensors.torch import load_file
def status(field):  # this process's own numbers (ru_maxrss keeps the parent's peak across exec)
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024
base = status("VmRSS")
tensors = read_tensors(sys.argv[1], torch.bfloat16, window_bytes=64 * 2**20) if sys.argv[2] == "windows" else {
    k: v.to(torch.bfloat16) for k, v in load_file(sys.argv[1]).items()}
print(status("VmHWM") - base)
"""


def test_reading_in_windows_peaks_near_one_copy_where_one_map_holds_two(tmp_path: Path) -> None:
    """A 512 MiB fp16 file read as bf16: one map holds the file's pages beside the copy; 64 MiB windows add 1/8."""
    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.zeros(16, 1024, 1024, dtype=torch.float16) + i for i in range(16)}, str(path))
    size = path.stat().st_size
    peaks = {}
    for way in ("windows", "one map"):
        run = subprocess.run([sys.executable, "-c", _PEAK, str(path), way], capture_output=True, text=True, check=True)
        peaks[way] = int(run.stdout.strip().splitlines()[-1])
    assert peaks["one map"] > 1.7 * size, peaks
    assert peaks["windows"] < 1.3 * size, peaks
