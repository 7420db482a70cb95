import itertools
import random
import subprocess

import pytest

from quil_cluster.common import firewall
from quil_cluster.common.errors import ConfigError, QuilClusterError
from quil_cluster.common.firewall import (
    FirewallError,
    HostPolicy,
    PortRule,
    apply_nft,
    apply_ufw,
    port_ranges,
    remove_nft,
    remove_ufw,
    render_nft,
    render_nft_removal,
    render_show,
    render_ufw,
    ufw_rules_to_remove,
    validate,
)

CONTROL = "192.0.2.200"
WORKER = "192.0.2.201"

# A 1.4 worker host with four data workers that only the control host may reach.
WORKER_1_4 = HostPolicy(
    host="worker-01",
    address=WORKER,
    rules=(PortRule((40000, 40001, 40002, 40003), (CONTROL,), "1.4 worker ports"),),
)

# A 2.1 worker host: P2P ports are public, stream ports only for the control host.
WORKER_2_1 = HostPolicy(
    host="worker-02",
    address="192.0.2.202",
    rules=(
        PortRule((32500, 32501, 32502, 32503), (CONTROL,), "2.1 worker stream ports"),
        PortRule((25000, 25001, 25002, 25003), (), "2.1 worker P2P ports"),
    ),
)

NFT_PREAMBLE_LINES = [
    "add table inet quil_cluster",
    "delete table inet quil_cluster",
    "table inet quil_cluster {",
    "\tchain input {",
    "\t\ttype filter hook input priority filter; policy accept;",
    '\t\tiif "lo" accept',
    "\t\t# Replies to connections this host opened, whose local port may fall in a range below.",
    "\t\tct direction reply accept",
]


