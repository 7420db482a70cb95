"""The systemd units in deploy/ pass systemd-analyze verify and keep their sandboxing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = ("quil-agent.service", "quil-coord-serve.service")
SANDBOX = ("NoNewPrivileges=true", "ProtectSystem=strict", "ProtectHome=true", "PrivateTmp=true", "UMask=0077")


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing; .ci/run installs the systemd package")
        pytest.skip("systemd-analyze is not installed")
    return path


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(unit, tmp_path):
    analyze = _systemd_analyze()
    text = (DEPLOY / unit).read_text()
    # verify checks that ExecStart's program exists, so point it at this environment's scripts
    bin_dir = Path(sys.executable).parent
    text = text.replace("/usr/local/bin/", f"{bin_dir}/")
    (tmp_path / unit).write_text(text)
    result = subprocess.run([analyze, "verify", str(tmp_path / unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_sandboxed(unit):
    lines = (DEPLOY / unit).read_text().splitlines()
    for directive in SANDBOX:
        assert directive in lines, f"{unit} lacks {directive}"
    user = next(line for line in lines if line.startswith("User="))
    assert user not in ("User=root", "User=0")
    assert any(line.startswith("ReadWritePaths=/var/lib/") for line in lines)


def test_agent_unit_with_firewall_drop_in_verifies(tmp_path):
    analyze = _systemd_analyze()
    bin_dir = Path(sys.executable).parent
    unit = tmp_path / "quil-agent.service"
    text = (DEPLOY / "quil-agent.service").read_text().replace("/usr/local/bin/", f"{bin_dir}/")
    # A drop-in's [Service] lines merge into the unit's, so appending them checks the combination.
    unit.write_text(text + "\n" + (DEPLOY / "quil-agent-firewall.conf").read_text())
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_agent_unit_grants_no_capability_by_default():
    lines = (DEPLOY / "quil-agent.service").read_text().splitlines()
    assert "CapabilityBoundingSet=" in lines
    assert not any(line.startswith("AmbientCapabilities") for line in lines)
    drop_in = (DEPLOY / "quil-agent-firewall.conf").read_text().splitlines()
    assert "AmbientCapabilities=CAP_NET_ADMIN" in drop_in
    assert "CapabilityBoundingSet=CAP_NET_ADMIN" in drop_in
