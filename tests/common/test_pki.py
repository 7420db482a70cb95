"""Tests for common/pki.py: identities, the cluster CA, leaf certificates and key files."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from quil_cluster.common import pki
from quil_cluster.common.errors import TLSError
from quil_cluster.common.pki import Identity

UTC = datetime.timezone.utc
AGENT = Identity("alpha", "agent", "host-1")
REISSUE = "reissue it with quil-coord host add / rotate"

Pair = tuple[bytes, bytes]


def _load(cert_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert_pem)


def _sign_leaf(ca_key_pem: bytes, ca_cert_pem: bytes, names: list[x509.GeneralName]) -> Pair:
    """Sign a leaf with exactly the SANs given, bypassing pki.issue, which always adds one URI."""
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = _load(ca_cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "handmade")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def cluster_ca() -> Pair:
    return pki.create_ca("alpha")


@pytest.fixture
def agent_pair(cluster_ca: Pair) -> Pair:
    ca_key, ca_cert = cluster_ca
    return pki.issue(ca_key, ca_cert, AGENT, ip_addresses=["127.0.0.1", "fd00::7"], dns_names=["host-1"])


@pytest.fixture
def cert_from_other_ca() -> Pair:
    # Same cluster name, so the CA subjects are equal and only the signature differs.
    other_key, other_cert = pki.create_ca("alpha")
    return pki.issue(other_key, other_cert, AGENT)


@pytest.fixture
def expired_agent_cert(cluster_ca: Pair) -> Pair:
    ca_key, ca_cert = cluster_ca
    start = datetime.datetime(2020, 1, 1, tzinfo=UTC)
    return pki.issue(ca_key, ca_cert, AGENT, days=30, not_before=start)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


# Identity


def test_identity_uri_round_trip() -> None:
    identity = Identity("alpha", "agent", "host-1.example_2")

    assert identity.uri == "quil://alpha/agent/host-1.example_2"
    assert Identity.parse_uri(identity.uri) == identity
    assert pki.parse_uri(identity.uri) == identity


@pytest.mark.parametrize("role", pki.ROLES)
def test_identity_round_trip_every_role(role: str) -> None:
    identity = Identity("alpha", role, "coordinator")

    assert Identity.parse_uri(identity.uri) == identity


def test_identity_name_length_limit() -> None:
    longest = "h" * 63

    assert Identity("alpha", "agent", longest).name == longest
    with pytest.raises(TLSError):
        Identity("alpha", "agent", "h" * 64)


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "quil://alpha/agent",
        "quil://alpha/agent/host-1/extra",
        "quil://alpha/agent/host-1/",
        "quil://alpha//host-1",
        "quil:///agent/host-1",
        "quil:alpha/agent/host-1",
        "QUIL://alpha/agent/host-1",
        "https://alpha/agent/host-1",
        "spiffe://alpha/agent/host-1",
        "quil://alpha/admin/host-1",
        "quil://alpha/Agent/host-1",
        "quil://alpha/agent/-host",
        "quil://alpha/agent/.host",
        "quil://alpha/agent/host 1",
        "quil://alpha/agent/host-1?role=coordinator",
        "quil://alpha/agent/host-1#x",
        "quil://alpha:443/agent/host-1",
        "quil://user@alpha/agent/host-1",
        "quil://alpha/agent/host%2D1",
        "quil://alpha/agent/hóst",
        "quil://alpha/agent/host-1\n",
        "quil://alpha/agent/" + "h" * 64,
    ],
)
def test_parse_uri_rejects_malformed(uri: str) -> None:
    with pytest.raises(TLSError, match=r"^invalid identity URI "):
        Identity.parse_uri(uri)


def test_parse_uri_error_messages() -> None:
    with pytest.raises(TLSError) as no_scheme:
        Identity.parse_uri("https://alpha/agent/host-1")
    with pytest.raises(TLSError) as bad_role:
        Identity.parse_uri("quil://alpha/admin/host-1")
    with pytest.raises(TLSError) as bad_name:
        Identity.parse_uri("quil://alpha/agent/-host")

    assert str(no_scheme.value) == (
        "invalid identity URI 'https://alpha/agent/host-1': expected quil://CLUSTER/ROLE/NAME"
    )
    assert str(bad_role.value) == (
        "invalid identity URI 'quil://alpha/admin/host-1': "
        "role 'admin' is invalid: expected one of coordinator, agent, observer"
    )
    assert str(bad_name.value) == (
        "invalid identity URI 'quil://alpha/agent/-host': host name '-host' is invalid: "
        "use 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"
    )


def test_identity_constructor_validates() -> None:
    with pytest.raises(TLSError, match=r"^invalid identity: cluster name 'a/b' is invalid"):
        Identity("a/b", "agent", "host-1")
    with pytest.raises(TLSError, match=r"^invalid identity: role 'root' is invalid"):
        Identity("alpha", "root", "host-1")
    with pytest.raises(TLSError, match=r"^invalid identity: host name '' is invalid"):
        Identity("alpha", "agent", "")


# create_ca


def test_create_ca_extensions(cluster_ca: Pair) -> None:
    _, ca_pem = cluster_ca
    ca = _load(ca_pem)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    key_usage = ca.extensions.get_extension_for_class(x509.KeyUsage)

    assert constraints.critical
    assert constraints.value.ca is True
    assert constraints.value.path_length == 0
    assert key_usage.critical
    assert key_usage.value.key_cert_sign
    assert key_usage.value.crl_sign
    assert not key_usage.value.digital_signature
    assert ca.subject == ca.issuer
    assert ca.subject.rfc4514_string() == "CN=quil-cluster alpha CA"
    ca.verify_directly_issued_by(ca)


def test_create_ca_key_is_p256(cluster_ca: Pair) -> None:
    key_pem, ca_pem = cluster_ca
    key = serialization.load_pem_private_key(key_pem, password=None)
    public_key = _load(ca_pem).public_key()

    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == public_key
    assert _load(ca_pem).signature_hash_algorithm is not None
    assert _load(ca_pem).signature_hash_algorithm.name == "sha256"


def test_create_ca_validity_days() -> None:
    before = datetime.datetime.now(UTC).replace(microsecond=0)
    _, ca_pem = pki.create_ca("alpha", days=20)
    after = datetime.datetime.now(UTC)
    ca = _load(ca_pem)

    twenty_days = datetime.timedelta(days=20)
    assert before + twenty_days <= ca.not_valid_after_utc <= after + twenty_days
    assert ca.not_valid_before_utc <= before - pki.CLOCK_SKEW + datetime.timedelta(seconds=1)


def test_create_ca_default_validity_ten_years(cluster_ca: Pair) -> None:
    ca = _load(cluster_ca[1])
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc

    assert lifetime == datetime.timedelta(days=3650) + pki.CLOCK_SKEW


def test_create_ca_rejects_invalid_cluster_name() -> None:
    with pytest.raises(TLSError, match=r"^cluster name 'my cluster' is invalid"):
        pki.create_ca("my cluster")


def test_create_ca_rejects_zero_days() -> None:
    with pytest.raises(ValueError, match=r"^validity must be at least 1 day, got 0$"):
        pki.create_ca("alpha", days=0)


# issue


def test_issue_sans_exact(agent_pair: Pair) -> None:
    cert = _load(agent_pair[1])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["quil://alpha/agent/host-1"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("fd00::7"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["host-1"]
    assert len(list(san)) == 4


def test_issue_coordinator_has_only_uri_san(cluster_ca: Pair) -> None:
    coordinator = Identity("alpha", "coordinator", "coordinator")
    cert = _load(pki.issue(*cluster_ca, coordinator)[1])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert list(san) == [x509.UniformResourceIdentifier("quil://alpha/coordinator/coordinator")]


def test_issue_leaf_extensions(cluster_ca: Pair, agent_pair: Pair) -> None:
    ca = _load(cluster_ca[1])
    cert = _load(agent_pair[1])
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    extended = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    authority_key_id = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_key_id = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    assert constraints.value.ca is False
    assert key_usage.digital_signature
    assert not key_usage.key_cert_sign
    assert not key_usage.crl_sign
    assert list(extended) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert authority_key_id.key_identifier == ca_key_id.digest
    assert cert.subject.rfc4514_string() == "CN=host-1"
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)


def test_issue_key_is_p256_and_matches(agent_pair: Pair) -> None:
    key = serialization.load_pem_private_key(agent_pair[0], password=None)

    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == _load(agent_pair[1]).public_key()


def test_issue_serials_random(cluster_ca: Pair) -> None:
    serials = {_load(pki.issue(*cluster_ca, AGENT)[1]).serial_number for _ in range(3)}

    assert len(serials) == 3
    # random_serial_number draws 159 bits; a counter would stay far below 2**64.
    assert all(serial > 2**64 for serial in serials)


def test_issue_default_validity_one_year(agent_pair: Pair) -> None:
    cert = _load(agent_pair[1])
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc

    assert lifetime == datetime.timedelta(days=365) + pki.CLOCK_SKEW


def test_issue_not_before_sets_validity(expired_agent_cert: Pair) -> None:
    cert = _load(expired_agent_cert[1])

    assert cert.not_valid_before_utc == datetime.datetime(2020, 1, 1, tzinfo=UTC)
    assert cert.not_valid_after_utc == datetime.datetime(2020, 1, 31, tzinfo=UTC)


def test_issue_ends_with_ca(caplog: pytest.LogCaptureFixture) -> None:
    ca_key, ca_pem = pki.create_ca("alpha", days=10)
    with caplog.at_level(logging.WARNING, logger="quil_cluster.common.pki"):
        cert = _load(pki.issue(ca_key, ca_pem, AGENT, days=365)[1])

    assert cert.not_valid_after_utc == _load(ca_pem).not_valid_after_utc
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage() == (
        "shortened: certificate quil://alpha/agent/host-1 "
        f"(ends with the CA on {cert.not_valid_after_utc.strftime('%Y-%m-%d %H:%M:%S UTC')})"
    )


def test_issue_rejects_leaf_as_ca(agent_pair: Pair) -> None:
    with pytest.raises(TLSError) as caught:
        pki.issue(*agent_pair, AGENT)

    assert str(caught.value) == "CA certificate is not a CA (basicConstraints CA:true is missing)"


def test_issue_rejects_expired_ca() -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "quil-cluster alpha CA")])
    expired_ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2019, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime.datetime(2020, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_key_pem = ca_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

    with pytest.raises(TLSError) as caught:
        pki.issue(ca_key_pem, expired_ca.public_bytes(serialization.Encoding.PEM), AGENT)

    assert str(caught.value) == (
        "CA certificate expired on 2020-01-01 00:00:00 UTC; "
        "create a new cluster CA and reissue every certificate"
    )


def test_issue_rejects_wrong_ca_key(cluster_ca: Pair) -> None:
    other_key, _ = pki.create_ca("alpha")

    with pytest.raises(TLSError, match=r"^CA private key does not match the CA certificate$"):
        pki.issue(other_key, cluster_ca[1], AGENT)


def test_issue_rejects_invalid_ip(cluster_ca: Pair) -> None:
    with pytest.raises(TLSError, match=r"^invalid IP address 'host-1' for the certificate$"):
        pki.issue(*cluster_ca, AGENT, ip_addresses=["host-1"])


@pytest.mark.parametrize(
    "name", ["", "-host", "host-", "a..b", ".host", "hóst", "*.example", "a b", "h" * 64]
)
def test_issue_rejects_invalid_dns_name(cluster_ca: Pair, name: str) -> None:
    with pytest.raises(TLSError) as caught:
        pki.issue(*cluster_ca, AGENT, dns_names=[name])

    assert str(caught.value) == (
        f"invalid DNS name {name!r} for the certificate: "
        "use dot-separated labels of letters, digits, '_' and inner '-'"
    )


def test_issue_accepts_dns_names(cluster_ca: Pair) -> None:
    names = ["host-1.rack2.example", "my_host", "h" * 63]
    cert = _load(pki.issue(*cluster_ca, AGENT, dns_names=names)[1])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert san.get_values_for_type(x509.DNSName) == names


def test_issue_rejects_naive_not_before(cluster_ca: Pair) -> None:
    with pytest.raises(ValueError, match=r"^not_before must be timezone-aware$"):
        pki.issue(*cluster_ca, AGENT, not_before=datetime.datetime(2020, 1, 1))


def test_issue_rejects_zero_days(cluster_ca: Pair) -> None:
    with pytest.raises(ValueError, match=r"^validity must be at least 1 day, got 0$"):
        pki.issue(*cluster_ca, AGENT, days=0)


# identity_from_cert_pem


def test_identity_from_cert_pem_round_trip(agent_pair: Pair) -> None:
    assert pki.identity_from_cert_pem(agent_pair[1]) == AGENT


def test_identity_from_cert_pem_ignores_other_uri_schemes(cluster_ca: Pair) -> None:
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier("spiffe://alpha/host-1"),
        x509.UniformResourceIdentifier(AGENT.uri),
    ]
    _, cert_pem = _sign_leaf(*cluster_ca, names)

    assert pki.identity_from_cert_pem(cert_pem) == AGENT


def test_identity_from_cert_pem_rejects_ca(cluster_ca: Pair) -> None:
    with pytest.raises(TLSError) as caught:
        pki.identity_from_cert_pem(cluster_ca[1])

    assert str(caught.value) == "certificate carries no quil-cluster identity (it has no subjectAltName)"


def test_identity_from_cert_pem_rejects_dns_only(cluster_ca: Pair) -> None:
    _, cert_pem = _sign_leaf(*cluster_ca, [x509.DNSName("host-1")])

    with pytest.raises(TLSError) as caught:
        pki.identity_from_cert_pem(cert_pem)

    assert str(caught.value) == "certificate carries no quil-cluster identity (no quil:// URI SAN)"


def test_identity_from_cert_pem_rejects_two_identities(cluster_ca: Pair) -> None:
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(AGENT.uri),
        x509.UniformResourceIdentifier("quil://alpha/coordinator/coordinator"),
    ]
    _, cert_pem = _sign_leaf(*cluster_ca, names)

    with pytest.raises(TLSError) as caught:
        pki.identity_from_cert_pem(cert_pem)

    assert str(caught.value) == "certificate carries 2 quil:// URI SANs; expected exactly one"


def test_identity_from_cert_pem_rejects_malformed_uri(cluster_ca: Pair) -> None:
    _, cert_pem = _sign_leaf(*cluster_ca, [x509.UniformResourceIdentifier("quil://alpha/root/host-1")])

    with pytest.raises(TLSError, match=r"^invalid identity URI 'quil://alpha/root/host-1': role 'root'"):
        pki.identity_from_cert_pem(cert_pem)


def test_identity_from_cert_pem_rejects_garbage() -> None:
    with pytest.raises(TLSError, match=r"^certificate is not a valid PEM certificate \("):
        pki.identity_from_cert_pem(b"not a certificate")


# check_pair


def test_check_pair_returns_identity(cluster_ca: Pair, agent_pair: Pair) -> None:
    key_pem, cert_pem = agent_pair

    assert pki.check_pair(key_pem, cert_pem, cluster_ca[1]) == AGENT


def test_check_pair_rejects_cert_from_other_ca(
    cluster_ca: Pair, cert_from_other_ca: Pair
) -> None:
    key_pem, cert_pem = cert_from_other_ca

    with pytest.raises(TLSError) as caught:
        pki.check_pair(
            key_pem, cert_pem, cluster_ca[1], cert_path="/etc/q/agent.crt", ca_path="/etc/q/ca.crt"
        )

    assert str(caught.value) == (
        "certificate /etc/q/agent.crt was not issued by CA certificate /etc/q/ca.crt "
        "(its issuer is CN=quil-cluster alpha CA); check the path or " + REISSUE
    )


def test_check_pair_rejects_expired_agent_cert(
    cluster_ca: Pair, expired_agent_cert: Pair
) -> None:
    key_pem, cert_pem = expired_agent_cert

    with pytest.raises(TLSError) as caught:
        pki.check_pair(key_pem, cert_pem, cluster_ca[1], cert_path="/etc/q/agent.crt")

    assert str(caught.value) == "certificate /etc/q/agent.crt expired on 2020-01-31 00:00:00 UTC; " + REISSUE


def test_check_pair_rejects_mismatched_key(cluster_ca: Pair, agent_pair: Pair) -> None:
    other_key, _ = pki.issue(*cluster_ca, AGENT)

    with pytest.raises(TLSError) as caught:
        pki.check_pair(
            other_key, agent_pair[1], cluster_ca[1], key_path="/etc/q/agent.key", cert_path="/etc/q/agent.crt"
        )

    assert str(caught.value) == (
        "private key /etc/q/agent.key does not match the public key in certificate /etc/q/agent.crt"
    )


def test_check_pair_rejects_not_yet_valid(cluster_ca: Pair) -> None:
    tomorrow = datetime.datetime.now(UTC).replace(microsecond=0) + datetime.timedelta(days=1)
    future_pair = pki.issue(*cluster_ca, AGENT, not_before=tomorrow)

    with pytest.raises(TLSError) as caught:
        pki.check_pair(*future_pair, cluster_ca[1], cert_path="agent.crt")

    assert str(caught.value) == (
        f"certificate agent.crt is not valid before {tomorrow.strftime('%Y-%m-%d %H:%M:%S UTC')}; "
        "check this host's clock or " + REISSUE
    )


def test_check_pair_rejects_expired_ca(cluster_ca: Pair, agent_pair: Pair) -> None:
    ca_end = _load(cluster_ca[1]).not_valid_after_utc

    with pytest.raises(TLSError) as caught:
        pki.check_pair(*agent_pair, cluster_ca[1], ca_path="ca.crt", now=ca_end)

    assert str(caught.value) == (
        f"CA certificate ca.crt expired on {ca_end.strftime('%Y-%m-%d %H:%M:%S UTC')}; "
        "create a new cluster CA and reissue every certificate"
    )


def test_check_pair_rejects_cert_without_identity(cluster_ca: Pair) -> None:
    key_pem, cert_pem = _sign_leaf(*cluster_ca, [x509.DNSName("host-1")])

    with pytest.raises(TLSError) as caught:
        pki.check_pair(key_pem, cert_pem, cluster_ca[1], cert_path="agent.crt")

    assert str(caught.value) == (
        "certificate agent.crt: certificate carries no quil-cluster identity (no quil:// URI SAN)"
    )


def test_check_pair_rejects_garbage_key(cluster_ca: Pair, agent_pair: Pair) -> None:
    with pytest.raises(TLSError) as caught:
        pki.check_pair(b"-----BEGIN PRIVATE KEY-----\nAAAA\n", agent_pair[1], cluster_ca[1], key_path="a.key")

    assert str(caught.value) == "private key a.key is not a valid PEM private key"


def test_check_pair_rejects_encrypted_key(cluster_ca: Pair, agent_pair: Pair) -> None:
    key = serialization.load_pem_private_key(agent_pair[0], password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )

    with pytest.raises(TLSError) as caught:
        pki.check_pair(encrypted, agent_pair[1], cluster_ca[1], key_path="agent.key")

    assert str(caught.value) == (
        "private key agent.key is encrypted; quil-cluster keys are stored without a password"
    )


# load_pem_files


def _write_bundle(directory: Path, ca_pem: bytes, pair: Pair) -> tuple[Path, Path, Path]:
    key_path, cert_path, ca_path = directory / "agent.key", directory / "agent.crt", directory / "ca.crt"
    pki.write_private(key_path, pair[0])
    pki.write_public(cert_path, pair[1])
    pki.write_public(ca_path, ca_pem)
    return key_path, cert_path, ca_path


def test_load_pem_files_returns_checked_bundle(
    tmp_path: Path,
    cluster_ca: Pair,
    agent_pair: Pair,
    caplog: pytest.LogCaptureFixture,
) -> None:
    paths = _write_bundle(tmp_path, cluster_ca[1], agent_pair)
    with caplog.at_level(logging.WARNING):
        loaded = pki.load_pem_files(*paths)

    assert loaded.identity == AGENT
    assert loaded.key_pem == agent_pair[0]
    assert loaded.cert_pem == agent_pair[1]
    assert loaded.ca_pem == cluster_ca[1]
    assert loaded.not_valid_after == _load(agent_pair[1]).not_valid_after_utc
    assert "PRIVATE KEY" not in repr(loaded)
    assert caplog.records == []


def test_load_pem_files_names_missing_file(tmp_path: Path, cluster_ca: Pair) -> None:
    missing = tmp_path / "agent.key"

    with pytest.raises(TLSError) as caught:
        pki.load_pem_files(missing, tmp_path / "agent.crt", tmp_path / "ca.crt")

    assert str(caught.value) == f"failed to read private key {missing}: No such file or directory"


def test_load_pem_files_names_expired_file(
    tmp_path: Path, cluster_ca: Pair, expired_agent_cert: Pair
) -> None:
    key_path, cert_path, ca_path = _write_bundle(tmp_path, cluster_ca[1], expired_agent_cert)

    with pytest.raises(TLSError) as caught:
        pki.load_pem_files(key_path, cert_path, ca_path)

    assert str(caught.value) == f"certificate {cert_path} expired on 2020-01-31 00:00:00 UTC; " + REISSUE


def test_load_pem_files_warns_on_readable_key(
    tmp_path: Path,
    cluster_ca: Pair,
    agent_pair: Pair,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key_path, cert_path, ca_path = _write_bundle(tmp_path, cluster_ca[1], agent_pair)
    key_path.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="quil_cluster.common.pki"):
        pki.load_pem_files(key_path, cert_path, ca_path)

    assert [record.getMessage() for record in caplog.records] == [
        f"exposed: private key {key_path} is readable by other users (mode 0640); run chmod 600 on it"
    ]


def test_load_pem_files_warns_near_expiry(
    tmp_path: Path,
    cluster_ca: Pair,
    agent_pair: Pair,
    caplog: pytest.LogCaptureFixture,
) -> None:
    paths = _write_bundle(tmp_path, cluster_ca[1], agent_pair)
    end = _load(agent_pair[1]).not_valid_after_utc
    ten_days_before_end = end - datetime.timedelta(days=10, hours=1)
    with caplog.at_level(logging.WARNING, logger="quil_cluster.common.pki"):
        pki.load_pem_files(*paths, now=ten_days_before_end)

    assert [record.getMessage() for record in caplog.records] == [
        f"expiring: certificate {paths[1]} identity=quil://alpha/agent/host-1 "
        f"(on {end.strftime('%Y-%m-%d %H:%M:%S UTC')}, in 10 days; {REISSUE})"
    ]


# spki_sha256


def test_spki_sha256_format_and_stable(cluster_ca: Pair) -> None:
    pin = pki.spki_sha256(cluster_ca[1])

    assert re.fullmatch(r"sha256:[0-9a-f]{64}", pin)
    assert pki.spki_sha256(cluster_ca[1]) == pin


def test_spki_sha256_differs_between_cas(cluster_ca: Pair) -> None:
    _, other_ca = pki.create_ca("alpha")

    assert pki.spki_sha256(cluster_ca[1]) != pki.spki_sha256(other_ca)


def test_spki_sha256_covers_key_not_certificate(cluster_ca: Pair) -> None:
    ca_key = serialization.load_pem_private_key(cluster_ca[0], password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    original = _load(cluster_ca[1])
    # A second self-signed certificate for the same key: other serial and dates.
    now = datetime.datetime.now(UTC)
    reissued = (
        x509.CertificateBuilder()
        .subject_name(original.subject)
        .issuer_name(original.subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(ca_key, hashes.SHA256())
    )
    reissued_pem = reissued.public_bytes(serialization.Encoding.PEM)
    certificate_digest = hashlib.sha256(original.public_bytes(serialization.Encoding.DER)).hexdigest()

    assert pki.spki_sha256(reissued_pem) == pki.spki_sha256(cluster_ca[1])
    assert pki.spki_sha256(cluster_ca[1]) != f"sha256:{certificate_digest}"


# write_private / write_public


def test_write_private_mode_0600_with_umask_0(tmp_path: Path, permissive_umask: None) -> None:
    path = tmp_path / "agent.key"
    pki.write_private(path, b"secret")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"secret"


def test_write_private_replaces_readable_file(tmp_path: Path, permissive_umask: None) -> None:
    path = tmp_path / "agent.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    pki.write_private(path, b"new")

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["agent.key"]


def test_write_public_mode_0644_with_strict_umask(tmp_path: Path) -> None:
    path = tmp_path / "ca.crt"
    previous = os.umask(0o077)
    try:
        pki.write_public(path, b"cert")
    finally:
        os.umask(previous)

    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_bytes() == b"cert"


def test_write_private_leaves_no_temp_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "agent.key"
    target.mkdir()

    with pytest.raises(OSError):
        pki.write_private(target, b"secret")

    assert sorted(os.listdir(tmp_path)) == ["agent.key"]
    assert target.is_dir()


def test_write_private_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        pki.write_private(tmp_path / "missing" / "agent.key", b"secret")
