"""CAP_NET_ADMIN reaches the firewall commands only, never node processes (real kernel, no mocks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from quil_cluster.agent import capabilities as capabilities_module

# Runs as an unprivileged user that has CAP_NET_ADMIN in its ambient set, as systemd
# would start the agent with deploy/quil-agent-firewall.conf.
SCRIPT = textwrap.dedent("""
    import subprocess, threading
    import capabilities

    def effective(label):
        out = subprocess.run(["grep", "^CapEff", "/proc/self/status"], capture_output=True, text=True).stdout
        print(label, int(out.split()[1], 16) >> capabilities.CAP_NET_ADMIN & 1)

    effective("before_clear")
    capabilities.clear_ambient()
    effective("after_clear")
    # A thread that already runs, as the supervisor's does when an RPC thread updates the firewall.
    go = threading.Event()
    other = threading.Thread(target=lambda: (go.wait(), effective("other_thread")))
    other.start()
    with capabilities.ambient(capabilities.CAP_NET_ADMIN):
        effective("inside")
        go.set()
        other.join()
    effective("after_block")
""")


@pytest.fixture
def unprivileged_run(tmp_path):
    """Run a script as nobody with the capabilities module importable from a world-readable copy.

    The checkout (and its virtual environment) may sit in a directory only root can enter,
    so the script uses a copy of the module, which needs only the standard library.
    """
    setpriv = _setpriv()
    directory = Path(tempfile.mkdtemp(prefix="quil-caps-"))
    directory.chmod(0o755)
    shutil.copy(capabilities_module.__file__, directory / "capabilities.py")
    (directory / "capabilities.py").chmod(0o644)
    python = shutil.which("python3.11", path="/usr/bin:/usr/local/bin") or sys.executable

    def run(script: str, *cap_options: str) -> subprocess.CompletedProcess:
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *cap_options, python, "-c", script]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=directory,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(directory)})

    try:
        yield run
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _setpriv() -> str:
    path = shutil.which("setpriv")
    if os.geteuid() != 0 or path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("this test needs root and setpriv (util-linux) in CI")
        pytest.skip("needs root and setpriv to start a process with an ambient capability")
    return path


def test_net_admin_reaches_only_commands_run_inside_block(unprivileged_run):
    result = unprivileged_run(SCRIPT, "--inh-caps=+net_admin", "--ambient-caps=+net_admin")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split() for line in result.stdout.splitlines())
    assert lines == {"before_clear": "1", "after_clear": "0", "inside": "1", "other_thread": "0",
                     "after_block": "0"}


def test_ambient_without_permitted_capability_raises(unprivileged_run):
    script = ("import capabilities\n"
              "try:\n"
              "    with capabilities.ambient(capabilities.CAP_NET_ADMIN):\n"
              "        pass\n"
              "except capabilities.CapabilityError as err:\n"
              "    print('raised', err.errno)\n")
    result = unprivileged_run(script)
    assert result.stdout.strip() == "raised 1", result.stderr
