"""Multi-device training settings: impossible ones refused before any model loads; new ones keep old fingerprints."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from kstory.core.errors import KstoryError
from kstory.core.train_settings import LATER_DEFAULTS, RESUME_FREE_FIELDS
from kstory.train import TrainSettings
from kstory.train.distributed import lightning_devices, requested_devices
from kstory.train.runtime import resolve_runtime
from kstory.train.trainer import batch_record


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


def test_ddp_spawn_is_refused_with_ddp_as_the_fix() -> None:
    with pytest.raises(KstoryError, match=r"train\.strategy ddp_spawn is not supported") as caught:
        resolve_runtime(TrainSettings(accelerator="cpu", devices=2, strategy="ddp_spawn"))
    assert "train.strategy: ddp" in str(caught.value)


@pytest.mark.parametrize("devices, given", [("auto", 1), (2, 2), ("0,1", "0,1"), (-1, -1)])
def test_devices_auto_is_one_device(devices, given) -> None:
    # Lightning's auto takes every GPU and re-runs the command line for each: kstory asks for that explicitly.
    assert lightning_devices(TrainSettings(devices=devices)) == given


def _fingerprint_without(settings: TrainSettings, names: tuple[str, ...]) -> str:
    """The fingerprint as it was computed before the later settings existed."""
    data = {k: v for k, v in settings.model_dump(mode="json").items() if k not in names}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("values", [{}, {"rank": 8, "max_steps": 900, "devices": 2, "strategy": "ddp"},
                                    {"learning_rate": 3e-4, "epochs": 3}])
def test_runs_made_before_num_nodes_and_scale_lr_keep_their_fingerprints(values) -> None:
    settings = TrainSettings(**values)
    assert settings.fingerprint() == _fingerprint_without(settings, RESUME_FREE_FIELDS + tuple(LATER_DEFAULTS))
    assert set(settings.schedule()) == set(RESUME_FREE_FIELDS) - set(LATER_DEFAULTS)
    assert TrainSettings(**values, scale_lr=True).fingerprint() != settings.fingerprint()  # another learning rate
    more_nodes = TrainSettings(**values, num_nodes=2)
    assert more_nodes.fingerprint() == settings.fingerprint() and more_nodes.schedule()["num_nodes"] == 2


def test_scale_lr_multiplies_by_the_effective_batch() -> None:
    settings = TrainSettings(batch_size=2, grad_accumulation=3, learning_rate=1e-4)
    assert batch_record(settings, 2) == {"world_size": 2, "effective_batch_size": 12, "lr_scale": 1.0,
                                         "learning_rate": 1e-4}
    scaled = batch_record(settings.model_copy(update={"scale_lr": True}), 2)
    assert scaled["lr_scale"] == 12 and scaled["learning_rate"] == pytest.approx(1.2e-3)


def test_torchrun_with_other_process_counts_than_the_settings_is_refused(monkeypatch) -> None:
    # torchrun --nproc_per_node 2 with devices: auto would run two unrelated trainings into one output
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KstoryError, match=r"torchrun started 2 processes, but train\.devices x train\.num_nodes make 1"):
        resolve_runtime(TrainSettings(accelerator="cpu"))
    assert resolve_runtime(TrainSettings(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp")).accelerator == "cpu"
