"""quil-coord apply options that are checked before any host is contacted."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import DATA

from quil_cluster.coordinator.cli import main


def _home(tmp_path: Path) -> Path:
    control = tmp_path / "config.yml"
    control.write_bytes((DATA / "config-1.4.21.yml").read_bytes())
    home = tmp_path / "coord"
    assert main(["--home", str(home), "init", "--control-config", str(control)]) == 0
    return home


def test_negative_max_failures_is_rejected(tmp_path, capsys):
    home = _home(tmp_path)
    before = {p.name: p.read_bytes() for p in home.iterdir() if p.is_file()}
    capsys.readouterr()
    code = main(["--home", str(home), "apply", "--max-failures", "-1"])
    assert code == 3
    assert capsys.readouterr().err == "error: invalid --max-failures -1: use 0 or more\n"
    assert {p.name: p.read_bytes() for p in home.iterdir() if p.is_file()} == before


def test_max_failures_needs_a_number(tmp_path, capsys):
    home = _home(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        main(["--home", str(home), "apply", "--max-failures", "two"])
    assert caught.value.code == 2
    assert "argument --max-failures: invalid int value: 'two'" in capsys.readouterr().err
