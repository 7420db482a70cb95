"""The coordinator's state directory (--home or QUIL_COORD_HOME).

  cluster.yaml      settings: name, node generation, ports, control config path
  hosts.yaml        the inventory
  assignment.json   the recorded core assignment and its config generation
  applied.json      the assignment of the last apply that reached every host
  ca.key, ca.crt    the cluster CA (key mode 0600)
  ca-next.key, ca-next.crt   the new CA while the CA is rotated (both are trusted)
  coordinator.key, coordinator.crt   the coordinator's client certificate
  tokens.json       join tokens, stored as hashes
  revoked.json      serial numbers of revoked certificates
  audit.log         one JSON line per join attempt
  serve.json        address and pid of the running enrollment endpoint
  lock              held (flock) while a command changes any of the above
  apply.lock        held (flock) for the whole of an apply

Every file is replaced atomically and the previous version kept as .bak. A
state file that cannot be read, parse or pass its checks stops the command
with one line naming the file, what is wrong and the .bak, and nothing is
rewritten or reset.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

from ..common import nodeconfig
from ..common.errors import ConfigError, QuilClusterError, StateError
from ..common.files import backup_path, write_atomic
from ..common.yamlio import dump, read_mapping, reject_unknown_keys
from .assign import PORT_SCHEMES, Ports, Slot, slots_from_rows, slots_to_rows
from .inventory import Host, from_dicts

HOME_ENV = "QUIL_COORD_HOME"
# First line of cluster.yaml and hosts.yaml as quil-coord writes them; the last is "# end of NAME".
STATE_HEADER = "# Written by quil-coord. Keep the '# end of' line when editing: it marks a complete file.\n"
DEFAULT_BASE_PORT = {"1.4": 40000, "2.0": 40000, "2.1": 25000}
DEFAULT_STREAM_BASE_PORT = 32500


@dataclass
class Settings:
    name: str
    node_generation: str
    # Path of the control host's node config.yml; the canonical config is rendered from it.
    control_config: str
    port_scheme: str = "per-host"
    # 1.4/2.0: worker port base. 2.1: P2P port base.
    base_port: int = 40000
    # 2.1 only: stream port base.
    stream_base_port: int = DEFAULT_STREAM_BASE_PORT
    # Allow loopback worker addresses (a cluster on one machine, such as the demo).
    local: bool = False
    # Assign and apply as soon as a joined host's agent responds.
    auto_apply: bool = True
    # Lifetime of agent certificates, in days; apply and serve renew them at about two thirds.
    agent_cert_days: int = 7
    # Port class -> public or private, overriding the generation's defaults (see coordinator/policy.py).
    exposure: dict | None = None
    # Firewall mode given to hosts that join (off, nftables or ufw); host set changes it per host.
    firewall: str = "off"

    def ports(self) -> Ports:
        stream = self.stream_base_port if self.node_generation == "2.1" else 0
        return Ports(self.port_scheme, self.base_port, stream)

    def validate(self, source: str) -> None:
        for key in ("name", "control_config", "node_generation", "port_scheme"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{source}: '{key}' must be a string")
        if self.exposure is not None and not (
                isinstance(self.exposure, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in self.exposure.items())):
            raise ConfigError(f"{source}: 'exposure' must map port classes to public or private, "
                              "e.g. {stream: public}")
        if self.firewall not in ("off", "nftables", "ufw"):
            raise ConfigError(f"{source}: firewall '{self.firewall}' is not off, nftables or ufw")
        for key in ("local", "auto_apply"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{source}: '{key}' must be true or false")
        if self.node_generation not in nodeconfig.GENERATIONS:
            raise ConfigError(f"{source}: node_generation '{self.node_generation}' is not 1.4, 2.0 or 2.1")
        if self.port_scheme not in PORT_SCHEMES:
            raise ConfigError(f"{source}: port_scheme '{self.port_scheme}' is not per-host or global")
        if not isinstance(self.agent_cert_days, int) or not 1 <= self.agent_cert_days <= 3650:
            raise ConfigError(f"{source}: agent_cert_days {self.agent_cert_days!r} is not a number of days from 1 to 3650")
        for key in ("base_port", "stream_base_port"):
            value = getattr(self, key)
            if not isinstance(value, int) or not 1 <= value <= 65535:
                raise ConfigError(f"{source}: {key} {value!r} is not a port from 1 to 65535")


@dataclass
class Assignment:
    config_generation: int
    slots: list[Slot]
    # Inventory the assignment was computed from, to detect later edits.
    hosts: list[dict[str, Any]]


class Home:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def from_env(cls, option: str | None) -> "Home":
        value = option or os.environ.get(HOME_ENV)
        if not value:
            raise StateError(f"no state directory: pass --home DIR or set {HOME_ENV}")
        return cls(Path(value))

    def file(self, name: str) -> Path:
        return self.path / name

    def require(self) -> None:
        if not self.file("cluster.yaml").exists():
            raise StateError(f"{self.path}: not a quil-coord state directory; run quil-coord init first")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state lock so concurrent commands never interleave their writes."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            handle = open(self.file("lock"), "a")
        except OSError as err:
            raise StateError(f"{self.path}: cannot use as state directory ({err.strerror})") from err
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- settings ----------------------------------------------------------

    def load_settings(self) -> Settings:
        self.require()
        path = self.file("cluster.yaml")
        data = _read_state_yaml(path)
        try:
            return _settings_from(data, path)
        except QuilClusterError as err:
            raise state_file_error(path, str(err)) from err

    def save_settings(self, settings: Settings) -> None:
        write_atomic(self.file("cluster.yaml"), _dump_state(asdict(settings), "cluster.yaml"), mode=0o600, backup=True)

    # -- inventory -----------------------------------------------------------

    def load_hosts(self) -> list[Host]:
        path = self.file("hosts.yaml")
        if not path.exists():
            # A new cluster has no hosts yet; a cluster with a backup or an assignment had some.
            if backup_path(path).exists() or self.file("assignment.json").exists():
                raise state_file_error(path, f"{path}: the file is missing although the cluster has hosts "
                                       f"({self.file('assignment.json').name} or the backup exists)",
                                       "restore it from a backup of the state directory")
            return []
        data = _read_state_yaml(path)
        try:
            reject_unknown_keys(data, ["hosts"], str(path))
            return from_dicts(data.get("hosts", []), str(path))
        except QuilClusterError as err:
            raise state_file_error(path, str(err)) from err

    def save_hosts(self, hosts: list[Host]) -> None:
        write_atomic(self.file("hosts.yaml"), _dump_state({"hosts": [h.to_dict() for h in hosts]}, "hosts.yaml"),
                     mode=0o600, backup=True)

    # -- certificate authority -----------------------------------------------------

    def rotating(self) -> bool:
        return self.file("ca-next.crt").exists()

    def signing_ca(self) -> tuple[bytes, bytes]:
        """Key and certificate of the CA that signs new certificates: the next CA during a rotation."""
        prefix = "ca-next" if self.rotating() else "ca"
        return self.file(f"{prefix}.key").read_bytes(), self.file(f"{prefix}.crt").read_bytes()

    def trust_bundle(self) -> bytes:
        """The CA certificates peers must trust: the current CA, plus the next one during a rotation."""
        bundle = self.file("ca.crt").read_bytes()
        if self.rotating():
            bundle += self.file("ca-next.crt").read_bytes()
        return bundle

    # -- revocation -------------------------------------------------------------

    def load_revoked(self) -> list[str]:
        path = self.file("revoked.json")
        fix = "fix the file by hand (deleting it would trust every revoked certificate again)"
        data = read_json_state(path, fix)
        if data is None:
            return []
        if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
            raise state_file_error(path, f"{path}: expected a list of serial numbers, found {_kind(data)}", fix)
        return data

    def revoke(self, serial: str) -> None:
        """Add serial to the revocation list; the caller holds the state lock."""
        revoked = self.load_revoked()
        if serial not in revoked:
            write_atomic(self.file("revoked.json"), json.dumps(revoked + [serial]).encode(), mode=0o600, backup=True)

    # -- assignment ------------------------------------------------------------

    def load_assignment(self) -> Assignment | None:
        path = self.file("assignment.json")
        fix = "run quil-coord assign to record a new one"
        data = read_json_state(path, fix)
        if data is None:
            return None
        try:
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, found {_kind(data)}")
            assignment = Assignment(data["config_generation"], slots_from_rows(data["workers"]), data["hosts"])
            _check_assignment(assignment)
            return assignment
        except KeyError as err:
            raise state_file_error(path, f"{path}: missing key {err}", fix) from err
        except (ValueError, TypeError, AttributeError) as err:
            raise state_file_error(path, f"{path}: invalid assignment ({err})", fix) from err

    def load_applied(self) -> list[Slot]:
        """Slots of the last apply that reached every host (empty before the first)."""
        path = self.file("applied.json")
        fix = "delete it, and the next complete apply records it again"
        data = read_json_state(path, fix)
        if data is None:
            return []
        try:
            if not isinstance(data, list):
                raise TypeError(f"expected a JSON list, found {_kind(data)}")
            slots = slots_from_rows(data)
            _check_slots(slots)
            return slots
        except KeyError as err:
            raise state_file_error(path, f"{path}: a worker entry is missing key {err}", fix) from err
        except (ValueError, TypeError, AttributeError) as err:
            raise state_file_error(path, f"{path}: invalid worker list ({err})", fix) from err

    def save_applied(self, slots: list[Slot]) -> None:
        write_atomic(self.file("applied.json"), json.dumps(slots_to_rows(slots)).encode(), mode=0o600, backup=True)

    def save_assignment(self, assignment: Assignment) -> None:
        data = {
            "config_generation": assignment.config_generation,
            "workers": slots_to_rows(assignment.slots),
            "hosts": assignment.hosts,
        }
        write_atomic(self.file("assignment.json"), json.dumps(data, indent=1).encode(), mode=0o600, backup=True)


def state_file_error(path: Path, message: str, fix: str = "") -> StateError:
    """Build the one-line error for an unusable state file.

    message starts with the path and states what is wrong. The rest names the
    previous version (PATH.bak) when it exists, else gives fix.
    """
    backup = backup_path(path)
    tail = f"the previous version is at {backup}" if backup.exists() else fix
    return StateError(f"{message}; {tail}" if tail else message)


def read_json_state(path: Path, fix: str) -> Any:
    """Parse a JSON state file; return None when it does not exist, raise StateError when it is unusable."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise state_file_error(path, f"{path}: cannot read the file ({err.strerror})", fix) from err
    if not data.strip():
        raise state_file_error(path, f"{path}: the file is empty", fix)
    try:
        return json.loads(data)
    except ValueError as err:
        # UnicodeDecodeError is a ValueError too, so binary garbage lands here.
        raise state_file_error(path, f"{path}: invalid JSON ({err})", fix) from err


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def _dump_state(data: dict[str, Any], name: str) -> bytes:
    """Serialise a YAML state file between STATE_HEADER and its end line, so a cut-short copy is detected."""
    return STATE_HEADER.encode() + dump(data) + f"# end of {name}\n".encode()


