"""Turn a desired state from the coordinator into config writes and process changes.

Order on one host, so a worker never starts against a config that lacks its
entry and the control process never dials a list older than the workers:
  1. write config.yml (atomic, previous file kept as config.yml.bak)
  2. stop cores no longer assigned
  3. restart cores whose bind address changed
  4. start new cores
  5. start or restart the control process, only when its worker list changed
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import reprlib
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc

from ..common import firewall, nodeconfig
from ..common.firewall import HostPolicy
from ..common.errors import ConfigError
from ..common.states import ALIVE_STATES, State
from ..common.files import write_atomic
from .config import AgentConfig
from . import hostinfo, runas
from .firewalling import FirewallManager
from .logs import log_file
from .supervisor import ProcessSpec, Supervisor

log = logging.getLogger(__name__)

# Limits on what one Apply may ask for; larger requests are rejected as invalid.
MAX_CONFIG_BYTES = 1024 * 1024
# 200 hosts of 64 workers need 12,800 core indices; 65535 leaves room for much larger clusters.
MAX_CORES = 65535
CONTROL = 0


class RequestError(Exception):
    """Raised when a request cannot be carried out; contains the gRPC status to return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class DesiredState:
    config_sha256: str = ""
    config_generation: int = 0
    node_generation: str = ""
    cores: list[int] = field(default_factory=list)
    run_control: bool = False
    # Hash of the worker list(s) the running control process was started with.
    control_lists_sha256: str = ""
    # Serial numbers (hex) of revoked certificates, refused by the API.
    revoked_serials: list[str] = field(default_factory=list)
    # Firewall mode applied last, and the hash of its rules.
    firewall_mode: str = "off"
    firewall_sha256: str = ""
    # Cores stopped by quil-coord stop (0 is the control process). Neither the
    # supervisor, an apply nor an agent restart starts them until start or restart.
    held: list[int] = field(default_factory=list)


@dataclass
class ApplyResult:
    changed: bool = False
    config_changed: bool = False
    started: list[int] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)
    restarted: list[int] = field(default_factory=list)
    control: str = "none"  # none, started, restarted, stopped, held
    firewall_changed: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Plan:
    config_text: str
    config_sha256: str
    generation: str
    specs: dict[int, ProcessSpec]
    lists_sha256: str


