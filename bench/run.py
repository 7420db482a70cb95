#!/usr/bin/env python3
"""Run every benchmark side by side with its peer, print the table and write it as JSON.

  python3 bench/run.py            full run (about an hour on 2 cores)
  python3 bench/run.py --quick    small sizes, a few minutes; what CI runs

Needs the checkout's .venv (`python3 dev.py test` makes it) and re-runs itself
with that interpreter. Installs the peers (ansible-core, supervisor) into
bench/.venv-peers, and builds bench/lightworker.c with cc. Exits 1 when a
scenario produced no numbers; the times themselves are never checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PEERS = BENCH / ".venv-peers"
# Installed by name from the package index; the versions are recorded in the JSON.
PEER_PACKAGES = ("ansible-core", "supervisor")
SCENARIOS = ("fleet", "status", "crash", "start", "footprint")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        return reexec(argv)
    import scenarios
    from harness import Reaper, light_worker, log

    sizes = scenarios.QUICK if args.quick else scenarios.FULL
    if args.agent_mode:
        sizes = dataclasses.replace(sizes, agent_mode=args.agent_mode)
    peers_bin = install_peers()
    binary = light_worker()
    reaper = Reaper()
    results, failed = [], []
    ansible_status: list[float] = []
    runners = {
        "fleet": lambda: scenarios.fleet_scenarios(sizes, binary, peers_bin, reaper, ansible_status),
        "status": lambda: scenarios.status_scenario(sizes, binary, reaper, ansible_status),
        "crash": lambda: scenarios.crash_scenario(sizes, peers_bin, reaper),
        "start": lambda: scenarios.start_scenario(sizes, peers_bin, reaper),
        "footprint": lambda: scenarios.footprint_scenario(sizes, peers_bin, reaper),
    }
    started = time.monotonic()
    for name in args.only or SCENARIOS:
        log(f"scenario {name}")
        try:
            results += runners[name]()
        except Exception:  # noqa: BLE001 - one broken scenario must not hide the others' numbers
            failed.append(name)
            log(f"scenario {name} failed:\n{traceback.format_exc()}")
        finally:
            reaper.stop_all()
    missing = [r.scenario for r in results if not r.ours or not r.peer]
    print_table(results)
    write_json(args.json, results, sizes, peers_bin, time.monotonic() - started, failed)
    if failed or missing:
        print(f"error: no numbers from {', '.join(failed + missing)}; see the log above", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and short idle windows (CI)")
    parser.add_argument("--json", type=Path, help="where to write the results (default bench/results/full.json "
                        "or quick.json)")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, help="run only these scenarios")
    parser.add_argument("--agent-mode", choices=("auto", "process", "shared"),
                        help="fleet agents: one process each, many per process, or by fleet size (default auto)")
    return parser.parse_args(argv)


def reexec(argv: list[str]) -> int:
    if not VENV_PYTHON.exists():
        print(f"error: {VENV_PYTHON} is missing; run `python3 dev.py test` once to create it", file=sys.stderr)
        return 2
    return subprocess.run([str(VENV_PYTHON), str(Path(__file__).resolve()), *argv]).returncode


def install_peers() -> Path:
    """Create bench/.venv-peers with the peers installed, once; return its bin directory."""
    bin_dir = PEERS / "bin"
    if not (bin_dir / "ansible-playbook").exists() or not (bin_dir / "supervisord").exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
        subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--quiet", *PEER_PACKAGES], check=True)
    return bin_dir


def print_table(results: list) -> None:
    header = f"{'scenario':<44} {'ours':>9} {'peer':<30} {'peer':>9} {'ratio':>6} {'runs':>4}  target"
    print(header)
    print("-" * len(header))
    for row in results:
        ours = _number(row.ours_median, row.unit)
        peer = _number(row.peer_median, row.unit)
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
        print(f"{row.scenario:<44} {ours:>9} {row.peer_name:<30} {peer:>9} {ratio:>6} {len(row.ours):>4}  "
              f"{row.target}")


def _number(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s"
    return f"{value:.2f} {unit.split()[0]}" if unit.startswith("%") else f"{value:.1f} {unit.split()[0]}"


def write_json(path: Path | None, results: list, sizes, peers_bin: Path, seconds: float, failed: list[str]) -> None:
    path = path or BENCH / "results" / ("quick.json" if sizes.idle_seconds < 60 else "full.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "machine": machine(), "peers": peer_versions(peers_bin), "sizes": dataclasses.asdict(sizes),
        "seconds": round(seconds, 1), "failed": failed, "results": [r.as_dict() for r in results],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"results written to {path}")


def machine() -> dict:
    import psutil

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(), "commit": commit,
            "load_average_at_end": os.getloadavg()}


def peer_versions(peers_bin: Path) -> dict:
    script = ("import importlib.metadata as m; import json; "
              f"print(json.dumps({{p: m.version(p) for p in {list(PEER_PACKAGES)!r}}}))")
    done = subprocess.run([str(peers_bin / "python"), "-c", script], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
