"""Node version from the binary's name, the ephemeral port warning, and the config hash on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from quil_cluster.agent import hostinfo


@pytest.mark.parametrize("name, version", [
    ("node-2.1.0.25-linux-amd64", "2.1.0.25"),
    ("node-1.4.21-linux-arm64", "1.4.21"),
    ("node-2.0.6.3-darwin-arm64", "2.0.6.3"),
    ("node", ""),
    ("quilibrium", ""),
])
def test_node_version_from_file_name(name, version):
    assert hostinfo.node_version(Path("/opt/q") / name) == version


def test_ephemeral_range_read_from_kernel_file(tmp_path):
    path = tmp_path / "ip_local_port_range"
    path.write_text("32768\t60999\n")
    assert hostinfo.ephemeral_range(path) == (32768, 60999)
    assert hostinfo.ephemeral_range(tmp_path / "missing") is None
    path.write_text("garbage\n")
    assert hostinfo.ephemeral_range(path) is None


def test_ephemeral_warning_names_ports_and_fix():
    assert hostinfo.ephemeral_warning([40000, 40001, 40002], (32768, 60999)) == (
        "worker ports 40000-40002 are inside this host's ephemeral port range 32768-60999, so an outgoing "
        "connection can take one before its worker starts; reserve them with "
        "sysctl -w net.ipv4.ip_local_reserved_ports=40000-40002, or choose a base port below 32768")


def test_ephemeral_warning_absent_when_ports_are_reserved():
    assert hostinfo.ephemeral_warning([40000, 40001], (32768, 60999), frozenset({40000, 40001})) is None


def test_ephemeral_warning_fix_keeps_ports_reserved_already():
    # The sysctl replaces the whole list, so the suggested value keeps 50000.
    assert hostinfo.ephemeral_warning([40000, 40001, 40002], (32768, 60999), frozenset({40000, 50000})) == (
        "worker ports 40001-40002 are inside this host's ephemeral port range 32768-60999, so an outgoing "
        "connection can take one before its worker starts; reserve them with "
        "sysctl -w net.ipv4.ip_local_reserved_ports=40000-40002,50000, or choose a base port below 32768")


def test_reserved_port_set_reads_the_kernel_list(tmp_path):
    path = tmp_path / "ip_local_reserved_ports"
    path.write_text("40000-40002,50000\n")
    assert hostinfo.reserved_port_set(path) == frozenset({40000, 40001, 40002, 50000})
    path.write_text("40000-abc\n")
    assert hostinfo.reserved_port_set(path) == frozenset()


def test_ephemeral_warning_absent_outside_range():
    assert hostinfo.ephemeral_warning([25000, 25001], (32768, 60999)) is None
    assert hostinfo.ephemeral_warning([40000], None) is None


def test_file_sha256_of_missing_file_is_empty(tmp_path):
    assert hostinfo.file_sha256(tmp_path / "none") == ""
    (tmp_path / "c").write_bytes(b"x")
    assert hostinfo.file_sha256(tmp_path / "c") == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"


def test_reserved_ports_read_from_kernel_file(tmp_path):
    path = tmp_path / "ip_local_reserved_ports"
    path.write_text("40000-40015,41000\n")
    assert hostinfo.reserved_ports(path) == "40000-40015,41000"
    assert hostinfo.reserved_ports(tmp_path / "missing") == ""


def test_interface_addresses_include_loopback():
    addresses = hostinfo.interface_addresses()
    assert "127.0.0.1" in addresses
    assert all("%" not in a and "/" not in a for a in addresses)


def test_signature_files_found_next_to_binary(tmp_path):
    binary = tmp_path / "node-2.1.0.25-linux-amd64"
    for name in (binary.name, f"{binary.name}.dgst", f"{binary.name}.dgst.sig.1", f"{binary.name}.dgst.sig.12",
                 f"{binary.name}.dgst.sig.x", "node-2.1.0.24-linux-amd64.dgst", "other.dgst"):
        (tmp_path / name).write_text("x")
    assert hostinfo.signature_files(binary) == [f"{binary.name}.dgst", f"{binary.name}.dgst.sig.1",
                                                f"{binary.name}.dgst.sig.12"]


def test_signature_files_follow_symlink(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    target = release / "node-2.1.0.25-linux-amd64"
    target.write_text("x")
    (release / "node-2.1.0.25-linux-amd64.dgst").write_text("x")
    link = tmp_path / "node"
    link.symlink_to(target)
    (tmp_path / "node.dgst").write_text("x")
    assert hostinfo.signature_files(link) == ["node-2.1.0.25-linux-amd64.dgst"]


def test_signature_files_of_missing_directory_is_empty(tmp_path):
    assert hostinfo.signature_files(tmp_path / "none" / "node") == []


@pytest.mark.parametrize("args, env, disabled", [
    ((), {}, False),
    (("--signature-check=false",), {}, True),
    (("-signature-check=0",), {}, True),
    (("--signature-check=false", "--signature-check=true"), {}, False),
    (("--signature-check",), {"QUILIBRIUM_SIGNATURE_CHECK": "false"}, False),
    ((), {"QUILIBRIUM_SIGNATURE_CHECK": "false"}, True),
    ((), {"QUILIBRIUM_SIGNATURE_CHECK": "F"}, True),
    # The node warns about a value Go cannot parse and keeps the check on.
    ((), {"QUILIBRIUM_SIGNATURE_CHECK": "no"}, False),
    (("--debug", "--signature-check-other=false"), {}, False),
])
def test_signature_check_disabled_follows_flag_then_env(args, env, disabled):
    assert hostinfo.signature_check_disabled(args, env) is disabled
