"""Each doctor check fires on the facts of a broken host and passes on a sound one."""

from __future__ import annotations

from quil_cluster.coordinator import checks
from quil_cluster.coordinator.checks import Finding, ProcessFacts

GIB = 1024**3
MIB = 1024**2


def test_clock_passes_within_limit():
    assert checks.check_clock("w1", agent_time=1000.9, sent=999.9, received=1000.1) is None


def test_clock_fires_when_agent_ahead():
    finding = checks.check_clock("w1", agent_time=1003.0, sent=999.9, received=1000.1)
    assert finding is not None
    assert (finding.host, finding.check) == ("w1", "clock")
    assert finding.problem.startswith("the host's clock is 3.0 s ahead of this machine's (measured to within 0.10 s;")
    assert finding.fix.startswith("turn on time synchronization on both machines (timedatectl set-ntp true")


def test_clock_fires_when_agent_behind():
    finding = checks.check_clock("w1", agent_time=998.0, sent=1000.0, received=1000.0)
    assert finding is not None
    assert "2.0 s behind this machine's" in finding.problem


def test_clock_allows_half_round_trip():
    # 1.4 s apart, but the reply may have left anywhere within the 1 s round trip.
    assert checks.check_clock("w1", agent_time=1001.4, sent=999.5, received=1000.5) is None
    assert checks.check_clock("w1", agent_time=1001.6, sent=999.5, received=1000.5) is not None


def test_ephemeral_passes_below_range():
    assert checks.check_ephemeral("w1", [25000, 25001], 32768, 60999, "") is None


def test_ephemeral_passes_when_unknown():
    assert checks.check_ephemeral("w1", [40000], 0, 0, "") is None


def test_ephemeral_passes_when_reserved():
    assert checks.check_ephemeral("w1", [40000, 40001, 40002], 32768, 60999, "40000-40002") is None


def test_ephemeral_fires_inside_range():
    finding = checks.check_ephemeral("w1", [40000, 40001, 40002, 40010], 32768, 60999, "")
    assert finding == Finding(
        "w1", "ephemeral-ports",
        "worker ports 40000-40002,40010 are inside the ephemeral port range 32768-60999, so an outgoing "
        "connection can take one and the worker then fails to bind it ('address already in use') after a restart",
        "reserve them on the host: sysctl -w net.ipv4.ip_local_reserved_ports=40000-40002,40010, and put "
        "net.ipv4.ip_local_reserved_ports = 40000-40002,40010 in /etc/sysctl.d/90-quil-cluster.conf so it "
        "survives a reboot",
    )


def test_ephemeral_fix_keeps_existing_reservations():
    finding = checks.check_ephemeral("w1", [40000, 40001], 32768, 60999, "40000,50000")
    assert finding is not None
    assert finding.problem.startswith("worker ports 40001 are inside")
    assert "ip_local_reserved_ports=40000-40001,50000," in finding.fix


def test_address_passes_when_on_interface():
    assert checks.check_address("w1", "192.0.2.11", "192.0.2.11", ["127.0.0.1", "192.0.2.11"]) is None


def test_address_passes_for_any_loopback():
    assert checks.check_address("w1", "127.0.0.3", "127.0.0.3", ["127.0.0.1", "::1"]) is None


def test_address_fires_when_vpn_down():
    finding = checks.check_address("w1", "100.64.0.12", "100.64.0.12", ["127.0.0.1", "192.0.2.11"])
    assert finding is not None
    assert finding.problem == (
        "the planned worker address 100.64.0.12 is on no interface of the host (it has 127.0.0.1, 192.0.2.11), "
        "so its workers cannot bind it; a VPN such as Tailscale or WireGuard that is not up yet looks like this")
    assert "quil-coord host set w1 --address NEW" in finding.fix


def test_address_fires_when_agent_binds_another():
    finding = checks.check_address("w1", "192.0.2.11", "192.0.2.99", ["192.0.2.11", "192.0.2.99"])
    assert finding is not None
    assert finding.problem == ("the agent's worker_address is 192.0.2.99 but the inventory plans 192.0.2.11, "
                               "so apply refuses this host")
    assert finding.fix.startswith("set worker_address: 192.0.2.11 in the host's agent.yaml")