def expected_nft(host, address, *rule_lines):
    """The script render_nft should produce, with rule_lines inside the input chain."""
    lines = [
        f"# quil-cluster firewall for host {host} ({address}).",
        "# Replaces table inet quil_cluster in one transaction and touches no other table.",
        *NFT_PREAMBLE_LINES,
        *("\t\t" + line for line in rule_lines),
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# port_ranges


def test_port_ranges_contiguous():
    assert port_ranges([40000, 40001, 40002, 40003]) == [(40000, 40003)]


def test_port_ranges_gap_gives_two_ranges():
    assert port_ranges([40000, 40001, 40005]) == [(40000, 40001), (40005, 40005)]


def test_port_ranges_descending_input():
    # The community guide wrote 40003:40000, but ranges must come out ascending.
    assert port_ranges([40003, 40002, 40001, 40000]) == [(40000, 40003)]


def test_port_ranges_drops_duplicates():
    assert port_ranges([8336, 8336, 8337]) == [(8336, 8337)]


def test_port_ranges_empty():
    assert port_ranges([]) == []


def test_port_ranges_limits():
    assert port_ranges([65535, 1, 2, 65534]) == [(1, 2), (65534, 65535)]


def test_port_ranges_shuffled_never_inverted():
    generator = random.Random(20240401)
    for _ in range(200):
        ports = generator.sample(range(40000, 40064), generator.randint(1, 40))
        generator.shuffle(ports)

        ranges = port_ranges(ports)

        for start, end in ranges:
            assert start <= end, f"inverted range {start}-{end} for {ports}"
        for (_, end), (next_start, _) in itertools.pairwise(ranges):
            assert end + 1 < next_start, f"ranges {ranges} overlap, touch or are not ascending"
        covered = {port for start, end in ranges for port in range(start, end + 1)}
        assert covered == set(ports)


# ---------------------------------------------------------------------------
# render_nft


def test_render_nft_worker_1_4():
    assert render_nft(WORKER_1_4) == (
        "# quil-cluster firewall for host worker-01 (192.0.2.201).\n"
        "# Replaces table inet quil_cluster in one transaction and touches no other table.\n"
        "add table inet quil_cluster\n"
        "delete table inet quil_cluster\n"
        "table inet quil_cluster {\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        '\t\tiif "lo" accept\n'
        "\t\t# Replies to connections this host opened, whose local port may fall in a range below.\n"
        "\t\tct direction reply accept\n"
        "\t\t# 1.4 worker ports: only the sources below may connect.\n"
        "\t\tip saddr { 192.0.2.200, 192.0.2.201 } tcp dport { 40000-40003 } accept\n"
        "\t\ttcp dport { 40000-40003 } drop\n"
        "\t}\n"
        "}\n"
    )


def test_render_nft_ports_with_gap():
    policy = HostPolicy("worker-01", WORKER, (PortRule((40005, 40000, 40001), (CONTROL,), "1.4 worker ports"),))

    assert render_nft(policy) == expected_nft(
        "worker-01",
        WORKER,
        "# 1.4 worker ports: only the sources below may connect.",
        "ip saddr { 192.0.2.200, 192.0.2.201 } tcp dport { 40000-40001, 40005 } accept",
        "tcp dport { 40000-40001, 40005 } drop",
    )


def test_render_nft_ipv6():
    policy = HostPolicy(
        "worker-v6", "2001:db8::201", (PortRule((40000, 40001), ("2001:DB8::200",), "1.4 worker ports"),)
    )

    assert render_nft(policy) == expected_nft(
        "worker-v6",
        "2001:db8::201",
        "# 1.4 worker ports: only the sources below may connect.",
        "ip6 saddr { 2001:db8::200, 2001:db8::201 } tcp dport { 40000-40001 } accept",
        "tcp dport { 40000-40001 } drop",
    )


def test_render_nft_mixed_families():
    policy = HostPolicy(
        "worker-01", WORKER, (PortRule((40000,), ("2001:db8::200", CONTROL), "1.4 worker ports"),)
    )

    assert render_nft(policy) == expected_nft(
        "worker-01",
        WORKER,
        "# 1.4 worker ports: only the sources below may connect.",
        "ip saddr { 192.0.2.200, 192.0.2.201 } tcp dport { 40000 } accept",
        "ip6 saddr { 2001:db8::200 } tcp dport { 40000 } accept",
        "tcp dport { 40000 } drop",
    )


def test_render_nft_public_and_restricted():
    assert render_nft(WORKER_2_1) == expected_nft(
        "worker-02",
        "192.0.2.202",
        "# 2.1 worker P2P ports: tcp dport { 25000-25003 } is public, so no rule is needed.",
        "# 2.1 worker stream ports: only the sources below may connect.",
        "ip saddr { 192.0.2.200, 192.0.2.202 } tcp dport { 32500-32503 } accept",
        "tcp dport { 32500-32503 } drop",
    )


def test_render_nft_own_address_listed_once():
    policy = HostPolicy("control", CONTROL, (PortRule((40000,), (CONTROL, CONTROL), "1.4 worker ports"),))

    assert "ip saddr { 192.0.2.200 } tcp dport { 40000 } accept" in render_nft(policy)


def test_render_nft_no_rules():
    assert render_nft(HostPolicy("spare", WORKER, ())) == expected_nft("spare", WORKER)


def test_render_nft_is_deterministic():
    shuffled = HostPolicy(
        "worker-02",
        "192.0.2.202",
        (
            PortRule((25003, 25000, 25002, 25001), (), "2.1 worker P2P ports"),
            PortRule((32503, 32501, 32500, 32502), (CONTROL,), "2.1 worker stream ports"),
        ),
    )

    assert render_nft(shuffled) == render_nft(WORKER_2_1)


def test_render_nft_sorts_sources():
    policy = HostPolicy(
        "worker-01", WORKER, (PortRule((40000,), ("192.0.2.9", "192.0.2.10", "10.0.0.1"), "1.4 worker ports"),)
    )

    assert "ip saddr { 10.0.0.1, 192.0.2.9, 192.0.2.10, 192.0.2.201 } tcp dport" in render_nft(policy)


def test_render_nft_removal():
    assert render_nft_removal() == (
        "# Delete table inet quil_cluster. Adding it first makes the delete succeed when it is absent.\n"
        "add table inet quil_cluster\n"
        "delete table inet quil_cluster\n"
    )


# ---------------------------------------------------------------------------
# render_ufw


def test_render_ufw_worker_1_4():
    assert render_ufw(WORKER_1_4) == [
        "ufw allow from 192.0.2.200 to any port 40000:40003 proto tcp comment 'quil-cluster'",
        "ufw deny proto tcp to any port 40000:40003 comment 'quil-cluster'",
    ]


def test_render_ufw_ports_with_gap():
    policy = HostPolicy("worker-01", WORKER, (PortRule((40005, 40000, 40001), (CONTROL,), "1.4 worker ports"),))

    assert render_ufw(policy) == [
        "ufw allow from 192.0.2.200 to any port 40000:40001 proto tcp comment 'quil-cluster'",
        "ufw allow from 192.0.2.200 to any port 40005 proto tcp comment 'quil-cluster'",
        "ufw deny proto tcp to any port 40000:40001 comment 'quil-cluster'",
        "ufw deny proto tcp to any port 40005 comment 'quil-cluster'",
    ]


def test_render_ufw_ipv6():
    policy = HostPolicy(
        "worker-v6",
        "2001:db8::201",
        (PortRule((40000, 40001), ("2001:DB8::200", CONTROL), "1.4 worker ports"),),
    )

    assert render_ufw(policy) == [
        "ufw allow from 192.0.2.200 to any port 40000:40001 proto tcp comment 'quil-cluster'",
        "ufw allow from 2001:db8::200 to any port 40000:40001 proto tcp comment 'quil-cluster'",
        "ufw deny proto tcp to any port 40000:40001 comment 'quil-cluster'",
    ]


def test_render_ufw_public_and_restricted():
    assert render_ufw(WORKER_2_1) == [
        "ufw allow proto tcp to any port 25000:25003 comment 'quil-cluster'",
        "ufw allow from 192.0.2.200 to any port 32500:32503 proto tcp comment 'quil-cluster'",
        "ufw deny proto tcp to any port 32500:32503 comment 'quil-cluster'",
    ]


def test_render_ufw_no_rules():
    assert render_ufw(HostPolicy("spare", WORKER, ())) == []


# The community guide's example for worker host 192.168.0.201 and control host
# 192.168.0.200 was `ufw allow from 192.168.0.201 to any port 40003:40000 proto tcp`:
# the source is the worker itself and the range is inverted. These tests use
# the same topology with documentation addresses.


def test_render_ufw_guide_allows_control_host():
    lines = render_ufw(WORKER_1_4)

    assert "ufw allow from 192.0.2.200 to any port 40000:40003 proto tcp comment 'quil-cluster'" in lines


def test_render_ufw_guide_skips_worker_address():
    lines = render_ufw(WORKER_1_4)

    for line in lines:
        assert not line.startswith(f"ufw allow from {WORKER} "), line


def test_render_ufw_guide_mistake_not_repeated():
    # A policy written like the guide, with the worker's own address as the
    # source, gets no allow rule for it. Only the deny remains, so no other host
    # can reach the workers.
    policy = HostPolicy("worker-01", WORKER, (PortRule((40003, 40002, 40001, 40000), (WORKER,), "1.4 worker ports"),))

    assert render_ufw(policy) == ["ufw deny proto tcp to any port 40000:40003 comment 'quil-cluster'"]


def test_render_guide_ranges_not_inverted():
    policy = HostPolicy("worker-01", WORKER, (PortRule((40003, 40002, 40001, 40000), (CONTROL,), "1.4 worker ports"),))

    lines = render_ufw(policy)
    script = render_nft(policy)

    assert "40003:40000" not in " ".join(lines)
    assert "40003-40000" not in script
    assert "port 40000:40003 " in lines[0]
    assert "tcp dport { 40000-40003 }" in script


# ---------------------------------------------------------------------------
# render_show


def test_render_show_worker_1_4():
    assert render_show(WORKER_1_4) == (
        "== worker-01 (192.0.2.201) ==\n"
        "\n"
        "-- nftables: the agent runs 'nft -f -' with this script --\n"
        + render_nft(WORKER_1_4)
        + "\n"
        "-- ufw: run as root after deleting older rules with the comment 'quil-cluster' --\n"
        "ufw allow from 192.0.2.200 to any port 40000:40003 proto tcp comment 'quil-cluster'\n"
        "ufw deny proto tcp to any port 40000:40003 comment 'quil-cluster'\n"
    )


def test_render_show_no_rules():
    text = render_show(HostPolicy("spare", WORKER, ()))

    assert text.endswith(
        "-- ufw: run as root after deleting older rules with the comment 'quil-cluster' --\n"
        "# no rules\n"
    )


# ---------------------------------------------------------------------------
# validate


def one_rule(ports=(40000,), sources=(CONTROL,), purpose="1.4 worker ports", address=WORKER, host="worker-01"):
    return HostPolicy(host, address, (PortRule(ports, sources, purpose),))


SOURCE_FIX = "use the IPv4 or IPv6 address of a host that may connect, such as the control host"
OWN_FIX = "use the host's own IPv4 or IPv6 address"
IN_RULE = "in rule '1.4 worker ports' for host worker-01"


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        pytest.param(
            one_rule(sources=("192.0.2.300",)),
            f"invalid source address '192.0.2.300' {IN_RULE}: not an IP address; {SOURCE_FIX}",
            id="bad-ip",
        ),
        pytest.param(
            one_rule(sources=("192.0.2.0/24",)),
            f"invalid source address '192.0.2.0/24' {IN_RULE}: not an IP address; {SOURCE_FIX}",
            id="network",
        ),
        pytest.param(
            one_rule(sources=("control-01",)),
            f"invalid source address 'control-01' {IN_RULE}: not an IP address; {SOURCE_FIX}",
            id="host-name",
        ),
        pytest.param(
            one_rule(sources=(3221226184,)),
            f"invalid source address 3221226184 {IN_RULE}: not text; {SOURCE_FIX}",
            id="integer-ip",
        ),
        pytest.param(
            one_rule(sources=("fe80::1%eth0",)),
            f"invalid source address 'fe80::1%eth0' {IN_RULE}: "
            f"a zone (%eth0) cannot be matched by a firewall rule; {SOURCE_FIX}",
            id="zone",
        ),
        pytest.param(
            one_rule(sources=("::ffff:192.0.2.200",)),
            f"invalid source address '::ffff:192.0.2.200' {IN_RULE}: "
            "an IPv4-mapped address never matches a packet; use 192.0.2.200",
            id="ipv4-mapped",
        ),
        pytest.param(
            one_rule(sources=("0.0.0.0",)),
            f"invalid source address '0.0.0.0' {IN_RULE}: "
            f"not a unicast address, so no connection comes from it; {SOURCE_FIX}",
            id="unspecified",
        ),
        pytest.param(
            one_rule(sources=("ff02::1",)),
            f"invalid source address 'ff02::1' {IN_RULE}: "
            f"not a unicast address, so no connection comes from it; {SOURCE_FIX}",
            id="multicast",
        ),
        pytest.param(
            one_rule(sources=CONTROL),
            f"invalid sources '192.0.2.200' {IN_RULE}: "
            "use a list of IP addresses, or an empty list for public ports",
            id="sources-string",
        ),
        pytest.param(
            one_rule(address="192.0.2.256"),
            f"invalid address '192.0.2.256' for host worker-01: not an IP address; {OWN_FIX}",
            id="bad-own-address",
        ),
        pytest.param(
            one_rule(address="::"),
            "invalid address '::' for host worker-01: "
            f"not a unicast address, so no connection comes from it; {OWN_FIX}",
            id="unspecified-own-address",
        ),
        pytest.param(
            one_rule(ports=(0,)),
            f"invalid port 0 {IN_RULE}: use a port from 1 to 65535",
            id="port-0",
        ),
        pytest.param(
            one_rule(ports=(70000,)),
            f"invalid port 70000 {IN_RULE}: use a port from 1 to 65535",
            id="port-70000",
        ),
        pytest.param(
            one_rule(ports=("40000",)),
            f"invalid port '40000' {IN_RULE}: use a port from 1 to 65535",
            id="port-string",
        ),
        pytest.param(
            one_rule(ports=(True,)),
            f"invalid port True {IN_RULE}: use a port from 1 to 65535",
            id="port-bool",
        ),
        pytest.param(
            one_rule(ports=40000),
            f"invalid ports 40000 {IN_RULE}: use a list of TCP port numbers",
            id="ports-integer",
        ),
        pytest.param(
            one_rule(ports=()),
            "rule '1.4 worker ports' for host worker-01 has no ports; list at least one TCP port or remove the rule",
            id="no-ports",
        ),
        pytest.param(
            one_rule(ports=(40000, 40001, 40000)),
            "duplicate port 40000 for host worker-01: rule '1.4 worker ports' lists it twice; list each port once",
            id="duplicate-in-rule",
        ),
        pytest.param(
            one_rule(purpose="1.4 worker ports\ndelete table inet filter"),
            "invalid purpose '1.4 worker ports\\ndelete table inet filter' in a rule for host worker-01: "
            "it contains control characters; use printable characters only",
            id="purpose-newline",
        ),
        pytest.param(
            one_rule(purpose=""),
            "invalid purpose '' in a rule for host worker-01: "
            "it is empty or not text; use a short label such as '1.4 worker ports'",
            id="purpose-empty",
        ),
        pytest.param(
            one_rule(host=""),
            "invalid host name '': it is empty or not text; use the host name from the inventory",
            id="host-empty",
        ),
        pytest.param(
            one_rule(host="worker-01\r"),
            "invalid host name 'worker-01\\r': it contains control characters; use printable characters only",
            id="host-carriage-return",
        ),
    ],
)
def test_validate_rejects(policy, message):
    with pytest.raises(ConfigError) as caught:
        validate(policy)

    assert str(caught.value) == message


