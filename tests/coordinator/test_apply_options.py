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


@pytest.mark.parametrize("value", ["-1", "two"])
def test_invalid_max_failures_is_usage_error(tmp_path, capsys, value):
    home = _home(tmp_path)
    before = {p.name: p.read_bytes() for p in home.iterdir() if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        main(["--home", str(home), "apply", "--max-failures", value])
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: argument --max-failures: invalid count '{value}': use 0 or more; see quil-coord apply --help")
    assert {p.name: p.read_bytes() for p in home.iterdir() if p.is_file()} == before


def test_apply_rejects_negative_max_failures(tmp_path):
    from quil_cluster.coordinator.apply import apply
    from quil_cluster.coordinator.home import Home
    from quil_cluster.common.errors import InventoryError

    with pytest.raises(InventoryError) as err:
        apply(Home(_home(tmp_path)), max_failures=-1)
    assert str(err.value) == "invalid --max-failures -1: use 0 or more"