def test_address_ipv6_compares_parsed():
    assert checks.check_address("w1", "2001:db8::1", "", ["2001:db8:0::1"]) is None


def test_drift_passes_when_file_matches_render():
    assert checks.check_drift("w1", rendered="aa", applied="aa", on_disk="aa") is None


def test_drift_passes_before_first_apply():
    assert checks.check_drift("w1", rendered=None, applied="", on_disk="") is None


def test_drift_fires_on_edit():
    finding = checks.check_drift("w1", rendered="aa", applied="aa", on_disk="bb")
    assert finding is not None
    assert finding.problem.startswith("config.yml was edited on the host after the last apply")
    assert finding.fix.startswith("quil-coord config show --host w1 --diff shows the difference; quil-coord apply "
                                  "restores the canonical file")


def test_drift_fires_on_edit_without_render():
    finding = checks.check_drift("w1", rendered=None, applied="aa", on_disk="bb")
    assert finding is not None
    assert finding.problem.startswith("config.yml was edited")


def test_drift_fires_when_apply_pending():
    finding = checks.check_drift("w1", rendered="cc", applied="aa", on_disk="aa")
    assert finding is not None
    assert finding.problem.startswith("config.yml differs from what apply would push now")
    assert finding.fix.endswith("; quil-coord apply pushes it")


def test_drift_fires_when_file_missing():
    assert checks.check_drift("w1", rendered="cc", applied="", on_disk="") == Finding(
        "w1", "config-drift", "the host has no config.yml yet", "run quil-coord apply")


def test_control_config_passes_when_usable():
    assert checks.check_control_config("a", "/etc/quil/config.yml", None) is None


def test_control_config_fires_on_error():
    error = "/etc/quil/config.yml:12: invalid YAML: expected the node content (column 1)"
    assert checks.check_control_config("a", "/etc/quil/config.yml", error) == Finding(
        "a", checks.CONTROL_CONFIG,
        "the control host's node config cannot be used (/etc/quil/config.yml:12: invalid YAML: expected the node "
        "content (column 1)), so apply rejects it and the config-drift check cannot tell whether the hosts' "
        "config.yml files are current",
        "correct /etc/quil/config.yml where the error points, check it with quil-coord config show, then run "
        "quil-coord apply",
    )


def test_processes_pass_when_running_or_stopped():
    processes = [ProcessFacts(0, "running", 0, ""), ProcessFacts(1, "running", 3, ""),
                 ProcessFacts(2, "stopped", 0, ""), ProcessFacts(3, "waiting", 0, "waiting for address 10.0.0.5 to appear on an interface")]
    assert checks.check_processes("w1", processes) == []


def test_processes_fire_on_fatal_worker():
    detail = ("10 failures in 180 s, last: exit status 2;"
              " fix the cause, then run quil-coord restart for this core (or apply again)")
    assert checks.check_processes("w1", [ProcessFacts(4, "fatal", 2, detail)]) == [Finding(
        "w1", checks.PROCESS_STATE,
        f"worker core 4 is fatal, so the agent no longer restarts it: {detail}",
        "quil-coord logs w1 --core 4 shows its output; fix the cause, then run quil-coord restart w1 --core 4",
    )]


def test_processes_fire_on_backoff_control_process():
    detail = "spawn failed: No such file or directory; 3 failures in 180 s, restarting in 2.0 s"
    assert checks.check_processes("w1", [ProcessFacts(0, "backoff", 0, detail)]) == [Finding(
        "w1", checks.PROCESS_STATE,
        f"the control process (core 0) is in backoff after a failure, with 0 restarts so far: {detail}",
        "quil-coord logs w1 --core 0 shows its output; the agent keeps retrying and marks it fatal when it fails "
        "too often in a row",
    )]


