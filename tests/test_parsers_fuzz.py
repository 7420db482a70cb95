"""Property-based checks: no input crashes a parser, and every rejection is the project's own error."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quil_cluster.common import multiaddr, nodeconfig
from quil_cluster.common.errors import QuilClusterError
from quil_cluster.common.yamlio import load_mapping
from quil_cluster.coordinator.inventory import from_dicts

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that looks like YAML often enough to reach past the scanner.
yaml_like = st.text(alphabet=string.printable + "äß€\u2028", max_size=300) | st.builds(
    lambda keys, values: "\n".join(f"{k}: {v}" for k, v in zip(keys, values)),
    st.lists(st.sampled_from(["engine", "p2p", "db", "key", "dataWorkerMultiaddrs", "- a", "  x", "&a", "*a",
                              "<<", "{", "[", "? "]), max_size=8),
    st.lists(st.text(alphabet=string.printable, max_size=20), max_size=8))


def _accepts_or_rejects_cleanly(call) -> None:
    try:
        call()
    except QuilClusterError as err:
        assert str(err)  # every rejection carries a message


@FUZZ
@given(st.text(max_size=80) | st.builds(lambda ip, port: f"/ip4/{ip}/tcp/{port}", st.text(max_size=20),
                                        st.text(max_size=8)))
def test_multiaddr_parse_never_crashes(text):
    _accepts_or_rejects_cleanly(lambda: multiaddr.parse(text))


@FUZZ
@given(yaml_like, st.sampled_from(nodeconfig.GENERATIONS))
def test_nodeconfig_never_crashes(text, generation):
    def parse() -> None:
        config = nodeconfig.load(text, "fuzz.yml")
        config.worker_lists(generation)
        nodeconfig.worker_addresses(config, generation)
        nodeconfig.check_known_keys(config, generation)

    _accepts_or_rejects_cleanly(parse)


@FUZZ
@given(yaml_like)
def test_yaml_mapping_loader_never_crashes(text):
    _accepts_or_rejects_cleanly(lambda: load_mapping(text, "fuzz.yml"))


host_field = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20), st.lists(st.integers()))


@FUZZ
@given(st.lists(st.dictionaries(st.sampled_from(["name", "address", "agent", "control", "workers", "reserve",
                                                 "cpus", "firewall", "probe_only", "cpu_basis", "bogus"]),
                                host_field, max_size=8), max_size=4) | host_field)
def test_inventory_rows_never_crash(rows):
    _accepts_or_rejects_cleanly(lambda: from_dicts(rows, "hosts.yaml"))


agent_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                         st.text(max_size=30), st.lists(st.text(max_size=5), max_size=3),
                         st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))


@FUZZ
@given(st.dictionaries(st.sampled_from(["cluster", "listen", "worker_address", "node_binary", "node_config_dir",
                                        "state_dir", "tls", "node_args", "stop_grace_seconds", "start_seconds",
                                        "log_max_bytes", "log_backups", "node_env", "work_dir", "bogus"]),
                       agent_values, max_size=14))
def test_agent_config_never_crashes(values):
    import tempfile
    from pathlib import Path

    import yaml

    from quil_cluster.agent import config as agent_config

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "agent.yaml"
        path.write_text(yaml.safe_dump(values))
        _accepts_or_rejects_cleanly(lambda: agent_config.load(path))


@FUZZ
@given(st.dictionaries(st.sampled_from(["name", "node_generation", "control_config", "port_scheme", "base_port",
                                        "stream_base_port", "local", "auto_apply", "agent_cert_days", "exposure",
                                        "firewall", "bogus"]), agent_values, max_size=12))
def test_cluster_settings_never_crash(values):
    import tempfile
    from pathlib import Path

    import yaml

    from quil_cluster.coordinator import policy
    from quil_cluster.coordinator.home import Home

    def load_and_use() -> None:
        settings = Home(Path(directory)).load_settings()
        policy.exposures(settings)
        settings.ports()

    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "cluster.yaml").write_text(yaml.safe_dump(values))
        _accepts_or_rejects_cleanly(load_and_use)
