"""agent.yaml: a complete file loads with resolved paths; each invalid input raises its one-line error."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import os

import pytest
import yaml

from quil_cluster.agent import runas

from quil_cluster.agent.config import AgentConfig, TLSFiles, load, sample, split_host_port
from quil_cluster.common.errors import ConfigError

COMPLETE = """\
cluster: test
listen: 127.0.0.1:7350
worker_address: 10.0.0.1
node_binary: bin/node
node_config_dir: node/.config
work_dir: node
state_dir: state
tls:
  cert: tls/agent.crt
  key: tls/agent.key
  ca: tls/ca.crt
node_args: [--signature-check=false]
stop_grace_seconds: 5
start_seconds: 2.5
log_max_bytes: 8192
log_backups: 2
node_env:
  GOMAXPROCS: "4"
"""

# Only the required keys.
MINIMAL = """\
cluster: test
listen: 127.0.0.1:7350
worker_address: 10.0.0.1
node_binary: bin/node
node_config_dir: node/.config
state_dir: state
tls:
  cert: agent.crt
  key: agent.key
  ca: ca.crt
"""


def _write(directory: Path, text: str, name: str = "agent.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load(path)
    return str(err.value)


# -- complete files --------------------------------------------------------------


def test_load_complete_file(tmp_path):
    base = tmp_path.resolve()
    config = load(_write(tmp_path, COMPLETE))
    assert config == AgentConfig(
        cluster="test",
        listen="127.0.0.1:7350",
        worker_address="10.0.0.1",
        node_binary=base / "bin" / "node",
        node_config_dir=base / "node" / ".config",
        work_dir=base / "node",
        state_dir=base / "state",
        tls=TLSFiles(cert=base / "tls" / "agent.crt", key=base / "tls" / "agent.key", ca=base / "tls" / "ca.crt"),
        node_args=("--signature-check=false",),
        stop_grace_seconds=5,
        start_seconds=2.5,
        log_max_bytes=8192,
        log_backups=2,
        node_env={"GOMAXPROCS": "4"},
    )


def test_load_resolves_paths_against_file_directory(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    path = _write(tmp_path / "conf", MINIMAL)
    # The working directory must not matter.
    monkeypatch.chdir("/")
    config = load(path)
    assert config.node_binary == tmp_path.resolve() / "conf" / "bin" / "node"
    assert config.tls.ca == tmp_path.resolve() / "conf" / "ca.crt"


def test_load_relative_config_path(tmp_path, monkeypatch):
    _write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    assert load(Path("agent.yaml")).state_dir == tmp_path.resolve() / "state"


def test_load_keeps_absolute_paths(tmp_path):
    path = _write(tmp_path, MINIMAL.replace("node_binary: bin/node", "node_binary: /opt/quil/node"))
    assert load(path).node_binary == Path("/opt/quil/node")


def test_load_minimal_file_uses_defaults(tmp_path):
    config = load(_write(tmp_path, MINIMAL))
    assert config.work_dir == tmp_path.resolve() / "node"
    assert config.node_args == ()
    assert config.node_env == {}
    assert config.stop_grace_seconds == 10.0
    assert config.start_seconds == 1.0
    assert config.log_max_bytes == 10 * 1024 * 1024
    assert config.log_backups == 3
    assert config.metrics_address == "127.0.0.1:9741"


@pytest.mark.parametrize(("worker_address", "expected"), [
    ("10.0.0.1", "127.0.0.1:9741"),
    ("127.0.0.1", "127.0.0.1:9741"),
    # Several agents on one machine each serve metrics on their own loopback address.
    ("127.0.0.3", "127.0.0.3:9741"),
])
def test_default_metrics_address_follows_a_loopback_worker_address(tmp_path, worker_address, expected):
    text = MINIMAL.replace("worker_address: 10.0.0.1", f"worker_address: {worker_address}")
    assert load(_write(tmp_path, text)).metrics_address == expected


def test_explicit_metrics_address_wins_over_the_loopback_default(tmp_path):
    text = MINIMAL.replace("worker_address: 10.0.0.1", "worker_address: 127.0.0.3") + "metrics_address: off\n"
    assert load(_write(tmp_path, text)).metrics_address == "off"


@pytest.mark.parametrize(("value", "expected"), [
    ("off", "off"), ("OFF", "off"), ("'off'", "off"), ("''", ""), ("'[::1]:9741'", "[::1]:9741"),
    ("0.0.0.0:9741", "0.0.0.0:9741"), ("127.0.0.1:0", "127.0.0.1:0"),
])
def test_load_metrics_address_accepted(tmp_path, value, expected):
    config = load(_write(tmp_path, MINIMAL + f"metrics_address: {value}\n"))
    assert config.metrics_address == expected


def test_load_ipv6_addresses(tmp_path):
    text = MINIMAL.replace("127.0.0.1:7350", "'[::1]:7350'").replace("10.0.0.1", "'fd00::5'")
    config = load(_write(tmp_path, text))
    assert config.listen == "[::1]:7350"
    assert config.worker_address == "fd00::5"


def test_log_dir_is_under_state_dir(tmp_path):
    assert load(_write(tmp_path, MINIMAL)).log_dir == tmp_path.resolve() / "state" / "logs"


# -- invalid files -------------------------------------------------------------------

# Cases of (test id, text of agent.yaml, expected error text after the file's path).
INVALID = [
    ("unknown key", MINIMAL.replace("worker_address", "worker_adress"),
     ": unknown key 'worker_adress'; did you mean 'worker_address'?"),
    ("unknown key without close match", MINIMAL + "mtu: 1500\n",
     ": unknown key 'mtu'; known keys: cluster, listen, worker_address, node_binary, node_config_dir,"
     " work_dir, state_dir, tls, node_args, stop_grace_seconds, start_seconds, log_max_bytes, log_backups,"
     " node_env, metrics_address, node_user, crash_limit, crash_window_seconds"),
    ("duplicate key", MINIMAL + "listen: 127.0.0.1:7351\n",
     ":11: duplicate key 'listen' (first at line 2); remove one of them"),
    ("missing key", MINIMAL.replace("state_dir: state\n", ""), ": missing key 'state_dir'"),
    ("empty file", "", ": missing key 'cluster'"),
    ("tls missing key", MINIMAL.replace("  ca: ca.crt\n", ""), ": tls is missing ca"),
    ("tls missing two keys", MINIMAL.replace("  cert: agent.crt\n  key: agent.key\n", ""),
     ": tls is missing cert, key"),
    ("tls unknown key", MINIMAL + "  crt: agent.crt\n", ": tls: unknown key 'crt'; did you mean 'cert'?"),
    ("tls not a mapping", MINIMAL.split("tls:")[0] + "tls: agent.crt\n",
     ": 'tls' must be a mapping with cert, key and ca"),
    ("tls path empty", MINIMAL.replace("ca: ca.crt", "ca: ''"), ": 'tls.ca' must be a non-empty path string"),
    ("worker address not an ip", MINIMAL.replace("10.0.0.1", "node.example"),
     ": worker_address 'node.example' is not an IP address"),
    ("worker address a number", MINIMAL.replace("10.0.0.1", "167772161"),
     ": worker_address '167772161' is not an IP address"),
    ("worker address wildcard", MINIMAL.replace("10.0.0.1", "0.0.0.0"),
     ": worker_address '0.0.0.0' is a wildcard; set the concrete address the workers bind"),
    ("worker address ipv6 wildcard", MINIMAL.replace("10.0.0.1", "'::'"),
     ": worker_address '::' is a wildcard; set the concrete address the workers bind"),
    ("listen without port", MINIMAL.replace("127.0.0.1:7350", "127.0.0.1"),
     ": listen: '127.0.0.1' is not HOST:PORT"),
    ("listen port 70000", MINIMAL.replace("7350", "70000"),
     ": listen: '127.0.0.1:70000' is not HOST:PORT with a port from 1 to 65535"),
    ("listen port 0", MINIMAL.replace(":7350", ":0"),
     ": listen: '127.0.0.1:0' is not HOST:PORT with a port from 1 to 65535"),
    ("listen superscript port", MINIMAL.replace("127.0.0.1:7350", "'127.0.0.1:\u00b2'"),
     ": listen: '127.0.0.1:\u00b2' is not HOST:PORT with a port from 1 to 65535"),
    ("listen a number", MINIMAL.replace("127.0.0.1:7350", "7350"), ": listen: '7350' is not HOST:PORT"),
    ("cluster a number", MINIMAL.replace("cluster: test", "cluster: 5"), ": 'cluster' must be a non-empty string"),
    ("cluster empty", MINIMAL.replace("cluster: test", "cluster: ''"), ": 'cluster' must be a non-empty string"),
    ("stop grace 0", MINIMAL + "stop_grace_seconds: 0\n",
     ": 'stop_grace_seconds' must be a number of seconds between 0 and 3600"),
    ("stop grace above limit", MINIMAL + "stop_grace_seconds: 3601\n",
     ": 'stop_grace_seconds' must be a number of seconds between 0 and 3600"),
    ("stop grace true", MINIMAL + "stop_grace_seconds: true\n",
     ": 'stop_grace_seconds' must be a number of seconds between 0 and 3600"),
    ("start seconds text", MINIMAL + "start_seconds: soon\n",
     ": 'start_seconds' must be a number of seconds between 0 and 3600"),
    ("log max bytes small", MINIMAL + "log_max_bytes: 4095\n",
     ": 'log_max_bytes' must be an integer of at least 4096"),
    ("log backups zero", MINIMAL + "log_backups: 0\n", ": 'log_backups' must be an integer of at least 1"),
    ("log backups text", MINIMAL + "log_backups: three\n", ": 'log_backups' must be an integer of at least 1"),
    ("node args with number", MINIMAL + "node_args: [--debug, 5]\n", ": 'node_args' must be a list of strings"),
    ("node args a string", MINIMAL + "node_args: --debug\n", ": 'node_args' must be a list of strings"),
    ("node env number value", MINIMAL + "node_env: {GOMAXPROCS: 4}\n",
     ": 'node_env' must be a mapping of strings to strings"),
    ("path not a string", MINIMAL.replace("state_dir: state", "state_dir: [state]"),
     ": 'state_dir' must be a non-empty path string"),
    ("broken yaml", MINIMAL + "node_args: [\n",
     ":12: invalid YAML: expected the node content, but found '<stream end>'; fix the syntax at that line"),
    ("broken yaml indentation", MINIMAL.replace("  key: agent.key", " key: agent.key"),
     ":9: invalid YAML: expected <block end>, but found '<block mapping start>'; fix the syntax at that line"),
    ("top level a list", "- cluster\n- listen\n", ": expected a mapping of keys at the top level, found list"),
    ("metrics address without port", MINIMAL + "metrics_address: 127.0.0.1\n",
     ": metrics_address: '127.0.0.1' is not HOST:PORT; use e.g. 127.0.0.1:9741, or 'off'"),
    ("metrics address port 65536", MINIMAL + "metrics_address: 127.0.0.1:65536\n",
     ": metrics_address: '127.0.0.1:65536' is not HOST:PORT with a port from 0 to 65535; use e.g. 127.0.0.1:9741,"
     " or 'off'"),
    ("metrics address true", MINIMAL + "metrics_address: true\n",
     ": metrics_address: 'True' is not HOST:PORT; use e.g. 127.0.0.1:9741, or 'off'"),
    ("metrics address a number", MINIMAL + "metrics_address: 9741\n",
     ": metrics_address: '9741' is not HOST:PORT; use e.g. 127.0.0.1:9741, or 'off'"),
    ("crash limit 0", MINIMAL + "crash_limit: 0\n", ": 'crash_limit' must be an integer from 2 to 100, not 0"),
    ("crash limit 1", MINIMAL + "crash_limit: 1\n", ": 'crash_limit' must be an integer from 2 to 100, not 1"),
    ("crash limit above limit", MINIMAL + "crash_limit: 1000000\n",
     ": 'crash_limit' must be an integer from 2 to 100, not 1000000"),
    ("crash limit false", MINIMAL + "crash_limit: false\n",
     ": 'crash_limit' must be an integer from 2 to 100, not False"),
    ("crash limit text", MINIMAL + "crash_limit: off\n",
     ": 'crash_limit' must be an integer from 2 to 100, not False"),
    ("crash window 0", MINIMAL + "crash_window_seconds: 0\n",
     ": 'crash_window_seconds' must be a number of seconds up to 86400, not 0"),
    ("crash window negative", MINIMAL + "crash_window_seconds: -1\n",
     ": 'crash_window_seconds' must be a number of seconds up to 86400, not -1"),
    ("crash window infinite", MINIMAL + "crash_window_seconds: .inf\n",
     ": 'crash_window_seconds' must be a number of seconds up to 86400, not inf"),
    ("crash window too short", MINIMAL + "crash_window_seconds: 60\n",
     ": 'crash_window_seconds' 60 is shorter than the 109.8 s a process that exits at once needs to fail"
     " crash_limit (10) times, so the crash-loop guard could never trip; set at least 110"),
    ("crash window too short for limit", MINIMAL + "crash_limit: 100\ncrash_window_seconds: 3000\n",
     ": 'crash_window_seconds' 3000 is shorter than the 3349.8 s a process that exits at once needs to fail"
     " crash_limit (100) times, so the crash-loop guard could never trip; set at least 3350"),
    ("node user missing", MINIMAL + "node_user: qc-no-such-user\n",
     ": node_user 'qc-no-such-user' does not exist on this host; create it (useradd --system qc-no-such-user)"
     " or remove node_user"),
    ("node user a number", MINIMAL + "node_user: 65534\n", ": 'node_user' must be a user name, not 65534"),
]


@pytest.mark.parametrize(("text", "expected"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_load_invalid_file_raises(tmp_path, text, expected):
    path = _write(tmp_path, text)
    assert _error(path) == f"{path}{expected}"


def test_load_missing_file_raises(tmp_path):
    path = tmp_path / "agent.yaml"
    assert _error(path) == f"{path}: cannot read file: No such file or directory"


def test_load_non_utf8_file_raises(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"cluster: t\xffest\n")
    assert _error(path) == f"{path}: not UTF-8 text: invalid start byte at byte 10"


def test_load_crash_guard_settings(tmp_path):
    config = load(_write(tmp_path, MINIMAL + "crash_limit: 6\ncrash_window_seconds: 9\n"))
    policy = config.supervisor_policy()
    assert policy.crash_limit == 6
    assert policy.crash_window == 9


def test_load_default_crash_guard(tmp_path):
    policy = load(_write(tmp_path, MINIMAL)).supervisor_policy()
    assert policy.crash_limit == 10
    assert policy.crash_window == 180.0


def test_load_own_user_runs_without_setpriv(tmp_path):
    import pwd
    import os

    own = pwd.getpwuid(os.geteuid()).pw_name
    config = load(_write(tmp_path, MINIMAL + f"node_user: {own}\n"))
    assert config.node_user == own
    assert runas.resolve(config.node_user, "agent.yaml") is None


def test_load_other_user_without_root_raises(tmp_path, monkeypatch):
    # An agent of uid 1000: the tests may run as root, which may switch users.
    monkeypatch.setattr(runas.os, "geteuid", lambda: 1000)
    path = _write(tmp_path, MINIMAL + "node_user: nobody\n")
    assert _error(path) == (
        f"{path}: node_user 'nobody' needs the agent to run as root to switch users (it runs as uid"
        " 1000); remove node_user or run the agent as root"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_load_other_user_as_root_wraps_with_setpriv(tmp_path):
    import pwd

    config = load(_write(tmp_path, MINIMAL + "node_user: nobody\n"))
    run_as = runas.resolve(config.node_user, "agent.yaml")
    entry = pwd.getpwnam("nobody")
    assert run_as is not None
    assert (run_as.uid, run_as.gid) == (entry.pw_uid, entry.pw_gid)
    assert run_as.wrap(("/opt/node", "--core", "1")) == (
        run_as.setpriv, "--reuid", str(entry.pw_uid), "--regid", str(entry.pw_gid), "--init-groups",
        "--no-new-privs", "--pdeathsig", "KILL", "--", "/opt/node", "--core", "1",
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_load_other_user_without_setpriv_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    path = _write(tmp_path, MINIMAL + "node_user: nobody\n")
    assert _error(path) == (
        f"{path}: node_user 'nobody' needs the setpriv program, which is not on PATH;"
        " install util-linux 2.33 or later"
    )


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# -- split_host_port ------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.1:7350", ("127.0.0.1", 7350)),
    ("[::1]:1", ("::1", 1)),
    ("agent.example:65535", ("agent.example", 65535)),
])
def test_split_host_port_valid(value, expected):
    assert split_host_port(value, "listen") == expected


@pytest.mark.parametrize("value", [":7350", "[]:7350", "host:", "host:-1", "host:+80", "host: 80", "host:\uff11"])
def test_split_host_port_invalid(value):
    with pytest.raises(ConfigError) as err:
        split_host_port(value, "listen")
    assert str(err.value) == f"listen: '{value}' is not HOST:PORT with a port from 1 to 65535"


# -- sample() ---------------------------------------------------------------------


def _write_sample(directory: Path, text: str) -> Path:
    for name in ("agent.crt", "agent.key", "ca.crt"):
        (directory / name).write_text("placeholder\n")
    return _write(directory, text)


def test_sample_loads(tmp_path):
    base = tmp_path.resolve()
    config = load(_write_sample(tmp_path, sample("prod")))
    assert config.cluster == "prod"
    assert config.listen == "0.0.0.0:7350"
    assert config.worker_address == "192.0.2.10"
    assert config.node_binary == Path("/opt/quilibrium/node/node")
    assert config.node_config_dir == Path("/var/lib/quil-agent/node/.config")
    assert config.work_dir == Path("/var/lib/quil-agent/node")
    assert config.state_dir == Path("/var/lib/quil-agent/state")
    assert config.tls == TLSFiles(cert=base / "agent.crt", key=base / "agent.key", ca=base / "ca.crt")


def test_sample_default_cluster(tmp_path):
    assert load(_write_sample(tmp_path, sample())).cluster == "quil"


@pytest.mark.parametrize("key", ["node_args", "stop_grace_seconds", "start_seconds", "log_max_bytes", "log_backups",
                                 "metrics_address", "crash_limit", "crash_window_seconds"])
def test_sample_matches_defaults(tmp_path, key):
    config = load(_write_sample(tmp_path, sample()))
    default = next(f.default for f in fields(AgentConfig) if f.name == key)
    assert getattr(config, key) == default


def test_sample_keys_are_known():
    keys = set(yaml.safe_load(sample()))
    assert keys <= {f.name for f in fields(AgentConfig)}


def test_node_binary_symlink_keeps_its_release_name(tmp_path):
    # The release (and with it the stand-in's generation) is read from the file name the agent runs.
    target = tmp_path / "bin" / "quil-simnode"
    target.parent.mkdir()
    target.write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "node-2.1.0.25-linux-amd64").symlink_to(target)
    text = MINIMAL.replace("node_binary: bin/node", "node_binary: bin/../bin/node-2.1.0.25-linux-amd64")
    config = load(_write(tmp_path, text))
    assert config.node_binary == tmp_path / "bin" / "node-2.1.0.25-linux-amd64"