def _read_state_yaml(path: Path) -> dict[str, Any]:
    """Parse cluster.yaml or hosts.yaml; raise StateError when it is unreadable, empty or cut short.

    A file that starts with STATE_HEADER was written by quil-coord and must
    still contain its end line; lines added after it by hand are fine. A YAML
    file cut at a line break often parses, so without this check a lost host
    or key would go unnoticed. Files written by hand, without the header,
    are not checked.
    """
    fix = "fix the file by hand"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""  # read_mapping below raises the error with its reason
    end = f"# end of {path.name}"
    if text.startswith(STATE_HEADER) and end not in text.splitlines():
        raise state_file_error(path, f"{path}: the file is cut short (the line '{end}' is missing)", fix)
    try:
        data = read_mapping(path)
    except ConfigError as err:
        raise state_file_error(path, str(err), fix) from err
    # Every writer stores at least one key, so an empty file lost its content.
    if not data:
        raise state_file_error(path, f"{path}: the file is empty", fix)
    return data


def _settings_from(data: dict[str, Any], path: Path) -> Settings:
    reject_unknown_keys(data, [f.name for f in fields(Settings)], str(path))
    missing = [key for key in ("name", "node_generation", "control_config") if key not in data]
    if missing:
        raise ConfigError(f"{path}: missing key {', '.join(repr(key) for key in missing)}")
    # An unquoted 1.4 or 2.0 in YAML is a float; the generation is its text.
    if isinstance(data.get("node_generation"), float):
        data["node_generation"] = f"{data['node_generation']:.1f}"
    settings = Settings(**data)
    settings.validate(str(path))
    return settings


def _check_assignment(assignment: Assignment) -> None:
    """Raise TypeError or ValueError when a hand-edited assignment.json has the wrong shape."""
    if isinstance(assignment.config_generation, bool) or not isinstance(assignment.config_generation, int):
        raise TypeError("config_generation must be a whole number")
    _check_slots(assignment.slots)
    if sorted(s.core for s in assignment.slots) != list(range(1, len(assignment.slots) + 1)):
        raise ValueError("cores are not 1..N without gaps")
    if not isinstance(assignment.hosts, list) or not all(isinstance(h, dict) for h in assignment.hosts):
        raise TypeError("hosts must be a list of mappings")


def _check_slots(slots: list[Slot]) -> None:
    for slot in slots:
        if not (isinstance(slot.core, int) and isinstance(slot.offset, int) and isinstance(slot.host, str)
                and isinstance(slot.address, str)):
            raise TypeError(f"worker entry {slot} has fields of the wrong type")
