"""The benchmark scenarios; each returns table rows (Result) measured side by side with its peer."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ansible_peer import AnsibleFleet
from fleet import Fleet, bring_up
from harness import Reaper, Result, free_base, log, wait_listening
import local


@dataclass(frozen=True)
class Sizes:
    """How much each scenario does; --quick shrinks every number."""

    fleet_sizes: tuple[int, ...]
    apply_runs: int
    # Fleet size of the no-change apply and of the Ansible status peer (the largest one).
    enroll_at: int
    enroll_runs: int
    status_hosts: int
    status_workers: int
    status_runs: int
    crash_runs: int
    start_workers: int
    start_runs: int
    footprint_sizes: tuple[int, ...]
    idle_seconds: float
    agent_mode: str = "auto"


FULL = Sizes(fleet_sizes=(10, 50, 200), apply_runs=3, enroll_at=50, enroll_runs=3, status_hosts=200,
             status_workers=64, status_runs=5, crash_runs=10, start_workers=255, start_runs=3,
             footprint_sizes=(64, 255), idle_seconds=60.0)
QUICK = Sizes(fleet_sizes=(10,), apply_runs=2, enroll_at=10, enroll_runs=2, status_hosts=10, status_workers=8,
              status_runs=3, crash_runs=4, start_workers=32, start_runs=2, footprint_sizes=(16,), idle_seconds=6.0)


# 1, 2 and 7: config push, no-change apply and enrollment

def fleet_scenarios(sizes: Sizes, binary: Path, peers_bin: Path, reaper: Reaper,
                    ansible_status: list[float]) -> list[Result]:
    """Rows of scenarios 1, 2 and 7; fills ansible_status with the status peer's times."""
    results = []
    for count in sizes.fleet_sizes:
        with tempfile.TemporaryDirectory(prefix=f"quil-bench-fleet{count}-") as tmp:
            root = Path(tmp)
            max_workers = 2 * sizes.apply_runs + 2
            fleet = bring_up(root / "quil", count, 1, binary, reaper, max_workers, sizes.agent_mode)
            peer = AnsibleFleet(root / "ansible", count, binary, peers_bin, reaper)
            peer.create(max_workers)
            try:
                results += _push_runs(fleet, peer, sizes.apply_runs)
                if count == max(sizes.fleet_sizes):
                    results += _unchanged_runs(fleet, peer, sizes.apply_runs, ansible_status)
                if count == sizes.enroll_at:
                    push = next(r for r in results if r.scenario.endswith(f"N={count}") and "50 forks" in r.peer_name)
                    results.append(_enroll_runs(fleet, reaper, sizes.enroll_runs, push))
            finally:
                fleet.stop()
                reaper.stop_all()
    return results


def _push_runs(fleet: Fleet, peer: AnsibleFleet, runs: int) -> list[Result]:
    count = fleet.count
    ours, five, fifty = [], [], []
    for run in range(runs):
        fleet.set_workers(fleet.workers + 1)
        ours.append(fleet.timed("apply", "--no-verify"))
        wait_listening(fleet.worker_targets())
        five.append(peer.grow(5))
        fifty.append(peer.grow(50))
        log(f"push N={count} run {run + 1}: quil-coord {ours[-1]:.2f} s, ansible 5 forks {five[-1]:.2f} s, "
            f"50 forks {fifty[-1]:.2f} s")
    note = f"agents: {fleet.mode} mode; each host grows by one worker, the control process restarts"
    scenario = f"1. push + restart, N={count}"
    return [Result(scenario, ours, "ansible, 5 forks", five, note=note),
            Result(scenario, ours, "ansible, 50 forks", fifty, note=note,
                   target="<= 0.1 at N=200" if count == 200 else "")]


def _unchanged_runs(fleet: Fleet, peer: AnsibleFleet, runs: int, status_peer: list[float]) -> list[Result]:
    ours, theirs = [], []
    for _ in range(max(runs, 3)):
        ours.append(fleet.timed("apply", "--no-verify"))
        theirs.append(peer.push_unchanged(50))
    status_peer += [peer.status(50) for _ in range(max(runs, 3))]
    log(f"no-change N={fleet.count}: quil-coord {min(ours):.2f} s, ansible push {min(theirs):.2f} s; "
        f"ansible status {min(status_peer):.2f} s")
    return [Result(f"2. no-change apply, N={fleet.count}", ours, "ansible push, 50 forks", theirs,
                   target="< 1 s", note=f"agents: {fleet.mode} mode")]