def test_validate_duplicate_port_across_rules():
    policy = HostPolicy(
        "worker-02",
        "192.0.2.202",
        (
            PortRule((32500, 32501), (CONTROL,), "2.1 worker stream ports"),
            PortRule((25000, 32501), (), "2.1 worker P2P ports"),
        ),
    )

    with pytest.raises(ConfigError) as caught:
        validate(policy)

    assert str(caught.value) == (
        "duplicate port 32501 for host worker-02: it is in rule '2.1 worker stream ports' "
        "and rule '2.1 worker P2P ports'; list each port in one rule only"
    )


def test_validate_duplicate_port_same_purpose():
    # Two rules may share a label, and the message must still name both.
    policy = HostPolicy(
        "worker-01",
        WORKER,
        (
            PortRule((40000,), (CONTROL,), "1.4 worker ports"),
            PortRule((40000,), ("192.0.2.199",), "1.4 worker ports"),
        ),
    )

    with pytest.raises(ConfigError) as caught:
        validate(policy)

    assert str(caught.value) == (
        "duplicate port 40000 for host worker-01: it is in rule '1.4 worker ports' "
        "and rule '1.4 worker ports'; list each port in one rule only"
    )


def test_validate_accepts_examples():
    for policy in (WORKER_1_4, WORKER_2_1, one_rule(ports=(1, 65535), sources=("2001:db8::200", CONTROL))):
        validate(policy)


