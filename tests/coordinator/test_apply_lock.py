"""One apply at a time per cluster: the holder is named, --wait waits, a killed holder frees the lock."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import DATA

from quil_cluster.common.errors import InventoryError
from quil_cluster.coordinator.apply import apply_lock
from quil_cluster.coordinator.cli import main
from quil_cluster.coordinator.home import Home

HOLDER = """
import sys
from pathlib import Path
from quil_cluster.coordinator.apply import apply_lock
from quil_cluster.coordinator.home import Home

with apply_lock(Home(Path(sys.argv[1])), wait=False):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def home(tmp_path: Path) -> Home:
    control = tmp_path / "config.yml"
    control.write_bytes((DATA / "config-1.4.21.yml").read_bytes())
    assert main(["--home", str(tmp_path / "coord"), "init", "--control-config", str(control)]) == 0
    return Home(tmp_path / "coord")


@pytest.fixture
def holder(home, tmp_path):
    """A separate process that holds the apply lock until a line arrives on its stdin."""
    script = tmp_path / "hold_lock.py"
    script.write_text(HOLDER)
    process = subprocess.Popen([sys.executable, str(script), str(home.path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "held\n"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        process.stdin.close()
        process.stdout.close()


def test_second_apply_names_lock_holder(home, holder, capsys, tmp_path):
    capsys.readouterr()
    code = main(["--home", str(home.path), "apply"])
    err = capsys.readouterr().err
    assert code == 3
    pattern = (rf"error: another apply is running \(pid {holder.pid}, command 'hold_lock.py {re.escape(str(home.path))}',"
               r" started (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \w+\); wait for it, or pass --wait" "\n")
    match = re.fullmatch(pattern, err)
    assert match, err
    started = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
    assert abs(time.time() - started) < 60


def test_wait_blocks_until_holder_finishes(home, holder):
    acquired = threading.Event()

    def wait_for_lock() -> None:
        with apply_lock(home, wait=True):
            acquired.set()

    thread = threading.Thread(target=wait_for_lock)
    thread.start()
    # the holder has not let go, so the waiter must still be blocked
    assert not acquired.wait(0.3)
    holder.stdin.write("release\n")
    holder.stdin.flush()
    thread.join(30)
    assert acquired.is_set()
    assert holder.wait(10) == 0


def test_killed_holder_frees_lock(home, holder):
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(10) == -signal.SIGKILL
    with apply_lock(home, wait=False):
        text = home.file("apply.lock").read_text()
    assert text.startswith("pid ")
    assert home.file("apply.lock").read_text() == ""


def test_lock_without_wait_raises_inventory_error(home, holder):
    with pytest.raises(InventoryError) as caught:
        with apply_lock(home, wait=False):
            pass
    assert str(caught.value).startswith(f"another apply is running (pid {holder.pid}, command 'hold_lock.py ")
