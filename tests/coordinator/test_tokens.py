"""Join tokens: format, store, every rejection reason and concurrent use by threads and processes."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import multiprocessing
import pickle
import re
import stat
import threading
from pathlib import Path

import pytest

from quil_cluster.common.errors import InventoryError, StateError
from quil_cluster.coordinator import tokens
from quil_cluster.coordinator.home import Home
from quil_cluster.coordinator.tokens import JoinRejected, RejectReason, TokenError, TokenStatus

NOW = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
DAY = 86400
REJECTED = (
    "join rejected: the token is invalid, expired or already used; "
    "create a new one with quil-coord token create"
)
TOKEN_FORMAT = re.compile(r"qct_([0-9a-f]{8})\.([A-Za-z0-9_-]{43})")


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home")


def _store(home: Home) -> dict:
    return json.loads(home.file("tokens.json").read_bytes())


def _secret(token_text: str) -> str:
    return token_text.split(".", 1)[1]


def _rejection(home: Home, token_text, now: float = NOW) -> JoinRejected:
    with pytest.raises(JoinRejected) as caught:
        tokens.consume(home, token_text, now=now)
    return caught.value


# -- create -----------------------------------------------------------------


def test_create_token_format_and_record(home):
    token_text, record = tokens.create(home, now=NOW)

    match = TOKEN_FORMAT.fullmatch(token_text)
    assert match is not None
    assert len(base64.urlsafe_b64decode(match.group(2) + "=")) == 32
    assert record.id == match.group(1)
    assert record.hash == hashlib.sha256(token_text.encode()).hexdigest()
    assert record.created == NOW
    assert record.expires == NOW + 1800
    assert record.uses_left == 1
    assert record.uses_total == 1
    assert record.workers is None
    assert record.host_name is None
    assert record.revoked is False
    assert record.last_used is None


def test_create_carries_limits(home):
    _, record = tokens.create(home, ttl_seconds=60, uses=1, workers=8, host_name="worker-7.lan", now=NOW)
    _, shared = tokens.create(home, ttl_seconds=60, uses=3, workers=8, now=NOW)

    assert record.expires == NOW + 60
    assert record.uses_left == 1
    assert shared.uses_left == 3
    assert shared.uses_total == 3
    assert record.workers == 8
    assert record.host_name == "worker-7.lan"
    assert tokens.list_tokens(home, now=NOW) == [record, shared]


def test_create_host_name_needs_single_use(home):
    with pytest.raises(tokens.TokenError) as err:
        tokens.create(home, uses=2, host_name="w1", now=NOW)
    assert str(err.value) == "--host-name names one host, so it needs --uses 1 (not 2)"


def test_create_host_name_already_in_inventory(home):
    from quil_cluster.coordinator.inventory import Host

    home.path.mkdir()
    home.save_hosts([Host("w1", "192.0.2.5", "192.0.2.5:7350", control=True, workers=1)])
    with pytest.raises(tokens.TokenError) as err:
        tokens.create(home, host_name="w1", now=NOW)
    assert str(err.value) == "host w1 is already in the inventory; choose another --host-name"


def test_create_ids_and_secrets_unique(home):
    created = [tokens.create(home, now=NOW) for _ in range(50)]

    assert len({record.id for _, record in created}) == 50
    assert len({_secret(text) for text, _ in created}) == 50
    assert [row["id"] for row in _store(home)["tokens"]] == [record.id for _, record in created]


def test_create_stores_only_hash(home):
    token_text, record = tokens.create(home, uses=2, now=NOW)
    tokens.consume(home, token_text, now=NOW)

    for name in ("tokens.json", "tokens.json.bak"):
        stored = home.file(name).read_bytes()
        assert _secret(token_text).encode() not in stored
        assert record.hash.encode() in stored


def test_store_files_mode_0600(home):
    tokens.create(home, now=NOW)
    tokens.create(home, now=NOW)

    assert stat.S_IMODE(home.file("tokens.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(home.file("tokens.json.bak").stat().st_mode) == 0o600


def test_create_boundary_values_accepted(home):
    _, longest = tokens.create(home, ttl_seconds=7 * DAY, uses=1000, workers=4096, now=NOW)
    _, named = tokens.create(home, ttl_seconds=7 * DAY, uses=1, workers=4096, host_name="a" * 63, now=NOW)
    _, shortest = tokens.create(home, ttl_seconds=1, uses=1, workers=1, host_name="A", now=NOW)

    assert longest.expires == NOW + 7 * DAY
    assert longest.uses_left == 1000
    assert shortest.expires == NOW + 1
    assert shortest.workers == 1


@pytest.mark.parametrize("ttl", [0, -1, 7 * DAY + 1, math.nan, math.inf, True, "30m", None])
def test_create_rejects_bad_ttl(home, ttl):
    with pytest.raises(TokenError) as caught:
        tokens.create(home, ttl_seconds=ttl, now=NOW)

    assert str(caught.value) == f"invalid ttl {ttl!r}: use more than 0 s and at most 7 days (604800 s)"
    assert not home.file("tokens.json").exists()


@pytest.mark.parametrize("uses", [0, -1, 1001, True, 1.5, "2", None])
def test_create_rejects_bad_uses(home, uses):
    with pytest.raises(TokenError) as caught:
        tokens.create(home, uses=uses, now=NOW)

    assert str(caught.value) == f"invalid use count {uses!r}: use 1 to 1000"
    assert not home.file("tokens.json").exists()


@pytest.mark.parametrize("workers", [0, -3, 4097])
def test_create_rejects_bad_workers(home, workers):
    with pytest.raises(InventoryError) as caught:
        tokens.create(home, workers=workers, now=NOW)

    assert str(caught.value) == f"invalid worker count {workers}: use 1 to 4096"
    assert not home.file("tokens.json").exists()


@pytest.mark.parametrize("name", ["", "-worker", ".worker", "a b", "a" * 64, "host/x", "höst", "worker\n"])
def test_create_rejects_bad_host_name(home, name):
    with pytest.raises(InventoryError) as caught:
        tokens.create(home, host_name=name, now=NOW)

    assert str(caught.value) == (
        f"invalid host name '{name}': use letters, digits, '.', '_' or '-' (at most 63 characters)"
    )
    assert not home.file("tokens.json").exists()


# -- consume ----------------------------------------------------------------


def test_consume_single_use_then_used_up(home):
    token_text, created = tokens.create(home, workers=4, host_name="worker-1", now=NOW)

    accepted = tokens.consume(home, token_text, now=NOW + 10)
    rejected = _rejection(home, token_text, now=NOW + 20)

    assert accepted.id == created.id
    assert accepted.uses_left == 0
    assert accepted.last_used == NOW + 10
    assert accepted.workers == 4
    assert accepted.host_name == "worker-1"
    assert rejected.reason == RejectReason.USED_UP
    assert rejected.token_id == created.id
    assert str(rejected) == REJECTED
    [stored] = tokens.list_tokens(home, now=NOW + 20)
    assert stored.uses_left == 0
    assert stored.last_used == NOW + 20
    assert stored.status(NOW + 20) == TokenStatus.USED


def test_consume_multi_use_then_rejected(home):
    token_text, _ = tokens.create(home, uses=3, now=NOW)

    uses_left = [tokens.consume(home, token_text, now=NOW + i).uses_left for i in range(3)]
    rejected = _rejection(home, token_text, now=NOW + 3)

    assert uses_left == [2, 1, 0]
    assert rejected.reason == RejectReason.USED_UP
    assert _store(home)["tokens"][0]["uses_left"] == 0


def test_consume_expired_spends_use(home):
    token_text, record = tokens.create(home, ttl_seconds=60, uses=2, now=NOW)

    rejected = _rejection(home, token_text, now=NOW + 60)

    assert rejected.reason == RejectReason.EXPIRED
    assert rejected.token_id == record.id
    assert str(rejected) == REJECTED
    # The rejected attempt still spent a use, as consume() spends before it checks.
    assert _store(home)["tokens"][0]["uses_left"] == 1


def test_consume_just_before_expiry_accepted(home):
    token_text, _ = tokens.create(home, ttl_seconds=60, now=NOW)

    accepted = tokens.consume(home, token_text, now=NOW + 59.999)

    assert accepted.uses_left == 0


def test_consume_revoked_rejected(home):
    token_text, record = tokens.create(home, uses=5, now=NOW)
    tokens.revoke(home, record.id)

    rejected = _rejection(home, token_text)

    assert rejected.reason == RejectReason.REVOKED
    assert rejected.token_id == record.id
    assert str(rejected) == REJECTED


def test_consume_unknown_token_leaves_store(home):
    tokens.create(home, now=NOW)
    before = home.file("tokens.json").read_bytes()
    unknown = "qct_0123abcd." + "A" * 43

    rejected = _rejection(home, unknown)

    assert rejected.reason == RejectReason.UNKNOWN
    assert rejected.token_id == "0123abcd"
    assert str(rejected) == REJECTED
    assert home.file("tokens.json").read_bytes() == before


def test_consume_known_id_wrong_secret_unknown(home):
    token_text, record = tokens.create(home, now=NOW)
    secret = _secret(token_text)
    guessed = f"qct_{record.id}." + ("B" if secret[0] != "B" else "C") + secret[1:]

    rejected = _rejection(home, guessed)

    assert rejected.reason == RejectReason.UNKNOWN
    assert tokens.consume(home, token_text, now=NOW).uses_left == 0


MALFORMED = {
    "empty": "",
    "prefix only": "qct_",
    "wrong prefix": "qcx_0123abcd." + "A" * 43,
    "upper-case prefix": "QCT_0123abcd." + "A" * 43,
    "no dot": "qct_0123abcd" + "A" * 43,
    "short id": "qct_0123abc." + "A" * 43,
    "upper-case id": "qct_0123ABCD." + "A" * 43,
    "short secret": "qct_0123abcd." + "A" * 42,
    "padded secret": "qct_0123abcd." + "A" * 43 + "=",
    "trailing newline": "qct_0123abcd." + "A" * 43 + "\n",
    "leading space": " qct_0123abcd." + "A" * 43,
    "non-ascii": "qct_0123abcd." + "A" * 42 + "é",
    "too long": "qct_0123abcd." + "A" * 188,
    "bytes": b"qct_0123abcd." + b"A" * 43,
    "none": None,
}


@pytest.mark.parametrize("token_text", MALFORMED.values(), ids=MALFORMED.keys())
def test_consume_malformed_does_not_touch_store(home, token_text):
    rejected = _rejection(home, token_text)

    assert rejected.reason == RejectReason.MALFORMED
    assert rejected.token_id is None
    assert str(rejected) == REJECTED
    # Home.locked() creates the directory, so the store was never opened.
    assert not home.path.exists()


def test_consume_token_with_suffix_malformed(home):
    token_text, _ = tokens.create(home, now=NOW)
    before = home.file("tokens.json").read_bytes()

    rejected = _rejection(home, token_text + "A" * 150)

    assert rejected.reason == RejectReason.MALFORMED
    assert home.file("tokens.json").read_bytes() == before
    assert tokens.consume(home, token_text, now=NOW).uses_left == 0


def test_consume_message_same_for_every_reason(home):
    used, _ = tokens.create(home, now=NOW)
    tokens.consume(home, used, now=NOW)
    expired, _ = tokens.create(home, ttl_seconds=1, now=NOW)
    revoked, revoked_record = tokens.create(home, now=NOW)
    tokens.revoke(home, revoked_record.id)
    cases = {
        RejectReason.USED_UP: used,
        RejectReason.EXPIRED: expired,
        RejectReason.REVOKED: revoked,
        RejectReason.UNKNOWN: "qct_0123abcd." + "A" * 43,
        RejectReason.MALFORMED: "nonsense",
    }

    rejections = {reason: _rejection(home, text, now=NOW + 5) for reason, text in cases.items()}

    assert {reason: err.reason for reason, err in rejections.items()} == {r: r for r in cases}
    assert {str(err) for err in rejections.values()} == {REJECTED}


def test_join_rejected_pickles_reason_and_id():
    original = JoinRejected(RejectReason.EXPIRED, "0123abcd")

    copy = pickle.loads(pickle.dumps(original))

    assert copy.reason == RejectReason.EXPIRED
    assert copy.token_id == "0123abcd"
    assert str(copy) == REJECTED


# -- list, revoke, prune ------------------------------------------------------


def test_list_tokens_statuses(home):
    valid_text, valid = tokens.create(home, now=NOW)
    used_text, used = tokens.create(home, now=NOW)
    tokens.consume(home, used_text, now=NOW)
    _, expired = tokens.create(home, ttl_seconds=10, now=NOW)
    _, revoked = tokens.create(home, now=NOW)
    tokens.revoke(home, revoked.id)

    listed = tokens.list_tokens(home, now=NOW + 100)

    assert [r.id for r in listed] == [valid.id, used.id, expired.id, revoked.id]
    assert [r.status(NOW + 100) for r in listed] == [
        TokenStatus.VALID,
        TokenStatus.USED,
        TokenStatus.EXPIRED,
        TokenStatus.REVOKED,
    ]
    assert _secret(valid_text) not in repr(listed)


def test_list_tokens_empty_store(home):
    assert tokens.list_tokens(home, now=NOW) == []


def test_list_tokens_hides_prunable_without_writing(home):
    _, old = tokens.create(home, ttl_seconds=60, now=NOW)
    _, new = tokens.create(home, ttl_seconds=7 * DAY, now=NOW)
    before = home.file("tokens.json").read_bytes()

    listed = tokens.list_tokens(home, now=NOW + 60 + DAY + 1)

    assert [r.id for r in listed] == [new.id]
    assert home.file("tokens.json").read_bytes() == before
    assert [row["id"] for row in _store(home)["tokens"]] == [old.id, new.id]


def test_revoke_marks_record(home):
    _, record = tokens.create(home, now=NOW)

    revoked = tokens.revoke(home, record.id)
    again = tokens.revoke(home, record.id)

    assert revoked.revoked is True
    assert again.revoked is True
    assert _store(home)["tokens"][0]["revoked"] is True


def test_revoke_unknown_id(home):
    tokens.create(home, now=NOW)

    with pytest.raises(TokenError) as caught:
        tokens.revoke(home, "0123abcd")

    assert str(caught.value) == "no join token with id 0123abcd; run quil-coord token list to see the ids"


@pytest.mark.parametrize("token_id", ["", "0123abc", "0123ABCD", "0123abcd0", "qct_0123abcd." + "A" * 43, None])
def test_revoke_invalid_id_not_echoed(home, token_id):
    with pytest.raises(TokenError) as caught:
        tokens.revoke(home, token_id)

    assert str(caught.value) == "invalid token id: use the 8 hex characters shown by quil-coord token list"


def test_prune_removes_a_day_after_expiry(home):
    used_text, short = tokens.create(home, ttl_seconds=100, now=NOW)
    tokens.consume(home, used_text, now=NOW)
    _, long = tokens.create(home, ttl_seconds=7 * DAY, now=NOW)

    kept_at_one_day = tokens.prune(home, now=NOW + 100 + DAY)
    removed = tokens.prune(home, now=NOW + 100 + DAY + 1)

    assert kept_at_one_day == []
    assert [r.id for r in removed] == [short.id]
    assert [row["id"] for row in _store(home)["tokens"]] == [long.id]


def test_prune_empty_store_writes_nothing(home):
    assert tokens.prune(home, now=NOW) == []
    assert not home.file("tokens.json").exists()


def test_create_prunes_old_records(home):
    tokens.create(home, ttl_seconds=60, now=NOW)

    _, new = tokens.create(home, now=NOW + 60 + DAY + 1)

    assert [row["id"] for row in _store(home)["tokens"]] == [new.id]


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"version": 2, "tokens": []}', b'{"version": 1, "tokens": [{"id": "0123abcd"}]}'],
)
def test_corrupt_store_raises_state_error(home, content):
    home.path.mkdir()
    home.file("tokens.json").write_bytes(content)
    path = home.file("tokens.json")

    with pytest.raises(StateError) as caught:
        tokens.create(home, now=NOW)

    assert str(caught.value).startswith(f"{path}: ")
    assert home.file("tokens.json").read_bytes() == content


# -- parse_duration -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("7d", 604800), ("1s", 1)],
)
def test_parse_duration_valid(text, seconds):
    assert tokens.parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "", "30", "m", "0m", "-5m", "+5m", "1.5h", "30M", " 30m", "30m ", "1h30m", "30 m",
        "\u0663m", "1w", "9" * 13 + "s", None,
    ],
)
def test_parse_duration_rejects(text):
    with pytest.raises(TokenError) as caught:
        tokens.parse_duration(text)

    assert str(caught.value) == (
        f"invalid duration {text!r}: use a whole number above 0 followed by s, m, h or d, such as 30m"
    )


# -- concurrency ----------------------------------------------------------------


def _consume_in_threads(home: Home, token_texts: list[str]) -> list:
    barrier = threading.Barrier(len(token_texts))
    outcomes: list = [None] * len(token_texts)

    def run(index: int) -> None:
        barrier.wait()
        try:
            outcomes[index] = tokens.consume(home, token_texts[index])
        except JoinRejected as err:
            outcomes[index] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(token_texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def _consume_in_processes(home: Home, token_texts: list[str]) -> list:
    # Every worker process waits at the barrier, so all calls start together once the
    # last process has imported the package.
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(token_texts))
    outcomes = []
    with context.Pool(len(token_texts), initializer=barrier.wait) as pool:
        pending = [pool.apply_async(tokens.consume, (home, text)) for text in token_texts]
        for result in pending:
            try:
                outcomes.append(result.get(timeout=120))
            except JoinRejected as err:
                outcomes.append(err)
        pool.close()
        pool.join()
    return outcomes


def _split(outcomes: list) -> tuple[list[tokens.TokenRecord], list[JoinRejected]]:
    accepted = [o for o in outcomes if isinstance(o, tokens.TokenRecord)]
    rejected = [o for o in outcomes if isinstance(o, JoinRejected)]
    assert len(accepted) + len(rejected) == len(outcomes)
    return accepted, rejected


def test_consume_single_use_20_threads_one_wins(home):
    token_text, _ = tokens.create(home)

    accepted, rejected = _split(_consume_in_threads(home, [token_text] * 20))

    assert len(accepted) == 1
    assert len(rejected) == 19
    assert {err.reason for err in rejected} == {RejectReason.USED_UP}
    assert _store(home)["tokens"][0]["uses_left"] == 0


def test_consume_single_use_8_processes_one_wins(home):
    token_text, _ = tokens.create(home)

    accepted, rejected = _split(_consume_in_processes(home, [token_text] * 8))

    assert len(accepted) == 1
    assert len(rejected) == 7
    assert {err.reason for err in rejected} == {RejectReason.USED_UP}
    assert _store(home)["tokens"][0]["uses_left"] == 0


def test_consume_20_tokens_20_processes_all_win(home):
    created = [tokens.create(home) for _ in range(20)]

    accepted, rejected = _split(_consume_in_processes(home, [text for text, _ in created]))

    assert rejected == []
    assert sorted(r.id for r in accepted) == sorted(record.id for _, record in created)
    rows = _store(home)["tokens"]
    assert len(rows) == 20
    assert [row["uses_left"] for row in rows] == [0] * 20
    assert all(row["last_used"] is not None for row in rows)


def test_create_20_threads_keeps_every_record(home):
    barrier = threading.Barrier(20)
    ids: list[str] = []

    def run() -> None:
        barrier.wait()
        ids.append(tokens.create(home)[1].id)

    threads = [threading.Thread(target=run) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert len(ids) == 20
    assert sorted(row["id"] for row in _store(home)["tokens"]) == sorted(ids)