class Reconciler:
    """Holds the desired state and applies it, one request at a time."""

    def __init__(self, config: AgentConfig, supervisor: Supervisor, firewall_manager: FirewallManager | None = None
                 ) -> None:
        self.config = config
        self.supervisor = supervisor
        self.firewall = firewall_manager or FirewallManager()
        self.lock = threading.Lock()
        self.desired_path = config.state_dir / "desired.json"
        self.config_path = config.node_config_dir / "config.yml"
        self.desired = self._load_desired()
        self._revoked = frozenset(self.desired.revoked_serials)
        # Inventory name of this host, used in the commands that messages suggest. The service
        # sets it from the agent certificate, because the coordinator issues that for the name.
        self.host_name = "HOST"
        # Set once the agent shuts down, so a control request still queued for the lock does nothing.
        self.closed = False
        # None: node processes run as the agent's user. load() already validated node_user.
        self.run_as = runas.resolve(config.node_user, "agent.yaml")
        # The worker addresses and lists of the last config parsed, keyed by its SHA-256 and node
        # generation: parsing is pure Python and took 22 ms for 200 workers, on every apply.
        self._parsed: tuple[tuple[str, str], dict, nodeconfig.WorkerLists] | None = None

    # -- entry points ----------------------------------------------------------

    @property
    def revoked(self) -> frozenset[str]:
        return self._revoked

    def apply(self, config_yaml: bytes, config_sha256: str, config_generation: int, generation: str,
              cores: list[int], run_control: bool, hold_control: bool,
              revoked_serials: list[str] | None = None,
              firewall: tuple[str, HostPolicy | None] = ("off", None),
              keys: tuple[bytes, str] = (b"", ""), base_config_sha256: str | None = None) -> ApplyResult:
        """Converge to the request; with base_config_sha256 set, first require config.yml to have that hash."""
        self._check_base_config(base_config_sha256)
        plan = self._plan(config_yaml, config_sha256, generation, cores, run_control)
        firewall_mode, firewall_policy = self._check_firewall(*firewall)
        self._check_keys(*keys)
        if revoked_serials is not None:
            self._set_revoked(revoked_serials)
        result = ApplyResult()
        result.config_changed = self._write_config(plan)
        if keys[0]:
            result.config_changed = self._write_keys(keys[0]) or result.config_changed
        self._converge_workers(plan, result)
        self._converge_control(plan, run_control, hold_control, result)
        result.firewall_changed = self._converge_firewall(firewall_mode, firewall_policy)
        self.desired.config_sha256 = plan.config_sha256
        self.desired.config_generation = config_generation
        self.desired.node_generation = generation
        self.desired.cores = sorted(cores)
        self.desired.run_control = run_control
        # A hold ends with the assignment of its core, so a core assigned here again later starts normally.
        self.desired.held = [core for core in self.desired.held if core in self.assigned()]
        result.warnings = self._warnings(plan) + self._held_warnings()
        self._save_desired()
        result.changed = bool(
            result.config_changed or result.started or result.stopped or result.restarted
            or result.control in ("started", "restarted", "stopped") or result.firewall_changed
        )
        return result

    def stop_all(self) -> list[int]:
        cores = sorted(self.supervisor.specs())
        stopped = self.supervisor.stop([c for c in cores if c != CONTROL])
        stopped += self.supervisor.stop([CONTROL]) if CONTROL in cores else []
        self.desired = DesiredState(
            config_sha256=self.desired.config_sha256, config_generation=self.desired.config_generation,
            node_generation=self.desired.node_generation, revoked_serials=self.desired.revoked_serials,
        )
        self._save_desired()
        return sorted(stopped)

    def restore(self) -> None:
        """Start the processes of the persisted desired state after an agent or host restart."""
        desired = self.desired
        if not desired.cores and not desired.run_control:
            return
        try:
            plan = self._plan_on_disk()
        except RequestError as err:
            # For example, agent.yaml got another worker_address since the last apply.
            log.error("restore skipped: %s; run quil-coord apply", err.message)
            return
        result = ApplyResult()
        self._converge_workers(plan, result)
        self.desired.control_lists_sha256 = ""
        self._converge_control(plan, desired.run_control, False, result)
        self._save_desired()
        log.info("restored: %d workers, control process %s", len(result.started), result.control)
        for warning in self._held_warnings():
            log.info("restore: %s", warning)

    # -- single processes (quil-coord start, stop, restart) -------------------------

    def assigned(self) -> list[int]:
        """Return the cores this host should run, 0 first when it runs the control process."""
        return ([CONTROL] if self.desired.run_control else []) + list(self.desired.cores)

    def hold(self, cores: list[int]) -> None:
        """Keep cores stopped across supervisor restarts, applies and agent restarts; persisted at once."""
        self.desired.held = sorted(set(self.desired.held) | set(cores))
        self._save_desired()
        log.info("held: cores %s stay stopped until quil-coord start or restart", cores)

    def release(self, cores: list[int]) -> None:
        """End the hold on cores, so the supervisor and apply start them again."""
        if set(cores) & set(self.desired.held):
            self.desired.held = [core for core in self.desired.held if core not in cores]
            self._save_desired()
            log.info("released: cores %s are no longer held", cores)

    def start_cores(self, cores: list[int]) -> dict[int, str]:
        """Spawn assigned cores with the config of the last apply; return the reason for each core not spawned.

        A new supervisor record replaces the old one, which also ends a FATAL state.
        """
        try:
            plan = self._plan_on_disk()
        except RequestError as err:
            return {core: f"{err.message}; run quil-coord apply" for core in cores}
        failed = {}
        for core in cores:
            try:
                self.supervisor.start(plan.specs[core])
            except RuntimeError as err:
                failed[core] = str(err)  # still running: its stop did not finish
        if CONTROL in cores and CONTROL not in failed:
            # The control process now dials the current worker list, so the next apply keeps it running.
            self.desired.control_lists_sha256 = plan.lists_sha256
            self._save_desired()
        return failed

    def _plan_on_disk(self) -> _Plan:
        """Plan the persisted desired state from config.yml; raise RequestError when the file changed since."""
        desired = self.desired
        failed = grpc.StatusCode.FAILED_PRECONDITION
        try:
            text = self.config_path.read_bytes()
        except OSError as err:
            raise RequestError(failed, f"cannot read {self.config_path} ({err.strerror or err})") from err
        if hashlib.sha256(text).hexdigest() != desired.config_sha256:
            raise RequestError(failed, f"{self.config_path} changed since the last apply")
        return self._plan(text, desired.config_sha256, desired.node_generation, desired.cores, desired.run_control)

    def _held_warnings(self) -> list[str]:
        return [f"{_label(core)} is held stopped by quil-coord stop; "
                f"quil-coord start {self.host_name} --core {core} starts it" for core in self.desired.held]

    # -- validation --------------------------------------------------------------

    def _check_base_config(self, expected: str | None) -> None:
        """Raise FAILED_PRECONDITION when config.yml changed since the coordinator planned against it.

        The check runs before anything else, so a stale plan changes no file,
        process or firewall rule. A missing config.yml has the hash "".
        """
        if expected is None:
            return
        found = hostinfo.file_sha256(self.config_path)
        if found == expected:
            return
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{self.config_path} changed underneath since the plan: sha256 on disk {_short(found)}, planned "
            f"against {_short(expected)}; nothing was changed; review the edit with quil-coord config show "
            "--diff, then run quil-coord apply again",
        )

    def _plan(self, config_yaml: bytes, config_sha256: str, generation: str, cores: list[int],
              run_control: bool) -> _Plan:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if len(config_yaml) > MAX_CONFIG_BYTES:
            raise RequestError(invalid, f"config is {len(config_yaml)} bytes; the limit is {MAX_CONFIG_BYTES}")
        if hashlib.sha256(config_yaml).hexdigest() != config_sha256:
            raise RequestError(invalid, "config_sha256 does not match the config content; nothing was written")
        if generation not in nodeconfig.GENERATIONS:
            raise RequestError(invalid, f"unknown node generation '{generation}'; use 1.4, 2.0 or 2.1")
        if not _valid_cores(cores):
            raise RequestError(invalid, f"cores must be distinct indices from 1 to {MAX_CORES}")
        try:
            text = config_yaml.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(invalid, f"config is not UTF-8 text (byte {err.start})") from err
        addresses, lists = self._parse(text, config_sha256, generation)
        specs = {core: self._worker_spec(core, addresses, len(addresses)) for core in cores}
        if run_control:
            specs[CONTROL] = self._control_spec()
        lists_sha = hashlib.sha256(json.dumps([lists.p2p, lists.stream]).encode()).hexdigest()
        return _Plan(text, config_sha256, generation, specs, lists_sha)

    def _parse(self, text: str, config_sha256: str, generation: str) -> tuple[dict, nodeconfig.WorkerLists]:
        """Return the worker addresses and lists of a config whose SHA-256 the caller checked."""
        key = (config_sha256, generation)
        if self._parsed is not None and self._parsed[0] == key:
            return self._parsed[1], self._parsed[2]
        try:
            parsed = nodeconfig.load(text, source="config.yml from the coordinator")
            addresses = nodeconfig.worker_addresses(parsed, generation)
            lists = parsed.worker_lists(generation)
        except ConfigError as err:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        self._parsed = (key, addresses, lists)
        return addresses, lists

    def _worker_spec(self, core: int, addresses: dict, count: int) -> ProcessSpec:
        failed = grpc.StatusCode.FAILED_PRECONDITION
        if core not in addresses:
            raise RequestError(failed, f"core {core} has no entry in the worker list (length {count})")
        address = addresses[core]
        own = ipaddress.ip_address(self.config.worker_address)
        binds = [address.listen] + ([address.p2p] if address.p2p is not None else [])
        for bind in binds:
            if bind.ip != own:
                raise RequestError(
                    failed,
                    f"core {core} would bind {bind}, but this host's worker_address is {own};"
                    " fix the host's address in the coordinator inventory",
                )
        # A worker of another user cannot signal the agent, so it would take the agent for dead.
        # It gets no --parent-process, and the parent-death signal ties it to the agent (runas.py).
        parent = ("--parent-process", str(os.getpid())) if self.run_as is None else ()
        argv = (str(self.config.node_binary), "--config", str(self.config.node_config_dir),
                "--core", str(core), *parent, *self.config.node_args)
        return self._spec(core, argv, (str(address.listen.ip), address.listen.port), str(address.listen),
                          tuple(str(b) for b in binds))

    def _control_spec(self) -> ProcessSpec:
        argv = (str(self.config.node_binary), "--config", str(self.config.node_config_dir), *self.config.node_args)
        return self._spec(CONTROL, argv, None, "", ())

    def _spec(self, core: int, argv: tuple[str, ...], listen: tuple[str, int] | None, listen_text: str,
              binds: tuple[str, ...]) -> ProcessSpec:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.config.node_env}
        return ProcessSpec(core=core, argv=argv, cwd=self.config.work_dir, env=env,
                           log_path=log_file(self.config.log_dir, core), listen=listen,
                           listen_multiaddr=listen_text, binds=binds, run_as=self.run_as)

    # -- the steps -----------------------------------------------------------------

    def _write_config(self, plan: _Plan) -> bool:
        try:
            current = self.config_path.read_bytes()
        except FileNotFoundError:
            current = None
        data = plan.config_text.encode("utf-8")
        if current == data:
            return False
        self._make_node_directories()
        # config.yml carries the node's private keys, so only the owner may read it.
        write_atomic(self.config_path, data, mode=0o600, backup=current is not None, owner=self._node_owner())
        log.info("wrote: %s (sha256 %s)", self.config_path, plan.config_sha256[:12])
        return True

    def _converge_workers(self, plan: _Plan, result: ApplyResult) -> None:
        current = {c: s for c, s in self.supervisor.specs().items() if c != CONTROL}
        states = self.supervisor.states()
        wanted = {c: s for c, s in plan.specs.items() if c != CONTROL and c not in self.desired.held}
        gone = sorted(set(current) - set(wanted))
        moved = sorted(c for c in set(current) & set(wanted) if current[c].binds != wanted[c].binds)
        # A FATAL worker gets a fresh start from every apply that still lists it.
        revived = sorted(c for c in set(current) & set(wanted)
                         if c not in moved and states.get(c) in (State.FATAL, State.STOPPED, State.EXITED))
        new = sorted(set(wanted) - set(current))
        result.stopped = self.supervisor.stop(gone) if gone else []
        if moved:
            self.supervisor.stop(moved)
        self.supervisor.start_all([wanted[core] for core in moved + revived + new])
        result.restarted = moved + revived
        result.started = new

    def _converge_control(self, plan: _Plan, run_control: bool, hold: bool, result: ApplyResult) -> None:
        state = self.supervisor.states().get(CONTROL)
        alive = state in ALIVE_STATES or state == State.BACKOFF
        if not run_control:
            if state is not None:
                self.supervisor.stop([CONTROL])
                result.control = "stopped" if alive else "none"
            return
        if alive and self.desired.control_lists_sha256 == plan.lists_sha256:
            return
        if CONTROL in self.desired.held:
            return  # held by quil-coord stop; _held_warnings names the command that starts it
        if hold:
            result.control = "held"
            return
        if state is not None:
            self.supervisor.stop([CONTROL])
        self.supervisor.start(plan.specs[CONTROL])
        self.desired.control_lists_sha256 = plan.lists_sha256
        result.control = "restarted" if alive else "started"

    def _set_revoked(self, serials: list[str]) -> None:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if not _valid_serials(serials):
            raise RequestError(invalid, "revoked_serials must be lower-case hex serial numbers")
        self.desired.revoked_serials = sorted(set(serials))
        self._revoked = frozenset(serials)

    def _check_keys(self, data: bytes, sha256: str) -> None:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        if not data:
            return
        if len(data) > MAX_CONFIG_BYTES:
            raise RequestError(invalid, f"keys.yml is {len(data)} bytes; the limit is {MAX_CONFIG_BYTES}")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RequestError(invalid, "keys_sha256 does not match the keys.yml content; nothing was written")

    def _write_keys(self, data: bytes) -> bool:
        """Write keys.yml next to config.yml (0600, previous kept as .bak); never logs its content."""
        path = self.config.node_config_dir / "keys.yml"
        try:
            if path.read_bytes() == data:
                return False
        except FileNotFoundError:
            pass
        self._make_node_directories()
        write_atomic(path, data, mode=0o600, backup=path.exists(), owner=self._node_owner())
        log.info("wrote: %s (%d bytes)", path, len(data))
        return True

    def _make_node_directories(self) -> None:
        """Create the node config and work directories, owned by node_user when one is set."""
        runas.give_directory(self.config.node_config_dir, self.run_as)
        if self.run_as is not None:
            runas.give_directory(self.config.work_dir, self.run_as)

    def _node_owner(self) -> tuple[int, int] | None:
        return self.run_as.owner() if self.run_as is not None else None

    def _warnings(self, plan: _Plan) -> list[str]:
        ports = [int(bind.rsplit("/", 1)[1]) for spec in plan.specs.values() for bind in spec.binds]
        warning = hostinfo.ephemeral_warning(ports, hostinfo.ephemeral_range(), hostinfo.reserved_port_set())
        return [warning] if warning else []

    def _check_firewall(self, mode: str, policy: HostPolicy | None) -> tuple[str, HostPolicy | None]:
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        mode = mode or "off"
        if mode not in firewall.MODES:
            raise RequestError(invalid, f"unknown firewall mode '{mode}'; use off, nftables or ufw")
        if mode == "off":
            return mode, None
        if policy is None:
            raise RequestError(invalid, f"firewall mode {mode} needs the port rules")
        if policy.address != self.config.worker_address:
            raise RequestError(invalid, f"firewall policy is for address {policy.address}, but this host's "
                                        f"worker_address is {self.config.worker_address}")
        try:
            firewall.validate(policy)
        except ConfigError as err:
            raise RequestError(invalid, str(err)) from err
        return mode, policy

    def _converge_firewall(self, mode: str, policy: HostPolicy | None) -> bool:
        current = (self.desired.firewall_mode, self.desired.firewall_sha256)
        try:
            applied = self.firewall.converge(mode, policy, current)
        except firewall.FirewallError as err:
            # The processes already follow the new state; report the firewall failure to the caller.
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"firewall not updated: {err}") from err
        self.desired.firewall_mode, self.desired.firewall_sha256 = applied
        self._save_desired()
        return applied != current

    # -- persistence -----------------------------------------------------------------

    def _load_desired(self) -> DesiredState:
        try:
            return _desired_from_json(json.loads(self.desired_path.read_text()))
        except FileNotFoundError:
            return DesiredState()
        except (OSError, ValueError) as err:
            log.error("desired state %s unreadable (%s); waiting for the coordinator", self.desired_path, err)
            return DesiredState()

    def _save_desired(self) -> None:
        write_atomic(self.desired_path, json.dumps(asdict(self.desired), indent=1).encode(), mode=0o600)


