"""install-service: the dedicated user, the virtual environment, the directories and the systemd unit.

Both CLIs call install() with their ServiceSpec. Every step compares what
is there with what should be there and changes only the difference, so a
second run changes nothing and reports that. With root set to a directory other
than /, every path lands under it (the user goes into ROOT/etc/passwd
through useradd --prefix), which is how the tests run it.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Callable

from .. import __version__
from .errors import QuilClusterError
from .files import write_atomic

# Path of the virtual environment on the target system.
DEFAULT_VENV = "/opt/quil-cluster/venv"
UNIT_DIR = "/etc/systemd/system"
# The units in deploy/ start the programs from here; the installed unit starts them from the venv.
TEMPLATE_BIN = "/usr/local/bin/"
NOLOGIN = "/usr/sbin/nologin"
PACKAGE = "quil-cluster"

Runner = Callable[[list[str]], None]


class InstallError(QuilClusterError):
    """Raised when a step of install-service cannot be carried out."""


@dataclass(frozen=True)
class Directory:
    path: str
    mode: int
    # Owned by the service user when set, else by root; the group is the service user's either way.
    user_owned: bool


@dataclass(frozen=True)
class ServiceSpec:
    program: str
    user: str
    home: str
    unit: str
    directories: tuple[Directory, ...]
    # Shown after a run: what is left to do by hand.
    next_steps: str


AGENT = ServiceSpec(
    program="quil-agent", user="quil", home="/var/lib/quil-agent", unit="quil-agent.service",
    directories=(
        # The agent rewrites agent.crt and agent.key here when its certificate is renewed.
        Directory("/etc/quil-agent", 0o700, True),
        Directory("/var/lib/quil-agent", 0o700, True),
        Directory("/var/lib/quil-agent/state", 0o700, True),
        Directory("/var/lib/quil-agent/node", 0o700, True),
    ),
    next_steps="put the host's bundle in /etc/quil-agent (agent.yaml, agent.key, agent.crt, ca.crt, owned by quil) "
               "or run: sudo -u quil {venv}/bin/quil-agent join ... --dir /etc/quil-agent; "
               "then: systemctl enable --now quil-agent",
)
COORD = ServiceSpec(
    program="quil-coord", user="quil-coord", home="/var/lib/quil-coord", unit="quil-coord-serve.service",
    directories=(
        Directory("/var/lib/quil-coord", 0o700, True),
        Directory("/etc/quil-coord", 0o750, False),
    ),
    next_steps="run sudo -u quil-coord QUIL_COORD_HOME=/var/lib/quil-coord {venv}/bin/quil-coord init ...; "
               "set QUIL_COORD_ADVERTISE in /etc/quil-coord/serve.env (or pass --advertise); "
               "then: systemctl enable --now quil-coord-serve",
)


@dataclass
class Options:
    root: Path = Path("/")
    venv: str = DEFAULT_VENV
    # What pip installs into the venv: a checkout or a wheel; None means where this copy came from.
    source: str | None = None
    # quil-agent: also install the drop-in that grants CAP_NET_ADMIN for the managed firewall.
    firewall: bool = False
    # quil-coord: HOST:PORT written to serve.env as QUIL_COORD_ADVERTISE.
    advertise: str | None = None


@dataclass
class Result:
    # One line per step: what was done, or what was already in place.
    steps: list[str] = field(default_factory=list)
    changed: bool = False

    def record(self, changed: bool, done: str, unchanged: str) -> None:
        self.steps.append(done if changed else unchanged)
        self.changed = self.changed or changed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options both programs' install-service take."""
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="install under this directory instead of / (for tests and images)")
    parser.add_argument("--venv", default=DEFAULT_VENV, help=f"virtual environment path (default {DEFAULT_VENV})")
    parser.add_argument("--source", help="what pip installs into the venv: a checkout or a wheel "
                        "(default: where this copy was installed from)")


def options_from(args: argparse.Namespace) -> Options:
    return Options(root=args.root, venv=args.venv, source=args.source, firewall=getattr(args, "firewall", False),
                   advertise=getattr(args, "advertise", None))


def summary(spec: ServiceSpec, result: Result, venv: str) -> str:
    """Return the step lines, then either that nothing changed or what is left to do."""
    tail = "nothing changed: already installed" if not result.changed else "next: " + spec.next_steps.format(venv=venv)
    return "\n".join([*result.steps, tail])


def install(spec: ServiceSpec, options: Options, run: Runner | None = None) -> Result:
    """Set up spec's service in order:

    1. the system user and its group
    2. the directories, with their owner and mode
    3. the virtual environment with this package installed
    4. the systemd unit (and the agent's firewall drop-in, the coordinator's serve.env)
    5. systemctl daemon-reload when a unit changed on the live system
    """
    run = run or _run
    if os.geteuid() != 0:
        raise InstallError("install-service must run as root: it creates a user and writes under /etc and /opt; "
                           "run it with sudo")
    result = Result()
    uid, gid = _ensure_user(spec, options.root, run, result)
    for directory in spec.directories:
        _ensure_directory(_under(options.root, directory.path), directory, uid if directory.user_owned else 0,
                          gid, result)
    _ensure_venv(spec, options, run, result)
    units = _ensure_units(spec, options, result)
    if spec is COORD and options.advertise:
        _ensure_file(_under(options.root, "/etc/quil-coord/serve.env"),
                     f"QUIL_COORD_ADVERTISE={options.advertise}\n".encode(), 0o640, (0, gid), result)
    if units and options.root == Path("/") and shutil.which("systemctl"):
        run(["systemctl", "daemon-reload"])
        result.steps.append("ran systemctl daemon-reload")
    return result