def _enroll_runs(fleet: Fleet, reaper: Reaper, runs: int, push_peer: Result) -> Result:
    """Time `quil-agent join --run` until the new host's workers listen, with quil-coord serve running."""
    serve_port = free_base([fleet.addresses[0]], 1, 47351)
    listen = f"{fleet.addresses[0]}:{serve_port}"
    with open(fleet.root / "serve.log", "ab") as output:
        server = reaper.spawn([sys.executable, "-m", "quil_cluster.coordinator", "--home", str(fleet.home),
                               "serve", "--listen", listen, "--advertise", listen], stdout=output, stderr=output,
                              cwd=fleet.root)
    wait_listening([(fleet.addresses[0], serve_port)], timeout=60)
    times = []
    for run in range(runs):
        address = f"127.77.250.{run + 1}"
        text = fleet.coord_output("token", "create", "--workers", "2", "--host-name", f"joined{run}")
        token = re.search(r"--token (\S+)", text).group(1)
        ca_hash = re.search(r"--ca-hash (\S+)", text).group(1)
        directory = fleet.root / "joined" / str(run)
        command = [sys.executable, "-m", "quil_cluster.agent", "join", listen, "--token", token, "--ca-hash",
                   ca_hash, "--address", address, "--agent-port", str(fleet.agent_port), "--dir", str(directory),
                   "--node-binary", str(fleet.binary), "--node-config-dir", str(directory / "node" / ".config"),
                   "--state-dir", str(directory / "state"), "--run"]
        directory.mkdir(parents=True)
        started = time.monotonic()
        with open(directory / "agent.log", "ab") as output:
            agent = reaper.spawn(command, stdout=output, stderr=output, cwd=fleet.root)
        ports = [(address, fleet.base_port + i) for i in range(2)]
        times.append(wait_listening(ports, timeout=120, interval=0.01) - started)
        log(f"enroll run {run + 1} at {fleet.count + run} hosts: {times[-1]:.2f} s")
        fleet.joined.append(agent)
    for agent in fleet.joined:
        reaper.stop(agent)
    reaper.stop(server)
    return Result(f"7. enroll one host, cluster of {fleet.count}", times, "ansible push, 50 forks",
                  push_peer.peer, target="< 3 s",
                  note="peer: the Ansible way to add a host is to re-run the push playbook on all hosts")


# 6: status of many hosts with many workers

def status_scenario(sizes: Sizes, binary: Path, reaper: Reaper, ansible_status: list[float]) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="quil-bench-status-") as tmp:
        fleet = bring_up(Path(tmp), sizes.status_hosts, sizes.status_workers, binary, reaper,
                         sizes.status_workers, sizes.agent_mode)
        try:
            times = [fleet.timed("status") for _ in range(sizes.status_runs)]
        finally:
            fleet.stop()
            reaper.stop_all()
    log(f"status of {sizes.status_hosts} x {sizes.status_workers}: {min(times):.2f} s")
    return [Result(f"6. status, {sizes.status_hosts} hosts x {sizes.status_workers} workers", times,
                   "ansible ad-hoc pgrep, 50 forks", ansible_status, target="< 1 s",
                   note=f"agents: {fleet.mode} mode; peer measured on the push fleet of "
                        f"{max(sizes.fleet_sizes)} hosts")]


# 3, 4 and 5: one host, quil-agent against supervisord and the shell loop

def crash_scenario(sizes: Sizes, peers_bin: Path, reaper: Reaper) -> list[Result]:
    count = sizes.crash_runs
    with tempfile.TemporaryDirectory(prefix="quil-bench-crash-") as tmp:
        root = Path(tmp)
        agent, sup = _local_pair(root, reaper, peers_bin, count)
        try:
            time.sleep(2.5)  # both count a process as started after 1 s, so only started ones are killed
            ours, theirs = [], []
            for core in range(1, count + 1):
                ours.append(local.time_crash_restart(agent.process.pid, local.AGENT_ADDRESS,
                                                     agent.base_port + core - 1, core))
                theirs.append(local.time_crash_restart(sup.process.pid, local.SUPERVISOR_ADDRESS,
                                                       sup.base_port + core - 1, core))
        finally:
            agent.stop()
            sup.stop()
    log(f"crash to restart: agent {sorted(ours)}, supervisord {sorted(theirs)}")
    return [Result("3. kill -9 to listening again", ours, "supervisord", theirs, target="<= 1.0, < 200 ms",
                   note="each run kills another worker, so no restart back-off applies")]


