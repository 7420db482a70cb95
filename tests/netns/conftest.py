"""Fixtures for tests that run hosts in network namespaces, and the rule that skips or fails them.

Outside CI these tests skip when the machine cannot run a bed (not root, no
iproute2 or nftables, namespaces not permitted). With CI=true they fail instead,
so a CI run cannot pass without them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from netbed import NetBed

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "netns: runs hosts in Linux network namespaces (needs root, iproute2, nftables)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The hook receives the items of every folder, so mark only those below this one.
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.netns)


@pytest.fixture(scope="session")
def netbed_unavailable_reason() -> str | None:
    """Why beds cannot run here, or None. When they can, beds left by crashed runs are swept first."""
    reason = NetBed.unavailable_reason()
    if reason is None:
        NetBed.sweep_stale()
    return reason


@pytest.fixture(autouse=True)
def netbed_required(netbed_unavailable_reason: str | None) -> None:
    """Skip the test when beds cannot run, or fail it when CI is "true"."""
    if netbed_unavailable_reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"network namespace tests cannot run with CI=true: {netbed_unavailable_reason}", pytrace=False)
    pytest.skip(netbed_unavailable_reason)


@pytest.fixture
def netbed() -> Iterator[Callable[[list[str]], NetBed]]:
    """A factory of created beds. Each is destroyed at teardown, also when the test fails."""
    with contextlib.ExitStack() as stack:

        def make(names: list[str]) -> NetBed:
            bed = NetBed(names)
            # Registered before create() so a half-built bed is removed too.
            stack.callback(bed.destroy)
            bed.create()
            return bed

        yield make