def _under(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _run(argv: list[str]) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as err:
        raise InstallError(f"{argv[0]} not found; install it and run install-service again") from err
    except subprocess.CalledProcessError as err:
        detail = (err.stderr or err.stdout or "").strip().splitlines()
        raise InstallError(f"{' '.join(argv[:3])} … failed with exit status {err.returncode}"
                           f"{': ' + detail[-1] if detail else ''}") from err


def _lookup_user(name: str, root: Path) -> tuple[int, int] | None:
    """Return (uid, gid) of name from ROOT/etc/passwd, or from the system's user database when root is /."""
    if root == Path("/"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        return entry.pw_uid, entry.pw_gid
    passwd = _under(root, "/etc/passwd")
    try:
        lines = passwd.read_text().splitlines()
    except OSError as err:
        raise InstallError(f"{passwd}: cannot read it ({err.strerror}); --root needs a directory with "
                           "etc/passwd, etc/group, etc/shadow and etc/gshadow") from err
    for line in lines:
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == name:
            return int(fields[2]), int(fields[3])
    return None


def _ensure_user(spec: ServiceSpec, root: Path, run: Runner, result: Result) -> tuple[int, int]:
    found = _lookup_user(spec.user, root)
    if found is not None:
        result.record(False, "", f"user {spec.user} exists (uid {found[0]})")
        return found
    # --prefix edits ROOT/etc/* without a chroot, so nothing of the live system changes.
    prefix = [] if root == Path("/") else ["--prefix", str(root)]
    run(["useradd", *prefix, "--system", "--user-group", "--home-dir", spec.home, "--no-create-home",
         "--shell", NOLOGIN, spec.user])
    found = _lookup_user(spec.user, root)
    if found is None:
        raise InstallError(f"useradd succeeded but user {spec.user} is not in {_under(root, '/etc/passwd')}")
    result.record(True, f"created user {spec.user} (uid {found[0]}, gid {found[1]})", "")
    return found


def _ensure_directory(path: Path, directory: Directory, uid: int, gid: int, result: Result) -> None:
    created = not path.is_dir()
    if created:
        path.mkdir(mode=directory.mode, parents=True, exist_ok=True)
    info = path.stat()
    wrong = (info.st_uid, info.st_gid) != (uid, gid) or (info.st_mode & 0o7777) != directory.mode
    if wrong:
        os.chown(path, uid, gid)
        path.chmod(directory.mode)
    mode = f"{directory.mode:04o}"
    if created:
        result.record(True, f"created {path} (mode {mode})", "")
    else:
        result.record(wrong, f"set owner and mode {mode} of {path}", f"{path} is in place")


def _ensure_file(path: Path, data: bytes, mode: int, owner: tuple[int, int], result: Result) -> bool:
    """Write path when its content, mode or owner differ; return whether it changed."""
    try:
        info = path.stat()
        same = path.read_bytes() == data and (info.st_mode & 0o7777) == mode and (info.st_uid, info.st_gid) == owner
    except FileNotFoundError:
        same = False
    if not same:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data, mode=mode)
        os.chown(path, *owner)
    result.record(not same, f"wrote {path}", f"{path} is up to date")
    return not same


def unit_text(name: str, venv: str) -> str:
    """Return a unit file from deploy/ with its programs started from the venv."""
    text = resources.files("quil_cluster.deploy").joinpath(name).read_text()
    return text.replace(TEMPLATE_BIN, venv.rstrip("/") + "/bin/")


def _ensure_units(spec: ServiceSpec, options: Options, result: Result) -> bool:
    unit_dir = _under(options.root, UNIT_DIR)
    changed = _ensure_file(unit_dir / spec.unit, unit_text(spec.unit, options.venv).encode(), 0o644, (0, 0),
                           result)
    if spec is AGENT and options.firewall:
        drop_in = unit_dir / f"{spec.unit}.d" / "firewall.conf"
        text = unit_text("quil-agent-firewall.conf", options.venv)
        changed = _ensure_file(drop_in, text.encode(), 0o644, (0, 0), result) or changed
    return changed


def _ensure_venv(spec: ServiceSpec, options: Options, run: Runner, result: Result) -> None:
    venv = _under(options.root, options.venv)
    python = venv / "bin" / "python"
    installed = _installed_version(python) if python.exists() else None
    # NOTE: only the version is compared, so a changed checkout of the same version is not reinstalled.
    if installed == __version__ and (venv / "bin" / spec.program).exists():
        result.record(False, "", f"{venv} has {PACKAGE} {installed}")
        return
    source = options.source or source_of_this_copy()
    if not python.exists():
        run([_base_python(), "-m", "venv", str(venv)])
    run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", source])
    result.record(True, f"installed {PACKAGE} {__version__} from {source} into {venv}", "")


def _installed_version(python: Path) -> str | None:
    code = f"from importlib.metadata import version; print(version({PACKAGE!r}))"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    return done.stdout.strip() if done.returncode == 0 else None


def _base_python() -> str:
    """Return the interpreter this one's venv was made from (or this one), so venvs do not nest."""
    return getattr(sys, "_base_executable", sys.executable)


def source_of_this_copy() -> str:
    """Return the local directory this copy of the package was installed from (pip's direct_url.json)."""
    # A build in a checkout leaves quil_cluster.egg-info there without direct_url.json.
    # Python run from the checkout finds that copy first, so every copy is read.
    records = (dist.read_text("direct_url.json") for dist in metadata.distributions(name=PACKAGE))
    text = next((record for record in records if record), None)
    url = json.loads(text).get("url", "") if text else ""
    if not url.startswith("file://"):
        raise InstallError(f"cannot tell where this copy of {PACKAGE} was installed from; pass --source with a "
                           "checkout directory or a wheel file")
    return url[len("file://"):]