def test_validate_accepts_own_address_as_source():
    # A single-host node has the control process on the same host.
    validate(one_rule(sources=(WORKER,)))


def test_config_error_is_value_error():
    with pytest.raises(ValueError):
        validate(one_rule(ports=(0,)))


def test_render_functions_validate():
    policy = one_rule(sources=("192.0.2.300",))

    with pytest.raises(ConfigError):
        render_nft(policy)
    with pytest.raises(ConfigError):
        render_ufw(policy)
    with pytest.raises(ConfigError):
        render_show(policy)


# ---------------------------------------------------------------------------
# ufw_rules_to_remove

# `ufw status numbered` as ufw prints it: rule numbers, then To, Action and
# From columns, then " # COMMENT". IPv6 rules come after the IPv4 ones.
UFW_STATUS = """\
Status: active

     To                         Action      From
     --                         ------      ----
[ 1] 22/tcp                     ALLOW IN    Anywhere
[ 2] 40000:40003/tcp            ALLOW IN    192.0.2.200                # quil-cluster
[ 3] 40000:40003/tcp            DENY IN     Anywhere                   # quil-cluster
[ 4] 8336/udp                   ALLOW IN    Anywhere                   # quilibrium p2p
[ 5] 9000/tcp                   ALLOW IN    192.0.2.50                 # quil-cluster-old
[ 6] 9001/tcp                   ALLOW IN    192.0.2.51                 # not quil-cluster
[ 7] 9002/tcp                   ALLOW IN    192.0.2.52                 # web # quil-cluster
[ 8] 9003/tcp                   DENY IN     Anywhere                   # quil-cluster (old)
[ 9] 22/tcp (v6)                ALLOW IN    Anywhere (v6)
[10] 40000:40003/tcp            ALLOW IN    2001:db8::200              # quil-cluster
[11] 40000:40003/tcp (v6)       DENY IN     Anywhere (v6)              # quil-cluster
[12] 8336/udp (v6)              ALLOW IN    Anywhere (v6)              # quilibrium p2p

"""


