"""Kernel port lists: parsing and formatting."""

from __future__ import annotations

import pytest

from quil_cluster.common import portlist
from quil_cluster.common.errors import ConfigError


def test_parse_ranges_and_single_ports():
    assert portlist.parse("40000-40002, 41000") == {40000, 40001, 40002, 41000}
    assert portlist.parse("") == set()


@pytest.mark.parametrize("text, message", [
    ("abc", "port list 'abc': 'abc' is not a port or a range PORT-PORT"),
    ("5-3", "port list '5-3': '5-3' is not within 1-65535 with the lower port first"),
    ("70000", "port list '70000': '70000' is not within 1-65535 with the lower port first"),
])
def test_parse_rejects_bad_input(text, message):
    with pytest.raises(ConfigError) as info:
        portlist.parse(text)
    assert str(info.value) == message


def test_format_joins_consecutive_ports():
    assert portlist.format_ranges([40002, 40000, 40001, 40010, 40012, 40011]) == "40000-40002,40010-40012"
    assert portlist.format_ranges([25000]) == "25000"
    assert portlist.format_ranges([]) == ""