def _local_pair(root: Path, reaper: Reaper, peers_bin: Path, count: int,
                autostart: bool = True) -> tuple[local.LocalAgent, local.Supervisord]:
    """Start an agent and a supervisord, each running the same count workers, and wait until all listen."""
    base = free_base([local.AGENT_ADDRESS, local.SUPERVISOR_ADDRESS, local.SHELL_ADDRESS], count, 43000)
    (root / "agent").mkdir()
    agent = local.LocalAgent(root / "agent", reaper, base, count)
    agent.start()
    sup = local.Supervisord(root / "supervisord", reaper, peers_bin, base, count, autostart)
    sup.start()
    agent.apply()
    wait_listening(local.targets(local.AGENT_ADDRESS, base, count) + local.targets(local.SUPERVISOR_ADDRESS, base, count))
    return agent, sup


def start_scenario(sizes: Sizes, peers_bin: Path, reaper: Reaper) -> list[Result]:
    count = sizes.start_workers
    ours, loop, sup_times = [], [], []
    for run in range(sizes.start_runs):
        with tempfile.TemporaryDirectory(prefix="quil-bench-start-") as tmp:
            root = Path(tmp)
            base = free_base([local.AGENT_ADDRESS, local.SUPERVISOR_ADDRESS, local.SHELL_ADDRESS], count, 43000)
            loop.append(local.run_shell_loop(root / "shell", reaper, base, count))
            sup_times.append(_time_supervisord_start(root / "supervisord", reaper, peers_bin, base, count))
            ours.append(_time_agent_start(root / "agent", reaper, base, count))
            log(f"start {count} run {run + 1}: agent {ours[-1]:.2f} s, shell loop {loop[-1]:.2f} s, "
                f"supervisord {sup_times[-1]:.2f} s")
    scenario = f"4. start {count} workers until all listen"
    return [Result(scenario, ours, "shell loop", loop, target="<= 1.5"),
            Result(scenario, ours, "supervisord", sup_times)]


def _time_agent_start(root: Path, reaper: Reaper, base: int, count: int) -> float:
    root.mkdir()
    agent = local.LocalAgent(root, reaper, base, count)
    agent.start()
    try:
        started = time.monotonic()
        agent.apply()
        return wait_listening(local.targets(local.AGENT_ADDRESS, base, count), interval=0.005) - started
    finally:
        agent.stop()


def _time_supervisord_start(root: Path, reaper: Reaper, peers_bin: Path, base: int, count: int) -> float:
    sup = local.Supervisord(root, reaper, peers_bin, base, count, autostart=False)
    sup.start()
    try:
        started = time.monotonic()
        ctl = subprocess.Popen([str(peers_bin / "supervisorctl"), "-c", str(root / "supervisord.conf"),
                                "start", "worker:*"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finished = wait_listening(local.targets(local.SUPERVISOR_ADDRESS, base, count), interval=0.005)
        ctl.wait(300)
        return finished - started
    finally:
        sup.stop()


def footprint_scenario(sizes: Sizes, peers_bin: Path, reaper: Reaper) -> list[Result]:
    results = []
    for count in sizes.footprint_sizes:
        with tempfile.TemporaryDirectory(prefix="quil-bench-idle-") as tmp:
            agent, sup = _local_pair(Path(tmp), reaper, peers_bin, count)
            try:
                time.sleep(3.0)  # both sides are past their 1 s start window
                meters = (local.Footprint(agent.process.pid), local.Footprint(sup.process.pid))
                samples: list[list[tuple[float, float]]] = [[], []]
                for _ in range(3):
                    time.sleep(sizes.idle_seconds / 3)
                    for meter, into in zip(meters, samples):
                        into.append(meter.sample())
            finally:
                agent.stop()
                sup.stop()
        (agent_samples, sup_samples) = samples
        log(f"idle with {count}: agent {agent_samples}, supervisord {sup_samples}")
        results.append(Result(f"5. idle CPU, {count} workers", [s[0] for s in agent_samples], "supervisord",
                              [s[0] for s in sup_samples], unit="% core",
                              target="< 1 %" if count == 255 else "",
                              note=f"{sizes.idle_seconds:.0f} s idle in 3 windows"))
        results.append(Result(f"5. RSS, {count} workers", [s[1] for s in agent_samples], "supervisord",
                              [s[1] for s in sup_samples], unit="MiB", target="<= 2.0",
                              note="supervising process only, workers excluded"))
    return results