def test_ufw_rules_to_remove_sample():
    assert ufw_rules_to_remove(UFW_STATUS) == [11, 10, 3, 2]


def test_ufw_rules_to_remove_none_of_ours():
    ours_removed = "\n".join(line for line in UFW_STATUS.splitlines() if not line.endswith("# quil-cluster"))

    assert ufw_rules_to_remove(ours_removed) == []


def test_ufw_rules_to_remove_inactive():
    assert ufw_rules_to_remove("Status: inactive\n") == []


def test_ufw_rules_to_remove_three_digit_numbers():
    status = (
        "[ 99] 40000/tcp                  ALLOW IN    192.0.2.200                # quil-cluster\n"
        "[100] 40000/tcp                  DENY IN     Anywhere                   # quil-cluster\n"
    )

    assert ufw_rules_to_remove(status) == [100, 99]


def test_ufw_rules_to_remove_logged_rule():
    # ufw prints attributes such as (log) between the From column and the comment.
    status = "[ 1] 40000/tcp                  DENY IN     Anywhere                   (log) # quil-cluster\n"

    assert ufw_rules_to_remove(status) == [1]


# ---------------------------------------------------------------------------
# apply_nft, remove_nft, apply_ufw, remove_ufw with a fake runner


class FakeRunner:
    """Stands in for subprocess.run: records each call and returns scripted results."""

    def __init__(self, results=None):
        # argv tuple -> (returncode, stdout, stderr); other commands succeed with no output.
        self.results = results or {}
        self.argvs = []
        self.stdins = []
        self.options = []

    def __call__(self, argv, *, input=None, **options):
        self.argvs.append(argv)
        self.stdins.append(input)
        self.options.append(options)
        returncode, stdout, stderr = self.results.get(tuple(argv), (0, "", ""))
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)


