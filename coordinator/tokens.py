"""Join tokens: short-lived secrets that let a new host enroll with the coordinator.

A token reads ``qct_<id>.<secret>``. The id is 8 random hex characters, is shown by
``quil-coord token list`` and names the token for revoke and the audit log. The secret
is 32 bytes from ``secrets`` in URL-safe base64 without padding. create() returns the
token text once. The store, ``tokens.json`` in the state directory, keeps only the
SHA-256 of the whole text.

Every read-modify-write of the store holds ``Home.locked()`` (an flock), so concurrent
threads and processes never lose a record and a single-use token admits one join.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import logging
import re
import reprlib
import secrets
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING

from ..common.errors import QuilClusterError
from ..common.files import write_atomic
from .home import read_json_state, state_file_error
from .inventory import check_counts, check_name

if TYPE_CHECKING:
    from .home import Home

log = logging.getLogger(__name__)

PREFIX = "qct_"
STORE_NAME = "tokens.json"
STORE_VERSION = 1
# Lifetime of a new token in seconds. It is short because a leaked token enrolls a host until it expires.
DEFAULT_TTL_SECONDS = 1800
MAX_TTL_SECONDS = 7 * 86400
# Joins a new token admits by default. One, so a copied token cannot enroll a second host.
DEFAULT_USES = 1
MAX_USES = 1000
# Random bytes in the secret (256 bits).
SECRET_BYTES = 32
# Records are pruned this long after they expire, so a listing still shows recent tokens.
PRUNE_AFTER_SECONDS = 86400
# Maximum length of a token text that consume() accepts. A real token has 56 characters.
MAX_TOKEN_LENGTH = 200

_ID = re.compile(r"[0-9a-f]{8}\Z")
_SECRET_CHARS = (SECRET_BYTES * 4 + 2) // 3  # unpadded base64 length: 43
_TOKEN = re.compile(rf"{PREFIX}([0-9a-f]{{8}})\.[A-Za-z0-9_-]{{{_SECRET_CHARS}}}\Z")
_DURATION = re.compile(r"([0-9]{1,12})([smhd])\Z")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class TokenError(QuilClusterError, ValueError):
    """Raised when a token request is invalid or names a token that is not in the store."""


class RejectReason(enum.StrEnum):
    """Reason code of a rejected join, written to the audit log and never sent to the joining host."""

    MALFORMED = "malformed"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    EXPIRED = "expired"
    USED_UP = "used_up"


class JoinRejected(QuilClusterError):
    """Raised when consume() rejects a presented token.

    The message is the same for every reason, so a caller that shows it to the joining
    host reveals nothing about which check failed. ``reason`` is for the audit log, and
    ``token_id`` is the public id read from a well-formed token text (None when the text
    is malformed).
    """

    MESSAGE = (
        "join rejected: the token is invalid, expired or already used; "
        "create a new one with quil-coord token create"
    )

    def __init__(self, reason: RejectReason, token_id: str | None = None) -> None:
        super().__init__(self.MESSAGE)
        self.reason = reason
        self.token_id = token_id

    def __reduce__(self) -> tuple[type[JoinRejected], tuple[RejectReason, str | None]]:
        # Keeps reason and token_id when the exception crosses a process boundary.
        return (type(self), (self.reason, self.token_id))


class TokenStatus(enum.StrEnum):
    """State of a stored token as list_tokens() callers show it."""

    VALID = "valid"
    USED = "used"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass
class TokenRecord:
    """One stored token: its public id, the hash of its text and its limits."""

    id: str
    # SHA-256 of the whole token text, in hex.
    hash: str
    # Unix time in seconds.
    created: float
    # Unix time in seconds from which consume() rejects the token.
    expires: float
    uses_left: int
    uses_total: int
    # Worker count the joining host gets, or None to derive it from its CPUs.
    workers: int | None = None
    # Host name the joining host is added as, or None to let it choose.
    host_name: str | None = None
    revoked: bool = False
    # Unix time of the last consume() that presented this token, accepted or not.
    last_used: float | None = None

    def status(self, now: float) -> TokenStatus:
        """Return the state shown in a listing; revoked wins over used, used over expired."""
        if self.revoked:
            return TokenStatus.REVOKED
        if self.uses_left <= 0:
            return TokenStatus.USED
        if now >= self.expires:
            return TokenStatus.EXPIRED
        return TokenStatus.VALID


# -- public API -------------------------------------------------------------


def create(
    home: Home,
    *,
    ttl_seconds: float = DEFAULT_TTL_SECONDS,
    uses: int = DEFAULT_USES,
    workers: int | None = None,
    host_name: str | None = None,
    now: float | None = None,
) -> tuple[str, TokenRecord]:
    """Create a token, store its hash and return the token text with its record.

    The text is returned only here and cannot be recovered later. Records that expired
    more than PRUNE_AFTER_SECONDS ago are removed in the same write. Raises TokenError
    for a bad ttl or use count and InventoryError for a bad host name or worker count.
    """
    _check_ttl(ttl_seconds)
    _check_uses(uses)
    if workers is not None:
        check_counts(workers, None, None)
    if host_name is not None:
        check_name(host_name)
        if uses != 1:
            raise TokenError(f"--host-name names one host, so it needs --uses 1 (not {uses})")
    now = time.time() if now is None else now

    with home.locked():
        if host_name is not None and any(h.name == host_name for h in home.load_hosts()):
            raise TokenError(f"host {host_name} is already in the inventory; choose another --host-name")
        records = _prune_records(_load(home), now)
        token_id = _new_id({r.id for r in records})
        secret = base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=").decode("ascii")
        token_text = f"{PREFIX}{token_id}.{secret}"
        record = TokenRecord(
            id=token_id,
            hash=_hash(token_text),
            created=now,
            expires=now + ttl_seconds,
            uses_left=uses,
            uses_total=uses,
            workers=workers,
            host_name=host_name,
        )
        records.append(record)
        _save(home, records)

    log.info("created: join token %s (uses %d, expires in %d s)", token_id, uses, ttl_seconds)
    return token_text, replace(record)


def list_tokens(home: Home, now: float | None = None) -> list[TokenRecord]:
    """Return the stored records in creation order, without the ones prune() would remove.

    Only reads the store, so listing never changes it.
    """
    now = time.time() if now is None else now
    return _prune_records(_load(home), now)


def revoke(home: Home, token_id: str) -> TokenRecord:
    """Mark a token revoked so consume() rejects it, and return its record.

    Revoking a revoked token changes nothing. Raises TokenError when no stored token
    has that id.
    """
    if not isinstance(token_id, str) or not _ID.match(token_id):
        # The value is not echoed, because a user may have pasted the whole token text.
        raise TokenError("invalid token id: use the 8 hex characters shown by quil-coord token list")

    with home.locked():
        records = _load(home)
        record = next((r for r in records if r.id == token_id), None)
        if record is None:
            raise TokenError(f"no join token with id {token_id}; run quil-coord token list to see the ids")
        if not record.revoked:
            record.revoked = True
            _save(home, records)
            log.info("revoked: join token %s", token_id)
    return replace(record)


def consume(home: Home, token_text: str, now: float | None = None) -> TokenRecord:
    """Spend one use of the token and return its record, or raise JoinRejected.

    A malformed text is rejected without reading the store. The returned record has
    uses_left after this use and carries the token's workers and host_name limits.
    """
    token_id = _parse(token_text)
    digest = _hash(token_text)
    now = time.time() if now is None else now

    with home.locked():
        records = _load(home)
        record = _find(records, digest)
        if record is None:
            raise JoinRejected(RejectReason.UNKNOWN, token_id)

        # Spend the use and save before any check. The lock makes the read, decrement
        # and save one step, so a racing second join of a single-use token finds 0 left.
        # Saving first also means a failure in a later check leaves the use spent.
        uses_before = record.uses_left
        record.uses_left = max(0, uses_before - 1)
        record.last_used = now
        _save(home, records)

        if record.revoked:
            raise JoinRejected(RejectReason.REVOKED, token_id)
        if now >= record.expires:
            raise JoinRejected(RejectReason.EXPIRED, token_id)
        if uses_before <= 0:
            raise JoinRejected(RejectReason.USED_UP, token_id)

    log.info("consumed: join token %s (uses left %d)", token_id, record.uses_left)
    return replace(record)


def prune(home: Home, now: float | None = None) -> list[TokenRecord]:
    """Remove records that expired more than PRUNE_AFTER_SECONDS ago and return them."""
    now = time.time() if now is None else now
    with home.locked():
        records = _load(home)
        remaining = _prune_records(records, now)
        remaining_ids = {r.id for r in remaining}
        removed = [r for r in records if r.id not in remaining_ids]
        if removed:
            _save(home, remaining)
    return removed


def parse_duration(text: str) -> int:
    """Parse a duration such as 90s, 30m, 2h or 1d and return it in seconds.

    One whole number and one lower-case unit (s, m, h or d). Raises TokenError for
    anything else, including zero.
    """
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None or int(match.group(1)) == 0:
        raise TokenError(
            f"invalid duration {text!r}: use a whole number above 0 followed by s, m, h or d, such as 30m"
        )
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


# -- checks -----------------------------------------------------------------


def _check_ttl(ttl_seconds: float) -> None:
    is_number = isinstance(ttl_seconds, (int, float)) and not isinstance(ttl_seconds, bool)
    # NaN fails both comparisons, so it is rejected too.
    if not is_number or not 0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise TokenError(f"invalid ttl {ttl_seconds!r}: use more than 0 s and at most 7 days ({MAX_TTL_SECONDS} s)")


def _check_uses(uses: int) -> None:
    is_int = isinstance(uses, int) and not isinstance(uses, bool)
    if not is_int or not 1 <= uses <= MAX_USES:
        raise TokenError(f"invalid use count {uses!r}: use 1 to {MAX_USES}")


def _parse(token_text: str) -> str:
    """Return the public id of a well-formed token text, or raise JoinRejected(MALFORMED)."""
    if not isinstance(token_text, str) or len(token_text) > MAX_TOKEN_LENGTH or not token_text.isascii():
        raise JoinRejected(RejectReason.MALFORMED)
    match = _TOKEN.match(token_text)
    if match is None:
        raise JoinRejected(RejectReason.MALFORMED)
    return match.group(1)


# -- store ------------------------------------------------------------------


def _hash(token_text: str) -> str:
    # A plain, unsalted SHA-256 is enough because the secret has 256 random bits: no
    # dictionary or brute-force search can find a text with a stored hash. A slow KDF
    # would add nothing, and the hash keeps a copied tokens.json from revealing tokens.
    return hashlib.sha256(token_text.encode("ascii")).hexdigest()


def _find(records: list[TokenRecord], digest: str) -> TokenRecord | None:
    # Compare against every record in constant time, so timing does not reveal how
    # much of a guessed hash matched.
    found = None
    for record in records:
        if hmac.compare_digest(record.hash, digest):
            found = record
    return found


def _new_id(used_ids: set[str]) -> str:
    while True:
        token_id = secrets.token_hex(4)
        if token_id not in used_ids:
            return token_id


def _prune_records(records: list[TokenRecord], now: float) -> list[TokenRecord]:
    return [r for r in records if now - r.expires <= PRUNE_AFTER_SECONDS]


def _load(home: Home) -> list[TokenRecord]:
    path = home.file(STORE_NAME)
    fix = "fix the file, or delete it to drop every join token"
    data = read_json_state(path, fix)
    if data is None:
        return []
    if not isinstance(data, dict) or data.get("version") != STORE_VERSION or not isinstance(data.get("tokens"), list):
        raise state_file_error(path, f"{path}: not a version {STORE_VERSION} token store", fix)
    names = {f.name for f in fields(TokenRecord)}
    records = []
    for row in data["tokens"]:
        if not isinstance(row, dict) or set(row) != names:
            raise state_file_error(path, f"{path}: token record {reprlib.repr(row)} does not have the fields "
                                   f"{sorted(names)}", fix)
        records.append(TokenRecord(**row))
    return records


def _save(home: Home, records: list[TokenRecord]) -> None:
    data = {"version": STORE_VERSION, "tokens": [asdict(r) for r in records]}
    write_atomic(home.file(STORE_NAME), json.dumps(data, indent=1).encode(), mode=0o600, backup=True)
