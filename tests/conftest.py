"""Test-wide settings: offline hubs, a private model cache, quiet third-party logs."""

from __future__ import annotations

import os

# Nothing may be downloaded in tests: every model and dataset is made by the project.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Tests run in parallel processes, one per core: a thread each (and for the commands they start), since
    # OpenMP threads spinning against another process's on the same cores run many times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import kstory  # noqa: E402,F401  (installs the torchvision import fix before any test imports it)
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def private_model_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep built models out of the user's cache, shared by all tests of one session."""
    previous = os.environ.get("KSTORY_CACHE")
    cache = tmp_path_factory.mktemp("kstory-cache")
    os.environ["KSTORY_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("KSTORY_CACHE", None)
    else:
        os.environ["KSTORY_CACHE"] = previous


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many tiny forward passes: threads gain nothing there, and OpenMP spinning on a busy
    2-core machine makes them up to 10x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def demo_runs(tmp_path_factory: pytest.TempPathFactory):
    """One complete demo run (tiny models) shared by the dashboard tests; returns its runs root.

    ``KSTORY_APP_TEST_RUNS`` reuses (and modifies!) an existing runs root, a debugging aid; run it with
    ``-n 0``, since parallel test processes would all change that one folder.
    """
    from pathlib import Path

    from kstory.cli.demo import run_demo

    if os.environ.get("KSTORY_APP_TEST_RUNS"):
        return Path(os.environ["KSTORY_APP_TEST_RUNS"])
    root = tmp_path_factory.mktemp("app-runs")
    run_demo(root / "demo")
    return root