def _short(sha256: str) -> str:
    return sha256[:12] if sha256 else "(no file)"


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but JSON true is no number.
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_cores(cores: Any) -> bool:
    """Tell whether cores is a list of distinct core indices from 1 to MAX_CORES."""
    if not isinstance(cores, list) or len(cores) > MAX_CORES:
        return False
    return all(_is_int(c) and 1 <= c <= MAX_CORES for c in cores) and len(set(cores)) == len(cores)


def _valid_held(cores: Any) -> bool:
    """Tell whether cores is a list of distinct core indices from 0 (the control process) to MAX_CORES."""
    if not isinstance(cores, list) or len(cores) > MAX_CORES + 1:
        return False
    return all(_is_int(c) and 0 <= c <= MAX_CORES for c in cores) and len(set(cores)) == len(cores)


def _label(core: int) -> str:
    return "the control process (core 0)" if core == CONTROL else f"core {core}"


def _valid_serials(serials: Any) -> bool:
    """Tell whether serials is a list of at most 100000 certificate serial numbers in lower-case hex."""
    return isinstance(serials, list) and len(serials) <= 100_000 and all(
        isinstance(s, str) and 0 < len(s) <= 64 and all(c in "0123456789abcdef" for c in s) for s in serials
    )


# Expected content of each desired.json key: its description for errors, and its check.
_DESIRED_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "config_sha256": ("a string", lambda value: isinstance(value, str)),
    "config_generation": ("an integer of at least 0", lambda value: _is_int(value) and value >= 0),
    "node_generation": ("'', '1.4', '2.0' or '2.1'", lambda value: value in ("", *nodeconfig.GENERATIONS)),
    "cores": (f"a list of distinct core indices from 1 to {MAX_CORES}", _valid_cores),
    "run_control": ("true or false", lambda value: isinstance(value, bool)),
    "control_lists_sha256": ("a string", lambda value: isinstance(value, str)),
    "revoked_serials": ("a list of lower-case hex serial numbers", _valid_serials),
    "firewall_mode": ("off, nftables or ufw", lambda value: value in ("off", "nftables", "ufw")),
    "firewall_sha256": ("a string", lambda value: isinstance(value, str)),
    "held": (f"a list of distinct core indices from 0 to {MAX_CORES}", _valid_held),
}


def _desired_from_json(data: Any) -> DesiredState:
    """Build a DesiredState from parsed desired.json; raise ValueError naming the first invalid key.

    A key missing from the file keeps its default.
    """
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    for key, value in data.items():
        if key not in _DESIRED_TYPES:
            raise ValueError(f"unknown key {reprlib.repr(key)}")
        expected, valid = _DESIRED_TYPES[key]
        if not valid(value):
            raise ValueError(f"'{key}' must be {expected}, not {reprlib.repr(value)}")
    return DesiredState(**data)


def generation_name(value: int) -> str:
    """Map the NodeGeneration enum number to '1.4', '2.0' or '2.1'; raise RequestError for any other number."""
    name = {1: "1.4", 2: "2.0", 3: "2.1"}.get(value)
    if name is None:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown node generation {value}; use 1.4, 2.0 or 2.1")
    return name
