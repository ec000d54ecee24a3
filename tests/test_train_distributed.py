"""Multi-device training settings that cannot work on this machine are refused before any model loads."""

from __future__ import annotations

import os

import pytest

from kstory.core.errors import KstoryError
from kstory.train import TrainSettings
from kstory.train.distributed import requested_devices
from kstory.train.runtime import resolve_runtime


def test_more_devices_than_the_machine_has_names_train_devices() -> None:
    settings = TrainSettings(accelerator="cpu", devices=(os.cpu_count() or 1) + 1, strategy="ddp")
    with pytest.raises(KstoryError, match=r"train\.devices asks for \d+ device\(s\)") as caught:
        resolve_runtime(settings)
    assert "fix:" in str(caught.value)


def test_fsdp_on_the_cpu_names_train_strategy() -> None:
    with pytest.raises(KstoryError, match=r"train\.strategy fsdp needs CUDA GPUs"):
        resolve_runtime(TrainSettings(accelerator="cpu", devices=1, strategy="fsdp"))


def test_unknown_strategy_names_train_strategy() -> None:
    with pytest.raises(KstoryError, match=r"train\.strategy is 'horovod'"):
        resolve_runtime(TrainSettings(accelerator="cpu", strategy="horovod"))


def test_zero_devices_is_refused() -> None:
    with pytest.raises(KstoryError, match=r"train\.devices is 0"):
        resolve_runtime(TrainSettings(accelerator="cpu", devices=0))


@pytest.mark.parametrize("devices, count", [(2, 2), ("2", 2), ("0,1", 2), ("auto", None), (-1, None)])
def test_requested_devices(devices, count) -> None:
    assert requested_devices(devices) == count


def test_a_device_count_the_machine_has_is_accepted() -> None:
    runtime = resolve_runtime(TrainSettings(accelerator="cpu", devices=1, strategy="ddp"))
    assert runtime.accelerator == "cpu"
