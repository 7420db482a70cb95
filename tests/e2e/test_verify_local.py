"""verify's listener audit on a loopback cluster: a worker bound elsewhere than planned is reported."""

from __future__ import annotations

import json
import time

import pytest
from helpers import DATA

from quil_cluster.coordinator.demo import LocalCluster

pytestmark = pytest.mark.e2e


def test_worker_listening_off_plan_is_reported(tmp_path, capsys):
    # A 2.1 cluster whose node binary is a 1.4 release: the 1.4 worker ignores the 2.1 lists
    # and binds the 1.4 default 127.0.0.1:40000+N-1, so nothing listens where the plan says.
    cluster = LocalCluster(tmp_path, generation="2.1", node_version="1.4.21")
    control = tmp_path / "config-2.1.0.25.yml"
    control.write_bytes((DATA / "config-2.1.0.25.yml").read_bytes())
    assert cluster.init(control, "--base-port", "26100", "--stream-base-port", "33600") == 0
    assert cluster.add_host("A", "127.0.0.2", "--control", "--workers", "1") == 0
    try:
        cluster.start_agent("A")
        assert cluster.coord("assign") == 0
        assert cluster.coord("apply", "--no-verify") == 0
        deadline = time.monotonic() + 20
        while True:
            capsys.readouterr()
            code = cluster.coord("verify", "--json")
            report = json.loads(capsys.readouterr().out)
            if report["violations"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert code == 7
        assert report["violations"] == [
            "A: worker core=1 listens on 127.0.0.1:40000, planned only 127.0.0.2:26100, 127.0.0.2:33600; "
            "another process or an old config binds it; restart the worker after apply"]
    finally:
        cluster.stop_all()