def raising_runner(error):
    def run(argv, **options):
        raise error

    return run


NFT_PERMISSION_ERROR = (
    "/dev/stdin:3:1-28: Error: Could not process rule: Operation not permitted\n"
    "add table inet quil_cluster\n"
    "^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
)


def test_apply_nft_sends_script_on_stdin():
    runner = FakeRunner()

    apply_nft(WORKER_1_4, runner=runner)

    assert runner.argvs == [["nft", "-f", "-"]]
    assert runner.stdins == [render_nft(WORKER_1_4)]
    assert runner.options[0]["text"] is True
    assert runner.options[0]["capture_output"] is True
    assert runner.options[0]["timeout"] == firewall.COMMAND_TIMEOUT


def test_apply_nft_program_path():
    runner = FakeRunner()

    apply_nft(WORKER_1_4, nft="/usr/sbin/nft", runner=runner)

    assert runner.argvs == [["/usr/sbin/nft", "-f", "-"]]


def test_apply_nft_failure_includes_stderr():
    runner = FakeRunner({("nft", "-f", "-"): (1, "", NFT_PERMISSION_ERROR)})

    with pytest.raises(FirewallError) as caught:
        apply_nft(WORKER_1_4, runner=runner)

    assert str(caught.value) == (
        "replacing table inet quil_cluster failed: nft -f - exited with status 1: " + NFT_PERMISSION_ERROR.strip()
    )


