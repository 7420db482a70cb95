"""Text and JSON renderings of command results; the only module that formats for the terminal."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from .apply import ApplyReport
from .assign import Plan, Slot
from .home import Settings
from .render import worker_lists
from .status import HostStatus


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [[str(c) for c in headers]] + [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


@dataclass
class Listing:
    """A table with the lines printed before and after it: one result, for plain text or ui.py's rich table."""

    headers: Sequence[str]
    rows: list[Sequence[object]]
    before: list[str] = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    # The plain form when it is not the table itself (apply prints one line per host).
    text: str | None = None

    def plain(self) -> str:
        if self.text is not None:
            return self.text
        parts = self.before + ([table(self.headers, self.rows)] if self.headers else []) + self.after
        return "\n".join(parts)


def host_listing(rows: list[dict]) -> Listing:
    return Listing(("NAME", "ADDRESS", "AGENT", "CONTROL", "WORKERS", "RESERVE", "CPUS"),
                   [(r["name"], r["address"], r["agent"], "yes" if r.get("control") else "", r.get("workers"),
                     r.get("reserve"), r.get("cpus")) for r in rows])


def host_table(rows: list[dict]) -> str:
    return host_listing(rows).plain()


def hosts_json(hosts: list) -> str:
    """Format every inventory field of every host, null where unset, so scripts get one fixed set of keys."""
    return json.dumps({"hosts": [asdict(h) for h in hosts]}, indent=2)


def assignment_rows(settings: Settings, slots: list[Slot]) -> list[dict]:
    first, stream = worker_lists(settings, slots)
    rows = []
    for index, slot in enumerate(sorted(slots, key=lambda s: s.core)):
        row = {"core": slot.core, "host": slot.host, "multiaddr": first[index]}
        if stream is not None:
            row["p2p_multiaddr"] = first[index]
            row["stream_multiaddr"] = stream[index]
            row["multiaddr"] = stream[index]
        rows.append(row)
    return rows


def assignment_listing(rows: list[dict], plan: Plan, generation: int, dry_run: bool) -> Listing:
    marks = {c: "new" for c in plan.added} | {c: f"moved from {plan.moved_from[c]}" for c in plan.moved}
    summary = (f"{len(rows)} workers, {len(plan.added)} new, {len(plan.moved)} moved, "
               f"{len(plan.removed)} removed; config generation {generation}")
    tail = "dry run: nothing recorded" if dry_run else "recorded; run quil-coord apply to push it"
    sizing = [f"{name}: {reason}" for name, reason in plan.sizing.items()]
    return Listing(("CORE", "HOST", "MULTIADDR", "CHANGE"),
                   [(r["core"], r["host"], r["multiaddr"], marks.get(r["core"], "")) for r in rows],
                   after=sizing + [summary, tail])


def assignment_table(rows: list[dict], plan: Plan, generation: int, dry_run: bool) -> str:
    return assignment_listing(rows, plan, generation, dry_run).plain()


def apply_lines(report: ApplyReport) -> str:
    lines = _apply_head(report)
    for host in report.hosts:
        outcome, detail = apply_outcome(host)
        lines.append(f"{host.name}: {outcome}" + (f" ({detail})" if detail else ""))
        lines += [f"{host.name}: warning: {warning}" for warning in host.warnings]
    lines.append(_apply_summary(report))
    return "\n".join(lines)


def apply_listing(report: ApplyReport) -> Listing:
    """Build the apply result as one row per host for a terminal; apply_lines stays the plain form."""
    rows = [(host.name, *apply_outcome(host)) for host in report.hosts]
    warnings = [f"{host.name}: warning: {warning}" for host in report.hosts for warning in host.warnings]
    return Listing(("HOST", "OUTCOME", "DETAIL"), rows, before=_apply_head(report),
                   after=warnings + [_apply_summary(report)], text=apply_lines(report))


