"""The reconciler's persisted desired state: a damaged desired.json must not stop the agent from starting."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import pytest
from agent_harness import ADDRESS, CLUSTER, write_agent_files
from helpers import free_port_range

from quil_cluster.agent import config as agent_config
from quil_cluster.agent import reconcile
from quil_cluster.agent.reconcile import DesiredState, Reconciler
from quil_cluster.agent.service import build_server
from quil_cluster.agent.supervisor import Policy, Supervisor
from quil_cluster.common import pki

LOGGER = reconcile.__name__
SHA = "ab" * 32
VALID = {
    "config_sha256": SHA, "config_generation": 3, "node_generation": "2.1", "cores": [2, 1],
    "run_control": True, "control_lists_sha256": SHA, "revoked_serials": ["0a1b"],
}


@pytest.fixture
def agent_files(tmp_path: Path) -> agent_config.AgentConfig:
    """An agent config (fresh CA, free port) whose state directory exists but contains no files yet."""
    ca_key, ca_cert = pki.create_ca(CLUSTER)
    path = write_agent_files(tmp_path / "agent", ca_key, ca_cert, free_port_range([ADDRESS], 1))
    config = agent_config.load(path)
    config.state_dir.mkdir(parents=True)
    return config


@pytest.fixture
def load_desired(agent_files: agent_config.AgentConfig):
    """Write desired.json with the given text and return what a new Reconciler reads from it."""
    supervisors: list[Supervisor] = []

    def load(text: str) -> DesiredState:
        (agent_files.state_dir / "desired.json").write_text(text)
        supervisor = Supervisor(agent_files.state_dir / "processes.json", Policy(), "test-instance")
        supervisors.append(supervisor)
        return Reconciler(agent_files, supervisor).desired

    try:
        yield load
    finally:
        for supervisor in supervisors:
            supervisor.close()


def _unreadable(config: agent_config.AgentConfig, reason: str) -> str:
    return f"desired state {config.state_dir / 'desired.json'} unreadable ({reason}); waiting for the coordinator"


def test_desired_types_cover_every_field():
    assert sorted(reconcile._DESIRED_TYPES) == sorted(f.name for f in dataclasses.fields(DesiredState))


def test_load_desired_reads_valid_file(load_desired):
    assert load_desired(json.dumps(VALID)) == DesiredState(**VALID)


def test_load_desired_fills_missing_keys(load_desired):
    assert load_desired(json.dumps({"config_generation": 4})) == DesiredState(config_generation=4)


def test_load_desired_without_held_holds_nothing(load_desired):
    # desired.json of an agent from before quil-coord stop existed.
    assert load_desired(json.dumps(VALID)).held == []


def test_load_desired_reads_held_cores(load_desired):
    assert load_desired(json.dumps(dict(VALID, held=[0, 2]))).held == [0, 2]


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("cores", "abc", "'cores' must be a list of distinct core indices from 1 to 65535, not 'abc'"),
        ("cores", [1, "2"], "'cores' must be a list of distinct core indices from 1 to 65535, not [1, '2']"),
        ("cores", [1, 1], "'cores' must be a list of distinct core indices from 1 to 65535, not [1, 1]"),
        ("cores", [0], "'cores' must be a list of distinct core indices from 1 to 65535, not [0]"),
        ("cores", [True], "'cores' must be a list of distinct core indices from 1 to 65535, not [True]"),
        ("run_control", "yes", "'run_control' must be true or false, not 'yes'"),
        ("config_generation", "7", "'config_generation' must be an integer of at least 0, not '7'"),
        ("config_generation", -1, "'config_generation' must be an integer of at least 0, not -1"),
        ("node_generation", 14, "'node_generation' must be '', '1.4', '2.0' or '2.1', not 14"),
        ("node_generation", "3.0", "'node_generation' must be '', '1.4', '2.0' or '2.1', not '3.0'"),
        ("config_sha256", None, "'config_sha256' must be a string, not None"),
        ("control_lists_sha256", 5, "'control_lists_sha256' must be a string, not 5"),
        ("revoked_serials", "0a", "'revoked_serials' must be a list of lower-case hex serial numbers, not '0a'"),
        ("revoked_serials", ["0A"], "'revoked_serials' must be a list of lower-case hex serial numbers, not ['0A']"),
        ("held", [1, 1], "'held' must be a list of distinct core indices from 0 to 65535, not [1, 1]"),
        ("held", [-1], "'held' must be a list of distinct core indices from 0 to 65535, not [-1]"),
        ("held", [65536], "'held' must be a list of distinct core indices from 0 to 65535, not [65536]"),
        ("held", "2", "'held' must be a list of distinct core indices from 0 to 65535, not '2'"),
    ],
)
def test_load_desired_rejects_wrong_type(load_desired, agent_files, caplog, key, value, reason):
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert load_desired(json.dumps(dict(VALID, **{key: value}))) == DesiredState()
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [_unreadable(agent_files, reason)]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[]", "expected a JSON object, found list"),
        ('{"cores": [1], "spare": 1}', "unknown key 'spare'"),
        ("{", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ],
)
def test_load_desired_rejects_bad_structure(load_desired, agent_files, caplog, text, reason):
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert load_desired(text) == DesiredState()
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [_unreadable(agent_files, reason)]


def _write_node_config(config: agent_config.AgentConfig, address: str) -> str:
    """Write a 1.4 config.yml with one worker on address; return its sha256."""
    text = f"engine:\n  dataWorkerMultiaddrs: [/ip4/{address}/tcp/{free_port_range([ADDRESS], 1)}]\n".encode()
    config.node_config_dir.mkdir(parents=True)
    (config.node_config_dir / "config.yml").write_bytes(text)
    return hashlib.sha256(text).hexdigest()


def test_agent_starts_with_wrongly_typed_desired_state(agent_files, caplog):
    sha = _write_node_config(agent_files, ADDRESS)
    (agent_files.state_dir / "desired.json").write_text(json.dumps(
        {"config_sha256": sha, "node_generation": "1.4", "cores": "abc", "run_control": "yes"}
    ))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        agent = build_server(agent_files)
    try:
        assert agent.reconciler.desired == DesiredState()
        assert agent.supervisor.specs() == {}
    finally:
        agent.stop()
    reason = "'cores' must be a list of distinct core indices from 1 to 65535, not 'abc'"
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [_unreadable(agent_files, reason)]


def test_restore_skips_core_of_other_address(agent_files, caplog):
    # The config was applied when this host's worker_address was 127.0.0.9.
    sha = _write_node_config(agent_files, "127.0.0.9")
    desired = DesiredState(config_sha256=sha, node_generation="1.4", cores=[1])
    (agent_files.state_dir / "desired.json").write_text(json.dumps(dataclasses.asdict(desired)))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        agent = build_server(agent_files)
    try:
        assert agent.supervisor.specs() == {}
        assert agent.reconciler.desired.cores == [1]
    finally:
        agent.stop()
    multiaddr = agent_files.node_config_dir.joinpath("config.yml").read_text().split("[")[1].split("]")[0]
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        f"restore skipped: core 1 would bind {multiaddr}, but this host's worker_address is {ADDRESS};"
        " fix the host's address in the coordinator inventory; run quil-coord apply"
    ]


def test_plan_parses_same_config_once(agent_files, monkeypatch):
    sha = _write_node_config(agent_files, ADDRESS)
    text = (agent_files.node_config_dir / "config.yml").read_bytes()
    loads: list[str] = []
    real_load = reconcile.nodeconfig.load

    def counting_load(config_text, source):
        loads.append(source)
        return real_load(config_text, source)

    monkeypatch.setattr(reconcile.nodeconfig, "load", counting_load)
    supervisor = Supervisor(agent_files.state_dir / "processes.json", Policy(), "test-instance")
    try:
        reconciler = Reconciler(agent_files, supervisor)
        first = reconciler._plan(text, sha, "1.4", [1], False)
        second = reconciler._plan(text, sha, "1.4", [1], True)
        assert len(loads) == 1
        assert first.specs[1] == second.specs[1]
        assert sorted(second.specs) == [0, 1]
        with pytest.raises(reconcile.RequestError) as caught:
            reconciler._plan(text, sha, "1.4", [2], False)
        assert caught.value.message == "core 2 has no entry in the worker list (length 1)"
        reconciler._plan(text, sha, "2.0", [1], False)
        assert len(loads) == 2
    finally:
        supervisor.close()


def test_plan_accepts_12800_core_cluster(agent_files):
    # 200 hosts of 64 workers; this agent is the last host and runs cores 12737 to 12800.
    others = [f"/ip4/10.0.{i // 200}.{i % 200 + 1}/tcp/{40000 + w}" for i in range(199) for w in range(64)]
    own = [f"/ip4/{ADDRESS}/tcp/{40000 + w}" for w in range(64)]
    lines = "".join(f"    - {entry}\n" for entry in others + own)
    text = f"engine:\n  dataWorkerMultiaddrs:\n{lines}".encode()
    sha = hashlib.sha256(text).hexdigest()
    cores = list(range(12737, 12801))
    supervisor = Supervisor(agent_files.state_dir / "processes.json", Policy(), "test-instance")
    try:
        plan = Reconciler(agent_files, supervisor)._plan(text, sha, "1.4", cores, False)
    finally:
        supervisor.close()
    assert sorted(plan.specs) == cores
    assert len(text) < reconcile.MAX_CONFIG_BYTES
