"""Turn a host's port policy into firewall rules for nftables or ufw.

A data worker of node 1.4 or 2.0 serves anyone who reaches its TCP port, so
a restricted port rule lists the only addresses that may connect. The agent
owns one nftables table (inet quil_cluster) and, in ufw mode, the ufw rules
whose comment is 'quil-cluster'. It never edits other tables or rules.

Only validated IP addresses and port numbers reach nft or ufw, and commands
run from argv lists without a shell.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, QuilClusterError

__all__ = [
    "MODES",
    "TABLE",
    "UFW_COMMENT",
    "FirewallError",
    "HostPolicy",
    "PortRule",
    "apply_nft",
    "apply_ufw",
    "port_ranges",
    "remove_nft",
    "remove_ufw",
    "render_nft",
    "render_nft_removal",
    "render_show",
    "render_ufw",
    "ufw_rules_to_remove",
    "validate",
]

# Values of the firewall mode setting. "off" leaves the firewall alone.
MODES = ("off", "nftables", "ufw")
# The one nftables table (family inet) the agent creates, replaces and deletes.
TABLE = "quil_cluster"
# The comment on every ufw rule the agent adds. Rules without it are never touched.
UFW_COMMENT = "quil-cluster"
# Seconds one nft or ufw command may run before the apply fails.
COMMAND_TIMEOUT = 60.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Runner = Callable[..., "subprocess.CompletedProcess[str]"]

_OWN_ADDRESS_FIX = "use the host's own IPv4 or IPv6 address"
_SOURCE_FIX = "use the IPv4 or IPv6 address of a host that may connect, such as the control host"

# A rule line of `ufw status numbered`: "[ 2] 40000:40003/tcp   ALLOW IN   192.0.2.200   # quil-cluster".
_UFW_NUMBERED_LINE = re.compile(r"\[\s*([0-9]+)\]\s(.*)")


class FirewallError(QuilClusterError):
    """Raised when nft or ufw cannot be run or rejects the rules."""


@dataclass(frozen=True)
class PortRule:
    """TCP ports on a host and the addresses allowed to reach them."""

    ports: tuple[int, ...]
    # An empty tuple makes the ports public.
    sources: tuple[str, ...]
    # A short label for comments and errors, such as "1.4 worker ports".
    purpose: str


@dataclass(frozen=True)
class HostPolicy:
    """The port rules of one host."""

    host: str
    # The host's own address, which every restricted rule also allows.
    address: str
    rules: tuple[PortRule, ...]


# ---------------------------------------------------------------------------
# Validation


def validate(policy: HostPolicy) -> None:
    """Check a policy, raising ConfigError that names the invalid value and the fix."""
    _check_label(policy.host, "host name", "", "the host name from the inventory")
    _parse_ip(policy.address, f"invalid address {policy.address!r} for host {policy.host}", _OWN_ADDRESS_FIX)
    port_owner: dict[int, PortRule] = {}
    for rule in policy.rules:
        _check_rule(policy.host, rule, port_owner)


def _check_rule(host: str, rule: PortRule, port_owner: dict[int, PortRule]) -> None:
    _check_label(rule.purpose, "purpose", f" in a rule for host {host}", "a short label such as '1.4 worker ports'")
    where = f" in rule '{rule.purpose}' for host {host}"
    _check_sequence(rule.ports, "ports", where, "a list of TCP port numbers")
    _check_sequence(rule.sources, "sources", where, "a list of IP addresses, or an empty list for public ports")
    if not rule.ports:
        raise ConfigError(
            f"rule '{rule.purpose}' for host {host} has no ports; list at least one TCP port or remove the rule"
        )
    for source in rule.sources:
        _parse_ip(source, f"invalid source address {source!r}{where}", _SOURCE_FIX)
    for port in rule.ports:
        _check_port(host, rule, port, port_owner)


def _check_port(host: str, rule: PortRule, port: object, port_owner: dict[int, PortRule]) -> None:
    # bool is a subclass of int, but True is not a port number.
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"invalid port {port!r} in rule '{rule.purpose}' for host {host}: use a port from 1 to 65535")
    other = port_owner.get(port)
    if other is rule:
        raise ConfigError(
            f"duplicate port {port} for host {host}: rule '{rule.purpose}' lists it twice; list each port once"
        )
    if other is not None:
        raise ConfigError(
            f"duplicate port {port} for host {host}: it is in rule '{other.purpose}' and rule '{rule.purpose}'; "
            "list each port in one rule only"
        )
    port_owner[port] = rule


def _check_label(value: object, kind: str, where: str, example: str) -> None:
    # Labels go into '#' comments of the nft script, where a line break would
    # end the comment and let the rest of the label run as nft commands.
    if not isinstance(value, str) or value == "":
        raise ConfigError(f"invalid {kind} {value!r}{where}: it is empty or not text; use {example}")
    if not value.isprintable():
        raise ConfigError(
            f"invalid {kind} {value!r}{where}: it contains control characters; use printable characters only"
        )


def _check_sequence(value: object, field: str, where: str, expected: str) -> None:
    # A bare string would be iterated one character at a time.
    if not isinstance(value, (tuple, list)):
        raise ConfigError(f"invalid {field} {value!r}{where}: use {expected}")


def _parse_ip(text: object, prefix: str, fix: str) -> IPAddress:
    """Parse one unicast address, raising ConfigError that starts with prefix and ends with fix."""
    if not isinstance(text, str):
        raise ConfigError(f"{prefix}: not text; {fix}")
    try:
        address = ipaddress.ip_address(text)
    except ValueError as err:
        raise ConfigError(f"{prefix}: not an IP address; {fix}") from err
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise ConfigError(f"{prefix}: a zone (%{address.scope_id}) cannot be matched by a firewall rule; {fix}")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # IPv4 clients arrive as IPv4 packets, so a rule on the mapped form never matches.
        raise ConfigError(f"{prefix}: an IPv4-mapped address never matches a packet; use {address.ipv4_mapped}")
    if address.is_unspecified or address.is_multicast:
        raise ConfigError(f"{prefix}: not a unicast address, so no connection comes from it; {fix}")
    return address


# ---------------------------------------------------------------------------
# Rendering


def port_ranges(ports: Iterable[int]) -> list[tuple[int, int]]:
    """Group ports into contiguous (start, end) ranges, ascending, each with start <= end."""
    ranges: list[tuple[int, int]] = []
    for port in sorted(set(ports)):
        if ranges and port == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], port)
        else:
            ranges.append((port, port))
    return ranges


def render_nft(policy: HostPolicy) -> str:
    """Render an nft script that replaces table inet quil_cluster in one transaction.

    nft -f runs the whole file as one batch, so either the new table replaces
    the old one or nothing changes. Adding the table before deleting it makes
    the delete succeed on the first run, when the table does not exist yet.
    """
    validate(policy)
    lines = [
        f"# quil-cluster firewall for host {policy.host} ({policy.address}).",
        f"# Replaces table inet {TABLE} in one transaction and touches no other table.",
        f"add table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        '\t\tiif "lo" accept',
        "\t\t# Replies to connections this host opened, whose local port may fall in a range below.",
        "\t\tct direction reply accept",
    ]
    for rule in _sorted_rules(policy):
        lines.extend("\t\t" + line for line in _nft_rule_lines(policy, rule))
    lines.extend(["\t}", "}"])
    return "\n".join(lines) + "\n"


def render_nft_removal() -> str:
    """Render an nft script that deletes table inet quil_cluster, succeeding when it is absent."""
    return "\n".join(
        [
            f"# Delete table inet {TABLE}. Adding it first makes the delete succeed when it is absent.",
            f"add table inet {TABLE}",
            f"delete table inet {TABLE}",
        ]
    ) + "\n"


def _sorted_rules(policy: HostPolicy) -> list[PortRule]:
    return sorted(policy.rules, key=lambda rule: (min(rule.ports), rule.purpose))


def _nft_rule_lines(policy: HostPolicy, rule: PortRule) -> list[str]:
    ports = "{ " + ", ".join(_format_range(start, end, "-") for start, end in port_ranges(rule.ports)) + " }"
    if not rule.sources:
        return [f"# {rule.purpose}: tcp dport {ports} is public, so no rule is needed."]
    lines = [f"# {rule.purpose}: only the sources below may connect."]
    allowed = _sorted_ips({*rule.sources, policy.address})
    for version, keyword in ((4, "ip"), (6, "ip6")):
        family = [ip.compressed for ip in allowed if ip.version == version]
        if family:
            lines.append(f"{keyword} saddr {{ {', '.join(family)} }} tcp dport {ports} accept")
    lines.append(f"tcp dport {ports} drop")
    return lines


def render_ufw(policy: HostPolicy) -> list[str]:
    """Render the ufw commands for a policy, one shell command line each, in the order to run them."""
    return [_format_ufw_command(args) for args in _ufw_commands(policy)]


def _ufw_commands(policy: HostPolicy) -> list[list[str]]:
    """Build the ufw arguments (without the program name) for a policy, allows before denies.

    The host's own address gets no allow rule, because ufw's default
    before.rules accept all traffic on lo, where a host's connections to
    itself arrive.
    """
    validate(policy)
    own = ipaddress.ip_address(policy.address)
    commands: list[list[str]] = []
    for rule in _sorted_rules(policy):
        ranges = [_format_range(start, end, ":") for start, end in port_ranges(rule.ports)]
        tail = ["comment", UFW_COMMENT]
        if not rule.sources:
            commands.extend(["allow", "proto", "tcp", "to", "any", "port", ports, *tail] for ports in ranges)
            continue
        sources = [ip.compressed for ip in _sorted_ips(rule.sources) if ip != own]
        for source in sources:
            commands.extend(
                ["allow", "from", source, "to", "any", "port", ports, "proto", "tcp", *tail] for ports in ranges
            )
        commands.extend(["deny", "proto", "tcp", "to", "any", "port", ports, *tail] for ports in ranges)
    return commands


def _format_ufw_command(args: list[str]) -> str:
    # Every argument is a keyword, an address or a port, so only the comment
    # (always last) is quoted, the way node runners type it.
    return "ufw " + " ".join(args[:-1]) + f" '{UFW_COMMENT}'"


def render_show(policy: HostPolicy) -> str:
    """Render what `quil-coord firewall show` prints for one host: a heading, the nft script, the ufw commands."""
    script = render_nft(policy)
    commands = render_ufw(policy)
    lines = [
        f"== {policy.host} ({policy.address}) ==",
        "",
        "-- nftables: the agent runs 'nft -f -' with this script --",
        script.rstrip("\n"),
        "",
        f"-- ufw: run as root after deleting older rules with the comment '{UFW_COMMENT}' --",
        *(commands or ["# no rules"]),
    ]
    return "\n".join(lines) + "\n"


def _sorted_ips(texts: Iterable[str]) -> list[IPAddress]:
    """Parse validated addresses, drop duplicates and sort them IPv4 first, then by value."""
    unique = {ipaddress.ip_address(text) for text in texts}
    return sorted(unique, key=lambda ip: (ip.version, int(ip)))


def _format_range(start: int, end: int, separator: str) -> str:
    return str(start) if start == end else f"{start}{separator}{end}"


# ---------------------------------------------------------------------------
# Applying


def apply_nft(policy: HostPolicy, *, nft: str = "nft", runner: Runner = subprocess.run) -> None:
    """Replace table inet quil_cluster with the rules of a policy, raising FirewallError if nft fails."""
    script = render_nft(policy)
    _run(runner, [nft, "-f", "-"], f"replacing table inet {TABLE}", stdin=script)


def remove_nft(*, nft: str = "nft", runner: Runner = subprocess.run) -> None:
    """Delete table inet quil_cluster if it exists, raising FirewallError if nft fails."""
    _run(runner, [nft, "-f", "-"], f"deleting table inet {TABLE}", stdin=render_nft_removal())


def ufw_rules_to_remove(status_numbered_output: str) -> list[int]:
    """Find the rules carrying our comment in `ufw status numbered` output, highest number first.

    Deleting in that order keeps the remaining numbers valid. ufw prints a
    rule's comment last, after " # " (get_status in ufw's backend_iptables.py).
    The first " # " is taken as its start, because addresses, ports and
    interface names contain no '#'.
    """
    numbers = []
    for line in status_numbered_output.splitlines():
        match = _UFW_NUMBERED_LINE.match(line.strip())
        if match is None:
            continue
        _, separator, comment = match.group(2).partition(" # ")
        if separator and comment.rstrip() == UFW_COMMENT:
            numbers.append(int(match.group(1)))
    return sorted(numbers, reverse=True)


def apply_ufw(policy: HostPolicy, *, ufw: str = "ufw", runner: Runner = subprocess.run) -> None:
    """Replace the ufw rules carrying our comment with the rules of a policy.

    Raises ConfigError before any change if the policy is invalid, and
    FirewallError if ufw is inactive or a command fails. Between the deletes
    and the adds, the ports follow ufw's default incoming policy. Connections
    opened earlier stay open, because ufw's before.rules accept established
    traffic before any user rule.
    """
    # 1. Render: ConfigError here leaves the firewall as it is.
    commands = _ufw_commands(policy)
    # 2. Delete our old rules.
    remove_ufw(ufw=ufw, runner=runner)
    # 3. Add the new rules.
    # NOTE: ufw uses the first rule that matches, and these rules are appended.
    # An earlier rule without our comment that allows these ports wins over our deny.
    for args in commands:
        _run(runner, [ufw, *args], "adding a ufw rule", env=_ufw_env())


def remove_ufw(*, ufw: str = "ufw", runner: Runner = subprocess.run) -> None:
    """Delete every ufw rule carrying our comment, raising FirewallError if ufw is inactive or fails."""
    status = _run(runner, [ufw, "status", "numbered"], "listing ufw rules", env=_ufw_env())
    _check_ufw_active(status)
    # NOTE: ufw has no transaction, so a rule another program adds or deletes
    # between the listing and a delete shifts the numbers.
    for number in ufw_rules_to_remove(status):
        _run(runner, [ufw, "--force", "delete", str(number)], f"deleting ufw rule {number}", env=_ufw_env())


def _check_ufw_active(status: str) -> None:
    first_line = status.strip().partition("\n")[0].strip()
    if first_line == "Status: active":
        return
    if first_line == "Status: inactive":
        # An inactive ufw lists no rules and enforces none.
        raise FirewallError(
            "ufw is inactive, so its rules are not listed or enforced; "
            "enable it with 'ufw enable' (allow SSH first) or use firewall mode nftables"
        )
    raise FirewallError(f"unexpected output from 'ufw status numbered': {first_line!r}; expected 'Status: active'")


def _ufw_env() -> dict[str, str]:
    # ufw translates its status lines, and _check_ufw_active reads the English ones.
    return {**os.environ, "LC_ALL": "C"}


def _run(
    runner: Runner,
    argv: Sequence[str],
    action: str,
    *,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run one command and return its stdout, raising FirewallError with its stderr if it fails."""
    options: dict[str, Any] = {"capture_output": True, "text": True, "check": False, "timeout": COMMAND_TIMEOUT}
    try:
        result = runner(list(argv), input=stdin, env=env, **options)
    except OSError as err:
        message = f"{action} failed: cannot run {argv[0]} ({err.strerror}); install it or set its path"
        raise FirewallError(message) from err
    except subprocess.TimeoutExpired as err:
        raise FirewallError(f"{action} failed: {argv[0]} timed out after {COMMAND_TIMEOUT:g} s") from err
    if result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip() or "no output"
        raise FirewallError(f"{action} failed: {shlex.join(argv)} exited with status {result.returncode}: {detail}")
    return result.stdout or ""