def test_apply_nft_invalid_policy_runs_nothing():
    runner = FakeRunner()

    with pytest.raises(ConfigError):
        apply_nft(one_rule(ports=(0,)), runner=runner)

    assert runner.argvs == []


def test_apply_nft_program_missing():
    runner = raising_runner(FileNotFoundError(2, "No such file or directory", "nft"))

    with pytest.raises(FirewallError) as caught:
        apply_nft(WORKER_1_4, runner=runner)

    assert str(caught.value) == (
        "replacing table inet quil_cluster failed: "
        "cannot run nft (No such file or directory); install it or set its path"
    )
    assert isinstance(caught.value.__cause__, FileNotFoundError)


def test_apply_nft_timeout():
    runner = raising_runner(subprocess.TimeoutExpired(["nft", "-f", "-"], firewall.COMMAND_TIMEOUT))

    with pytest.raises(FirewallError) as caught:
        apply_nft(WORKER_1_4, runner=runner)

    assert str(caught.value) == "replacing table inet quil_cluster failed: nft timed out after 60 s"


def test_firewall_error_is_project_error():
    assert issubclass(FirewallError, QuilClusterError)


def test_remove_nft_runs_removal_script():
    runner = FakeRunner()

    remove_nft(nft="/usr/sbin/nft", runner=runner)

    assert runner.argvs == [["/usr/sbin/nft", "-f", "-"]]
    assert runner.stdins == [render_nft_removal()]


def test_remove_nft_failure_includes_stderr():
    runner = FakeRunner({("nft", "-f", "-"): (1, "", "Error: syntax error\n")})

    with pytest.raises(FirewallError) as caught:
        remove_nft(runner=runner)

    assert str(caught.value) == (
        "deleting table inet quil_cluster failed: nft -f - exited with status 1: Error: syntax error"
    )


def ufw_runner(status=UFW_STATUS, program="ufw"):
    return FakeRunner({(program, "status", "numbered"): (0, status, "")})


def test_apply_ufw_replaces_our_rules():
    runner = ufw_runner()

    apply_ufw(WORKER_1_4, runner=runner)

    assert runner.argvs == [
        ["ufw", "status", "numbered"],
        ["ufw", "--force", "delete", "11"],
        ["ufw", "--force", "delete", "10"],
        ["ufw", "--force", "delete", "3"],
        ["ufw", "--force", "delete", "2"],
        ["ufw", "allow", "from", "192.0.2.200", "to", "any", "port", "40000:40003", "proto", "tcp",
         "comment", "quil-cluster"],
        ["ufw", "deny", "proto", "tcp", "to", "any", "port", "40000:40003", "comment", "quil-cluster"],
    ]
    assert runner.stdins == [None] * 7