def apply_outcome(host) -> tuple[str, str]:
    """Return a host's outcome word (upper case for a failure) and what changed or why it failed."""
    if host.outcome in ("failed", "unreachable", "skipped"):
        return host.outcome.upper(), host.error
    parts = [("config written" if host.config_changed else ""), ("firewall updated" if host.firewall_changed else "")]
    parts += [f"{label} {_cores(cores)}" for label, cores in
              (("started", host.started), ("stopped", host.stopped), ("restarted", host.restarted)) if cores]
    if host.control not in ("none", "held"):
        parts.append(f"control process {host.control}")
    if host.error:
        parts.append(host.error)
    return host.outcome, "; ".join(p for p in parts if p)


def _apply_head(report: ApplyReport) -> list[str]:
    lines = [f"warning: {warning}" for warning in report.warnings]
    return lines + [f"{name}: certificate {outcome}" for name, outcome in sorted(report.renewals.items())]


def _apply_summary(report: ApplyReport) -> str:
    counts = {o: sum(1 for h in report.hosts if h.outcome == o)
              for o in ("unchanged", "changed", "failed", "unreachable", "skipped")}
    summary = (", ".join(f"{n} {o}" for o, n in counts.items()) +
               f"; config generation {report.config_generation}; {report.seconds:.2f} s")
    not_converged = [h.name for h in report.hosts if h.outcome in ("failed", "unreachable", "skipped")]
    if not_converged:
        summary += f"\nnot converged: {', '.join(not_converged)}"
    return summary


def apply_json(report: ApplyReport) -> str:
    hosts = [{k: v for k, v in asdict(h).items() if k != "exit_code"} for h in report.hosts]
    return json.dumps({"config_generation": report.config_generation, "config_sha256": report.config_sha256,
                       "seconds": round(report.seconds, 3), "warnings": report.warnings, "hosts": hosts},
                      indent=2)


def status_table(hosts: list[HostStatus]) -> str:
    return status_listing(hosts).plain()


def status_listing(hosts: list[HostStatus]) -> Listing:
    rows: list[Sequence[object]] = []
    for host in hosts:
        if not host.reachable:
            rows.append((host.name, "", "unreachable", "", "", "", "", host.error))
            continue
        seen = {p["core"] for p in host.processes}
        for p in host.processes:
            name = "control" if p["core"] == 0 else p["core"]
            rows.append((host.name, name, p["state"], p["pid"] or "", _uptime(p["uptime_seconds"]),
                         p["restarts"], _listening(p), p["detail"]))
        rows += [(host.name, core, "missing", "", "", "", "", "assigned but not running; run apply")
                 for core in host.expected_cores if core not in seen]
    notes = []
    versions = sorted({h.node_version for h in hosts if h.node_version})
    if len(versions) > 1:
        notes.append("warning: hosts run different node releases: " + ", ".join(
            f"{h.name} {h.node_version}" for h in hosts if h.node_version))
    notes += [f"{h.name}: config.yml was changed after the last apply (drift"
              + (f" in {', '.join(h.drifted_keys)}" if h.drifted_keys else "") + "); quil-coord apply restores it"
              for h in hosts if h.drifted]
    expiry = [f"{h.name} {h.cert_expires_in_days:.1f}" for h in hosts if h.cert_expires_in_days is not None]
    if expiry:
        notes.append("agent certificates expire in (days): " + ", ".join(expiry))
    return Listing(("HOST", "CORE", "STATE", "PID", "UPTIME", "RESTARTS", "LISTENING", "DETAIL"), rows, after=notes)


def status_json(hosts: list[HostStatus], indent: int | None = 2) -> str:
    rows = [{k: v for k, v in asdict(h).items() if k != "exit_code"} for h in hosts]
    return json.dumps({"hosts": rows}, indent=indent)


def _listening(process: dict) -> str:
    if not process["listen_address"]:
        return ""
    return "yes" if process["listening"] else "no"


