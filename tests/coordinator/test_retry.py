"""Retries of agent calls: which status codes are retried, how often, and the jittered delays."""

from __future__ import annotations

import random

import grpc
import pytest

from quil_cluster.coordinator.client import RETRY_ATTEMPTS, call_with_retries, retry_delay


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def _failing(codes: list[grpc.StatusCode], result: str = "ok"):
    """A call that raises each of codes in turn, then returns result; counts its calls."""
    calls = []

    def call() -> str:
        calls.append(1)
        if len(calls) <= len(codes):
            raise FakeRpcError(codes[len(calls) - 1])
        return result

    return call, calls


@pytest.mark.parametrize("retry, low, high", [(1, 0.25, 0.5), (2, 0.5, 1.0), (3, 1.0, 2.0), (4, 2.0, 4.0),
                                              (5, 2.0, 4.0), (10, 2.0, 4.0)])
def test_retry_delay_within_bounds(retry, low, high):
    rng = random.Random(1234)
    delays = [retry_delay(retry, rng) for _ in range(2000)]
    assert min(delays) >= low
    assert max(delays) <= high
    # jitter: the draws spread over the range instead of repeating one value
    assert max(delays) - min(delays) > (high - low) * 0.9


def test_retry_delay_repeats_with_same_seed():
    first = [retry_delay(2, random.Random(7)) for _ in range(3)]
    again = [retry_delay(2, random.Random(7)) for _ in range(3)]
    assert first == again
    sequence = random.Random(7)
    assert len({retry_delay(2, sequence) for _ in range(20)}) == 20


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_retryable_code_is_sent_again(code):
    call, calls = _failing([code, code])
    slept: list[float] = []
    assert call_with_retries(call, "test call", rng=random.Random(3), sleep=slept.append) == "ok"
    assert len(calls) == 3
    assert len(slept) == 2
    assert 0.25 <= slept[0] <= 0.5
    assert 0.5 <= slept[1] <= 1.0


@pytest.mark.parametrize("code", [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN])
def test_other_codes_are_not_retried(code):
    call, calls = _failing([code])
    slept: list[float] = []
    with pytest.raises(FakeRpcError) as caught:
        call_with_retries(call, "test call", rng=random.Random(3), sleep=slept.append)
    assert caught.value.code() == code
    assert len(calls) == 1
    assert slept == []


def test_retries_stop_after_attempts():
    call, calls = _failing([grpc.StatusCode.UNAVAILABLE] * 10)
    slept: list[float] = []
    with pytest.raises(FakeRpcError) as caught:
        call_with_retries(call, "test call", rng=random.Random(3), sleep=slept.append)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(calls) == RETRY_ATTEMPTS == 3
    assert len(slept) == 2


def test_single_attempt_never_sleeps():
    call, calls = _failing([grpc.StatusCode.UNAVAILABLE])
    slept: list[float] = []
    with pytest.raises(FakeRpcError):
        call_with_retries(call, "test call", attempts=1, sleep=slept.append)
    assert len(calls) == 1
    assert slept == []


def test_retry_is_logged_with_delay(caplog):
    call, _ = _failing([grpc.StatusCode.UNAVAILABLE])
    with caplog.at_level("WARNING", logger="quil_cluster.coordinator.client"):
        call_with_retries(call, "Apply on B", rng=random.Random(3), sleep=lambda _: None)
    [record] = caplog.records
    assert record.getMessage().startswith("retry: Apply on B failed (unavailable); attempt 2 of 3 in 0.")
    assert record.getMessage().endswith(" s")