def test_apply_ufw_argv_matches_rendered_lines():
    runner = ufw_runner(status="Status: active\n", program="/usr/sbin/ufw")

    apply_ufw(WORKER_2_1, ufw="/usr/sbin/ufw", runner=runner)

    added = [" ".join(["ufw", *argv[1:-1], f"'{argv[-1]}'"]) for argv in runner.argvs[1:]]
    assert added == render_ufw(WORKER_2_1)
    assert all(argv[0] == "/usr/sbin/ufw" for argv in runner.argvs)


def test_apply_ufw_runs_ufw_in_c_locale():
    runner = ufw_runner()

    apply_ufw(WORKER_1_4, runner=runner)

    assert all(options["env"]["LC_ALL"] == "C" for options in runner.options)


def test_apply_ufw_inactive_changes_nothing():
    runner = ufw_runner(status="Status: inactive\n")

    with pytest.raises(FirewallError) as caught:
        apply_ufw(WORKER_1_4, runner=runner)

    assert str(caught.value) == (
        "ufw is inactive, so its rules are not listed or enforced; "
        "enable it with 'ufw enable' (allow SSH first) or use firewall mode nftables"
    )
    assert runner.argvs == [["ufw", "status", "numbered"]]


def test_apply_ufw_unexpected_status():
    runner = ufw_runner(status="ERROR: problem running iptables\n")

    with pytest.raises(FirewallError) as caught:
        apply_ufw(WORKER_1_4, runner=runner)

    assert str(caught.value) == (
        "unexpected output from 'ufw status numbered': 'ERROR: problem running iptables'; expected 'Status: active'"
    )
    assert runner.argvs == [["ufw", "status", "numbered"]]


def test_apply_ufw_invalid_policy_runs_nothing():
    runner = ufw_runner()

    with pytest.raises(ConfigError):
        apply_ufw(one_rule(sources=("192.0.2.300",)), runner=runner)

    assert runner.argvs == []


def test_apply_ufw_add_failure_includes_stderr():
    deny = ("ufw", "deny", "proto", "tcp", "to", "any", "port", "40000:40003", "comment", "quil-cluster")
    runner = FakeRunner(
        {
            ("ufw", "status", "numbered"): (0, "Status: active\n", ""),
            deny: (1, "", "ERROR: Could not update running firewall\n"),
        }
    )

    with pytest.raises(FirewallError) as caught:
        apply_ufw(WORKER_1_4, runner=runner)

    assert str(caught.value) == (
        "adding a ufw rule failed: ufw deny proto tcp to any port 40000:40003 comment quil-cluster "
        "exited with status 1: ERROR: Could not update running firewall"
    )


def test_apply_ufw_delete_failure_stops():
    runner = FakeRunner(
        {
            ("ufw", "status", "numbered"): (0, UFW_STATUS, ""),
            ("ufw", "--force", "delete", "10"): (1, "", "ERROR: Could not delete non-existent rule\n"),
        }
    )

    with pytest.raises(FirewallError) as caught:
        apply_ufw(WORKER_1_4, runner=runner)

    assert str(caught.value) == (
        "deleting ufw rule 10 failed: ufw --force delete 10 exited with status 1: "
        "ERROR: Could not delete non-existent rule"
    )
    assert runner.argvs[-1] == ["ufw", "--force", "delete", "10"]


def test_remove_ufw_deletes_only_our_rules():
    runner = ufw_runner()

    remove_ufw(runner=runner)

    assert runner.argvs == [
        ["ufw", "status", "numbered"],
        ["ufw", "--force", "delete", "11"],
        ["ufw", "--force", "delete", "10"],
        ["ufw", "--force", "delete", "3"],
        ["ufw", "--force", "delete", "2"],
    ]


def test_constants():
    assert firewall.MODES == ("off", "nftables", "ufw")
    assert firewall.TABLE == "quil_cluster"
    assert firewall.UFW_COMMENT == "quil-cluster"
