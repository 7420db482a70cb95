"""Fixtures shared by the test folders."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import DATA


@pytest.fixture
def reference_config_1_4(tmp_path: Path) -> Path:
    """A copy of the config.yml node 1.4.21 writes on first start."""
    path = tmp_path / "config-1.4.21.yml"
    path.write_bytes((DATA / "config-1.4.21.yml").read_bytes())
    return path
