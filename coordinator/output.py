"""Text and JSON renderings of command results; the only module that formats for the terminal."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
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


def host_table(rows: list[dict]) -> str:
    return table(
        ("NAME", "ADDRESS", "AGENT", "CONTROL", "WORKERS", "RESERVE", "CPUS"),
        ((r["name"], r["address"], r["agent"], "yes" if r.get("control") else "", r.get("workers"),
          r.get("reserve"), r.get("cpus")) for r in rows),
    )


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


def assignment_table(rows: list[dict], plan: Plan, generation: int, dry_run: bool) -> str:
    marks = {c: "new" for c in plan.added} | {c: f"moved from {plan.moved_from[c]}" for c in plan.moved}
    body = table(("CORE", "HOST", "MULTIADDR", "CHANGE"),
                 ((r["core"], r["host"], r["multiaddr"], marks.get(r["core"], "")) for r in rows))
    summary = (f"{len(rows)} workers, {len(plan.added)} new, {len(plan.moved)} moved, "
               f"{len(plan.removed)} removed; config generation {generation}")
    tail = "dry run: nothing recorded" if dry_run else "recorded; run quil-coord apply to push it"
    sizing = "".join(f"{name}: {reason}\n" for name, reason in plan.sizing.items())
    return f"{body}\n{sizing}{summary}\n{tail}"


def apply_lines(report: ApplyReport) -> str:
    lines = [f"warning: {warning}" for warning in report.warnings]
    lines += [f"{name}: certificate {outcome}" for name, outcome in sorted(report.renewals.items())]
    for host in report.hosts:
        if host.outcome in ("failed", "unreachable", "skipped"):
            lines.append(f"{host.name}: {host.outcome.upper()} ({host.error})")
            continue
        parts = [("config written" if host.config_changed else ""), ("firewall updated" if host.firewall_changed else "")]
        parts += [f"{label} {_cores(cores)}" for label, cores in
                  (("started", host.started), ("stopped", host.stopped), ("restarted", host.restarted)) if cores]
        if host.control not in ("none", "held"):
            parts.append(f"control process {host.control}")
        if host.error:
            parts.append(host.error)
        detail = "; ".join(p for p in parts if p)
        lines.append(f"{host.name}: {host.outcome}" + (f" ({detail})" if detail else ""))
        lines += [f"{host.name}: warning: {warning}" for warning in host.warnings]
    counts = {o: sum(1 for h in report.hosts if h.outcome == o)
              for o in ("unchanged", "changed", "failed", "unreachable", "skipped")}
    lines.append(", ".join(f"{n} {o}" for o, n in counts.items()) +
                 f"; config generation {report.config_generation}; {report.seconds:.2f} s")
    not_converged = [h.name for h in report.hosts if h.outcome in ("failed", "unreachable", "skipped")]
    if not_converged:
        lines.append(f"not converged: {', '.join(not_converged)}")
    return "\n".join(lines)


def apply_json(report: ApplyReport) -> str:
    hosts = [{k: v for k, v in asdict(h).items() if k != "exit_code"} for h in report.hosts]
    return json.dumps({"config_generation": report.config_generation, "config_sha256": report.config_sha256,
                       "seconds": round(report.seconds, 3), "warnings": report.warnings, "hosts": hosts},
                      indent=2)


def status_table(hosts: list[HostStatus]) -> str:
    rows = []
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
    body = table(("HOST", "CORE", "STATE", "PID", "UPTIME", "RESTARTS", "LISTENING", "DETAIL"), rows)
    versions = sorted({h.node_version for h in hosts if h.node_version})
    if len(versions) > 1:
        body += "\nwarning: hosts run different node releases: " + ", ".join(
            f"{h.name} {h.node_version}" for h in hosts if h.node_version)
    body += "".join(f"\n{h.name}: config.yml was changed after the last apply (drift"
                    + (f" in {', '.join(h.drifted_keys)}" if h.drifted_keys else "") + "); quil-coord apply restores it"
                    for h in hosts if h.drifted)
    expiry = [f"{h.name} {h.cert_expires_in_days:.1f}" for h in hosts if h.cert_expires_in_days is not None]
    if expiry:
        body += "\nagent certificates expire in (days): " + ", ".join(expiry)
    return body


def status_json(hosts: list[HostStatus]) -> str:
    rows = [{k: v for k, v in asdict(h).items() if k != "exit_code"} for h in hosts]
    return json.dumps({"hosts": rows}, indent=2)


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


def token_table(records: list) -> str:
    return table(
        ("ID", "STATE", "EXPIRES", "USES LEFT", "WORKERS", "HOST NAME"),
        ((r.id, _token_state(r), timestamp(r.expires), f"{r.uses_left}/{r.uses_total}", r.workers, r.host_name)
         for r in records),
    )


def tokens_json(records: list) -> str:
    rows = [{k: v for k, v in asdict(r).items() if k != "hash"} | {"state": _token_state(r)} for r in records]
    return json.dumps({"tokens": rows}, indent=2)


_CELL = {"open": "open", "refused": "refused", "timeout": "filtered", "error": "error", "unreachable": "?"}


def verify_text(report) -> str:
    """Format the reachability grid (rows: worker ports, columns: sources), then one line per violation."""
    lines = []
    if report.local:
        lines.append("local cluster: all hosts share this machine's network, so exposure between hosts is not "
                     "probed")
    sources = sorted({c.source for c in report.cells})
    rows: dict[str, dict[str, str]] = {}
    for cell in report.cells:
        mark = "" if cell.ok else "!"
        rows.setdefault(cell.target.label, {})[cell.source] = _CELL.get(cell.observed, cell.observed) + mark
    if rows:
        lines.append(table(["PORT"] + [f"FROM {s}" for s in sources],
                           ([label] + [cells.get(s, "-") for s in sources] for label, cells in rows.items())))
    for name, observed in sorted(report.agent_ports.items()):
        lines.append(f"{name}: agent port without a client certificate: {observed}")
    lines += [f"violation: {text}" for text in report.violations]
    lines += [f"error: {name}: {reason}" for name, reason in sorted(report.errors.items())]
    probes = len(report.cells)
    count = len(report.violations)
    lines.append(f"{probes} probes, {count} violation{'' if count == 1 else 's'}" + ("" if count else "; ok"))
    return "\n".join(lines)


def verify_json(report) -> str:
    probes = [{"from": c.source, "to": c.target.address, "port": c.target.port, "host": c.target.host,
               "core": c.target.core, "class": c.target.port_class, "exposure": c.target.exposure,
               "expected": c.expected, "observed": c.observed, "ok": c.ok} for c in report.cells]
    return json.dumps({"ok": not report.violations and not report.errors, "local": report.local,
                       "probes": probes, "agent_ports": report.agent_ports, "violations": report.violations,
                       "errors": report.errors}, indent=2)
