"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from ovd.data.mini_world import generate_mini_world


@pytest.fixture(scope="session")
def mini_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke-preset mini-world (seed 0), generated once per test session. Treat as read-only."""
    out = tmp_path_factory.mktemp("mini_world")
    generate_mini_world(out, preset="smoke", seed=0, progress=False)
    return out
