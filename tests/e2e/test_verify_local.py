"""verify's listener audit on a loopback cluster: a worker bound elsewhere than planned is reported."""

from __future__ import annotations

import json
import sys
import time

import pytest
from helpers import DATA

from quil_cluster.coordinator.demo import LocalCluster

pytestmark = pytest.mark.e2e


def _mislabeled_binary(cluster: LocalCluster) -> None:
    """Make the node binary a 1.4 stand-in under a 2.1 release name, as a wrongly renamed download."""
    cluster.node_binary.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -m quil_cluster.simnode --generation 1.4 "$@"\n')


def test_worker_listening_off_plan_is_reported(tmp_path, capsys):
    # A 1.4 worker ignores the 2.1 lists and binds the 1.4 default 127.0.0.1:40000+N-1,
    # so nothing listens where the plan puts it.
    cluster = LocalCluster(tmp_path, generation="2.1", node_version="2.1.0.25")
    _mislabeled_binary(cluster)
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


def test_node_release_of_other_generation_stops_apply(tmp_path, capsys):
    cluster = LocalCluster(tmp_path, generation="2.1", node_version="1.4.21")
    control = tmp_path / "config-2.1.0.25.yml"
    control.write_bytes((DATA / "config-2.1.0.25.yml").read_bytes())
    assert cluster.init(control, "--base-port", "26200", "--stream-base-port", "33700") == 0
    assert cluster.add_host("A", "127.0.0.2", "--control", "--workers", "1") == 0
    try:
        cluster.start_agent("A")
        assert cluster.coord("assign") == 0
        capsys.readouterr()
        assert cluster.coord("apply") == 4
        line = capsys.readouterr().out.splitlines()[0]
        assert line == (f"A: FAILED (the node binary {cluster.node_binary} is release 1.4.21, but the cluster "
                        "renders configs for node 2.1; install a 2.1 binary, or create the cluster with "
                        "quil-coord init --generation 1.4)")
        assert not (tmp_path / "nodes" / "A" / ".config" / "config.yml").exists()
    finally:
        cluster.stop_all()
