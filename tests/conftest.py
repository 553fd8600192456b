"""Shared test setup: few torch threads, a private cache folder, paths to shared data."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("NRRDD_TEST_THREADS", "2")))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NRRDD_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Point the on-disk cache at a temporary folder for the whole test session."""
    old = os.environ.get("NRRDD_CACHE")
    os.environ["NRRDD_CACHE"] = str(tmp_path_factory.mktemp("nrrdd_cache"))
    yield
    if old is None:
        os.environ.pop("NRRDD_CACHE", None)
    else:
        os.environ["NRRDD_CACHE"] = old


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data``; skips the test when it is not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """The bench modules (``bench("accuracy")`` ...), importable, with a private unit cache."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.setenv("NRRDD_BENCH_CACHE", str(tmp_path / "bench_cache"))
    return lambda name: importlib.import_module(name)
