"""Strict YAML loading of the project's own files: errors name the file and stay one line."""

from __future__ import annotations

import pytest

from quil_cluster.common import yamlio
from quil_cluster.common.errors import ConfigError

DEEP = "node_args: " + "[" * 5000 + "]" * 5000 + "\n"


def test_load_mapping_rejects_deep_nesting():
    with pytest.raises(ConfigError) as caught:
        yamlio.load_mapping(DEEP, "agent.yaml")
    assert str(caught.value) == (
        "agent.yaml: invalid YAML: lists or mappings nested too deeply to parse; this file needs a few levels"
    )


def test_read_mapping_rejects_deep_nesting(tmp_path):
    path = tmp_path / "hosts.yaml"
    path.write_text(DEEP)
    with pytest.raises(ConfigError) as caught:
        yamlio.read_mapping(path)
    assert str(caught.value) == (
        f"{path}: invalid YAML: lists or mappings nested too deeply to parse; this file needs a few levels"
    )


def test_load_mapping_accepts_a_few_levels():
    assert yamlio.load_mapping("tls:\n  cert: [[a]]\n", "agent.yaml") == {"tls": {"cert": [["a"]]}}


def test_load_mapping_rejects_duplicate_key():
    with pytest.raises(ConfigError) as caught:
        yamlio.load_mapping("cluster: a\ncluster: b\n", "agent.yaml")
    assert str(caught.value) == "agent.yaml:2: duplicate key 'cluster' (first at line 1); remove one of them"


def test_load_mapping_rejects_control_character():
    with pytest.raises(ConfigError) as err:
        yamlio.load_mapping("\x0c", "agent.yaml")
    assert str(err.value) == ("agent.yaml: invalid YAML: character #x000c at position 0 is not allowed in YAML; "
                              "remove it")
