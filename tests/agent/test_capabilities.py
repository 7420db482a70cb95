"""CAP_NET_ADMIN reaches the firewall commands only, never node processes (real kernel, no mocks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

# Runs as an unprivileged user that holds CAP_NET_ADMIN in its ambient set, as systemd
# would start the agent with deploy/quil-agent-firewall.conf.
SCRIPT = textwrap.dedent("""
    import subprocess, threading
    from quil_cluster.agent import capabilities

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


def _setpriv() -> str:
    path = shutil.which("setpriv")
    if os.geteuid() != 0 or path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("this test needs root and setpriv (util-linux) in CI")
        pytest.skip("needs root and setpriv to start a process with an ambient capability")
    return path


def test_net_admin_reaches_only_commands_run_inside_block():
    setpriv = _setpriv()
    argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=+net_admin",
            "--ambient-caps=+net_admin", sys.executable, "-c", SCRIPT]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/",
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr
    lines = dict(line.split() for line in result.stdout.splitlines())
    assert lines == {"before_clear": "1", "after_clear": "0", "inside": "1", "other_thread": "0",
                     "after_block": "0"}


def test_ambient_without_permitted_capability_raises():
    setpriv = _setpriv()
    script = ("from quil_cluster.agent import capabilities\n"
              "try:\n"
              "    with capabilities.ambient(capabilities.CAP_NET_ADMIN):\n"
              "        pass\n"
              "except capabilities.CapabilityError as err:\n"
              "    print('raised', err.errno)\n")
    argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", script]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/",
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.stdout.strip() == "raised 1"