def _uptime(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _cores(cores: list[int]) -> str:
    return ",".join(str(c) for c in cores)


def timestamp(unix_seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_seconds))


def _token_state(record) -> str:
    if record.revoked:
        return "revoked"
    if record.uses_left <= 0:
        return "used"
    if record.expires <= time.time():
        return "expired"
    return "valid"


def token_listing(records: list) -> Listing:
    return Listing(("ID", "STATE", "EXPIRES", "USES LEFT", "WORKERS", "HOST NAME"),
                   [(r.id, _token_state(r), timestamp(r.expires), f"{r.uses_left}/{r.uses_total}", r.workers,
                     r.host_name) for r in records])


def token_table(records: list) -> str:
    return token_listing(records).plain()


def tokens_json(records: list) -> str:
    rows = [{k: v for k, v in asdict(r).items() if k != "hash"} | {"state": _token_state(r)} for r in records]
    return json.dumps({"tokens": rows}, indent=2)


_CELL = {"open": "open", "refused": "refused", "timeout": "filtered", "error": "error", "unreachable": "?"}


def verify_text(report) -> str:
    """Format the reachability grid (rows: worker ports, columns: sources), then one line per violation."""
    return verify_listing(report).plain()


def verify_listing(report) -> Listing:
    before = []
    if report.local:
        before.append("local cluster: all hosts share this machine's network, so exposure between hosts is not "
                      "probed")
    sources = sorted({c.source for c in report.cells})
    grid: dict[str, dict[str, str]] = {}
    for cell in report.cells:
        mark = "" if cell.ok else "!"
        grid.setdefault(cell.target.label, {})[cell.source] = _CELL.get(cell.observed, cell.observed) + mark
    headers = ["PORT"] + [f"FROM {s}" for s in sources] if grid else []
    rows = [[label] + [cells.get(s, "-") for s in sources] for label, cells in grid.items()]
    after = [f"{name}: agent port without a client certificate: {observed}"
             for name, observed in sorted(report.agent_ports.items())]
    after += [f"violation: {text}" for text in report.violations]
    after += [f"error: {name}: {reason}" for name, reason in sorted(report.errors.items())]
    probes = len(report.cells)
    count = len(report.violations)
    after.append(f"{probes} probes, {count} violation{'' if count == 1 else 's'}" + ("" if count else "; ok"))
    return Listing(headers, rows, before=before, after=after)


def verify_json(report) -> str:
    probes = [{"from": c.source, "to": c.target.address, "port": c.target.port, "host": c.target.host,
               "core": c.target.core, "class": c.target.port_class, "exposure": c.target.exposure,
               "expected": c.expected, "observed": c.observed, "ok": c.ok} for c in report.cells]
    return json.dumps({"ok": not report.violations and not report.errors, "local": report.local,
                       "probes": probes, "agent_ports": report.agent_ports, "violations": report.violations,
                       "errors": report.errors}, indent=2)


def firewall_json(policies: list) -> str:
    """Format the rules of firewall show as JSON, each host with its nftables script and ufw commands."""
    from ..common.firewall import render_nft, render_ufw

    hosts = [{"host": p.host, "address": p.address,
              "rules": [{"ports": list(r.ports), "sources": list(r.sources), "purpose": r.purpose} for r in p.rules],
              "nftables": render_nft(p), "ufw": render_ufw(p)} for p in policies]
    return json.dumps({"hosts": hosts}, indent=2)


def control_lines(outcomes: list) -> str:
    """Format one line per core of quil-coord start, stop or restart."""
    rows = [(o.host, "control" if o.core == 0 else o.core, o.result, o.pid or "", o.detail) for o in outcomes]
    return table(("HOST", "CORE", "RESULT", "PID", "DETAIL"), rows)


def control_json(host: str, outcomes: list) -> str:
    rows = [{k: v for k, v in asdict(o).items() if k not in ("host", "exit_code")} for o in outcomes]
    return json.dumps({"host": host, "results": rows}, indent=2)