def test_processes_one_finding_per_core():
    processes = [ProcessFacts(1, "fatal", 0, ""), ProcessFacts(2, "running", 0, ""),
                 ProcessFacts(3, "backoff", 1, "x")]
    found = checks.check_processes("w1", processes)
    assert [f.problem.split(" is ")[0] for f in found] == ["worker core 1", "worker core 3"]
    assert found[0].problem == "worker core 1 is fatal, so the agent no longer restarts it: no detail reported"


def test_versions_pass_when_equal():
    assert checks.check_versions({"ctl": "2.1.0.25", "w1": "2.1.0.25", "w2": ""}, "ctl") == []


def test_versions_fire_against_control_host():
    found = checks.check_versions({"ctl": "2.1.0.25", "w1": "2.1.0.24", "w2": "2.1.0.24"}, "ctl")
    assert [(f.host, f.check) for f in found] == [("w1", "node-version"), ("w2", "node-version")]
    assert found[0].problem.startswith("the host runs node release 2.1.0.24, the control host runs 2.1.0.25;")
    assert found[0].fix.startswith("run one release on every host: install it with its .dgst files")


def test_versions_without_control_use_most_common():
    found = checks.check_versions({"a": "2.1.0.24", "b": "2.1.0.25", "c": "2.1.0.25"}, None)
    assert [f.host for f in found] == ["a"]


def test_signatures_pass_with_files():
    files = ["node-2.1.0.25-linux-amd64.dgst", "node-2.1.0.25-linux-amd64.dgst.sig.1"]
    assert checks.check_signatures("w1", "/opt/q/node-2.1.0.25-linux-amd64", files, disabled=False) is None


def test_signatures_pass_when_check_disabled():
    assert checks.check_signatures("w1", "/opt/q/node", [], disabled=True) is None


def test_signatures_fire_without_files():
    finding = checks.check_signatures("w1", "/opt/q/node-2.1.0.25-linux-amd64", [], disabled=False)
    assert finding is not None
    assert finding.problem.startswith("node-2.1.0.25-linux-amd64.dgst and node-2.1.0.25-linux-amd64.dgst.sig.N "
                                      "missing in /opt/q (")
    assert "--signature-check=false to node_args" in finding.fix


def test_signatures_fire_without_sig_files():
    finding = checks.check_signatures("w1", "/opt/q/node", ["node.dgst"], disabled=False)
    assert finding is not None
    assert finding.problem.startswith("node.dgst.sig.N missing in /opt/q")


def test_memory_passes_when_enough():
    # 4 x 1792 MiB + 2 GiB = 9 GiB.
    assert checks.check_memory("w1", 4, 9 * GIB, 1792 * MIB) is None


def test_memory_fires_when_too_small():
    finding = checks.check_memory("w1", 4, 8 * GIB, 1792 * MIB)
    assert finding == Finding(
        "w1", "memory",
        "4 workers with a memory limit of 1.8 GiB each need 9.0 GiB with 2 GiB left free, but the host has "
        "8.0 GiB; workers will be killed when memory runs out",
        "quil-coord host set w1 --workers 3, then quil-coord assign and apply; or lower "
        "engine.dataWorkerMemoryLimit in the control host's config.yml",
    )


def test_memory_fires_without_room_for_one():
    finding = checks.check_memory("w1", 1, 2 * GIB, 1792 * MIB)
    assert finding is not None
    assert finding.fix.startswith("add memory to the host or remove it from the cluster;")


def test_gomaxprocs_passes_unset_or_within():
    assert checks.check_gomaxprocs("w1", "", 8) is None
    assert checks.check_gomaxprocs("w1", "8", 8) is None


def test_gomaxprocs_fires_above_cpus():
    finding = checks.check_gomaxprocs("w1", "48", 32)
    assert finding is not None
    assert finding.problem.startswith("GOMAXPROCS=48 in the workers' environment is above the host's 32 CPUs")
    assert finding.fix.startswith("remove GOMAXPROCS from node_env in the host's agent.yaml")


def test_gomaxprocs_fires_on_garbage():
    finding = checks.check_gomaxprocs("w1", "lots", 8)
    assert finding is not None
    assert finding.problem == ("GOMAXPROCS=lots in the workers' environment is not a positive whole number, "
                               "so Go ignores it")
