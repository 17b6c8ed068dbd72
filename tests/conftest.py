"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ovd.data.mini_world import generate_mini_world


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """The test models are tiny: one intra-op thread is as fast, and immune to the pathological
    slowdown of OpenMP threads on a busy 2-core machine (100x seen). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def mini_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke-preset mini-world (seed 0), generated once per test session. Treat as read-only.

    World v2 (36 colour x shape classes, 100 train images): the mechanics tests need a small world,
    and v3's smoke preset is twice its size; v3 itself is tested in test_mini_world.py. Tests that
    run `ovd run` on this folder pass world.version=2 (a world of another version is refused)."""
    out = tmp_path_factory.mktemp("mini_world")
    generate_mini_world(out, preset="smoke", seed=0, progress=False, version=2)
    return out
