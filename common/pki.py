"""The cluster CA, the certificates it issues and the identity in each.

The coordinator creates one ECDSA P-256 CA per cluster and issues every peer
a leaf certificate. A leaf carries exactly one URI SAN,
quil://CLUSTER/ROLE/NAME, and that URI is the peer's identity: gRPC accepts
any certificate the CA signed, and the servers then authorize by role
(common/tls.py). The CA certificate itself carries no identity.

Private keys are PEM (PKCS#8) without a password. Their files are created
with mode 0600, so only the owner of the file can read them.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import TLSError
from .files import write_atomic

__all__ = [
    "ROLES",
    "CA_DAYS",
    "LEAF_DAYS",
    "EXPIRY_WARNING_DAYS",
    "Identity",
    "PemFiles",
    "parse_uri",
    "create_ca",
    "issue",
    "identity_from_cert_pem",
    "check_pair",
    "load_pem_files",
    "spki_sha256",
    "write_private",
    "write_public",
]

logger = logging.getLogger(__name__)

ROLES = ("coordinator", "agent", "observer")
# Validity of a new cluster CA, in days.
CA_DAYS = 3650
# Validity of a new leaf certificate, in days.
LEAF_DAYS = 365
# load_pem_files logs a warning when the certificate expires within this many days.
EXPIRY_WARNING_DAYS = 30
# A new certificate starts this long before now, so that a host whose clock is a few
# minutes behind the coordinator's still accepts it.
CLOCK_SKEW = datetime.timedelta(minutes=5)

SCHEME = "quil"
# Cluster and host names: 1 to 63 ASCII letters, digits, '.', '_' or '-', starting
# with a letter or digit. They never contain '/', ':', '@', '?' or '#', so a URI
# built from them has no port, user info, query or fragment.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# A DNS host name: dot-separated labels of letters, digits and inner hyphens (RFC 1123).
# Underscores are accepted as well, because host names in identities may contain them.
_DNS_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_PATTERN = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_REISSUE_HINT = "reissue it with quil-coord host add / rotate"


def _name_problem(kind: str, value: str) -> str | None:
    """Return why value is not a valid cluster or host name, or None when it is."""
    if _NAME_PATTERN.fullmatch(value):
        return None
    return (
        f"{kind} {value!r} is invalid: use 1 to 63 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    )


def _identity_problem(cluster: str, role: str, name: str) -> str | None:
    """Return why the three parts do not form an identity, or None when they do."""
    problem = _name_problem("cluster name", cluster)
    if problem is None and role not in ROLES:
        problem = f"role {role!r} is invalid: expected one of {', '.join(ROLES)}"
    if problem is None:
        problem = _name_problem("host name", name)
    return problem


@dataclass(frozen=True)
class Identity:
    """The cluster, role and host name that a certificate's URI SAN states."""

    cluster: str
    role: str
    name: str

    def __post_init__(self) -> None:
        problem = _identity_problem(self.cluster, self.role, self.name)
        if problem is not None:
            raise TLSError(f"invalid identity: {problem}")

    @property
    def uri(self) -> str:
        """The URI SAN form, quil://CLUSTER/ROLE/NAME."""
        return f"{SCHEME}://{self.cluster}/{self.role}/{self.name}"

    @classmethod
    def parse_uri(cls, uri: str) -> Identity:
        """Parse quil://CLUSTER/ROLE/NAME; raise TLSError on any other form."""
        prefix = f"{SCHEME}://"
        if not uri.startswith(prefix):
            raise TLSError(f"invalid identity URI {uri!r}: expected {prefix}CLUSTER/ROLE/NAME")
        parts = uri[len(prefix) :].split("/")
        if len(parts) != 3:
            raise TLSError(f"invalid identity URI {uri!r}: expected {prefix}CLUSTER/ROLE/NAME")

        cluster, role, name = parts
        problem = _identity_problem(cluster, role, name)
        if problem is not None:
            raise TLSError(f"invalid identity URI {uri!r}: {problem}")
        return cls(cluster, role, name)


def parse_uri(uri: str) -> Identity:
    """Parse quil://CLUSTER/ROLE/NAME; raise TLSError on any other form."""
    return Identity.parse_uri(uri)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_days(days: int) -> None:
    if days < 1:
        raise ValueError(f"validity must be at least 1 day, got {days}")


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def create_ca(cluster: str, *, days: int = CA_DAYS) -> tuple[bytes, bytes]:
    """Create the self-signed cluster CA and return (key_pem, cert_pem).

    The CA may sign leaf certificates only (pathlen 0). Raises TLSError for an
    invalid cluster name and ValueError when days is below 1.
    """
    problem = _name_problem("cluster name", cluster)
    if problem is not None:
        raise TLSError(problem)
    _check_days(days)

    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"quil-cluster {cluster} CA")])
    now = _utc_now()
    key_usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _key_to_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def _load_cert(cert_pem: bytes, label: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as err:
        raise TLSError(f"{label} is not a valid PEM certificate ({err})") from err


def _load_key(key_pem: bytes, label: str) -> ec.EllipticCurvePrivateKey:
    # The messages leave out the library's error text so that no part of the key
    # can end up in a log.
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as err:
        raise TLSError(f"{label} is encrypted; quil-cluster keys are stored without a password") from err
    except ValueError as err:
        raise TLSError(f"{label} is not a valid PEM private key") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSError(f"{label} is not an ECDSA key")
    return key


def _load_ca(ca_key_pem: bytes, ca_cert_pem: bytes) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Load the CA pair and check that it can sign leaf certificates now."""
    ca_key = _load_key(ca_key_pem, "CA private key")
    ca_cert = _load_cert(ca_cert_pem, "CA certificate")
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise TLSError("CA certificate is not a CA (basicConstraints CA:true is missing)")
    if ca_key.public_key() != ca_cert.public_key():
        raise TLSError("CA private key does not match the CA certificate")
    if ca_cert.not_valid_after_utc <= _utc_now():
        raise TLSError(
            f"CA certificate expired on {_format_time(ca_cert.not_valid_after_utc)}; "
            "create a new cluster CA and reissue every certificate"
        )
    return ca_key, ca_cert


def issue(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    identity: Identity,
    *,
    ip_addresses: Iterable[str] = (),
    dns_names: Iterable[str] = (),
    days: int = LEAF_DAYS,
    not_before: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """Create a key and a leaf certificate for identity signed by the CA; return (key_pem, cert_pem).

    The certificate is valid for days from not_before. Without not_before it runs
    from CLOCK_SKEW before now until days after now. It serves as both TLS
    server and TLS client certificate. An agent's certificate needs
    the IP address the coordinator dials in ip_addresses and its host name in
    dns_names, because gRPC clients check the address they dial against these SANs.
    When the CA expires first, the certificate ends with the CA and a warning is
    logged. Raises TLSError for an unusable CA, IP address or DNS name, and
    ValueError when days is below 1 or not_before has no time zone.
    """
    key = _new_key()
    cert_pem = _sign(ca_key_pem, ca_cert_pem, identity, key.public_key(), ip_addresses=ip_addresses,
                     dns_names=dns_names, days=days, not_before=not_before)
    return _key_to_pem(key), cert_pem


def make_csr(common_name: str) -> tuple[bytes, bytes]:
    """Create a private key and a certificate signing request for it; return (key_pem, csr_pem).

    The request carries only a common name: the CA decides every name and
    role of the certificate itself.
    """
    key = _new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "agent")]))
        .sign(key, hashes.SHA256())
    )
    return _key_to_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def sign_csr(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    csr_pem: bytes,
    identity: Identity,
    *,
    ip_addresses: Iterable[str] = (),
    dns_names: Iterable[str] = (),
    days: int = LEAF_DAYS,
) -> bytes:
    """Issue a certificate for the public key of a signing request; return cert_pem.

    Only the key is taken from the request, after its self-signature is
    checked; every name in the request is ignored. Raises TLSError for a
    request that does not parse, is not self-signed, or contains no P-256 key.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as err:
        raise TLSError("certificate signing request does not parse as PEM") from err
    if not csr.is_signature_valid:
        raise TLSError("certificate signing request has an invalid signature")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
        raise TLSError("certificate signing request must hold an ECDSA P-256 key")
    return _sign(ca_key_pem, ca_cert_pem, identity, public_key, ip_addresses=ip_addresses, dns_names=dns_names,
                 days=days, not_before=None)


def _sign(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    identity: Identity,
    public_key: ec.EllipticCurvePublicKey,
    *,
    ip_addresses: Iterable[str],
    dns_names: Iterable[str],
    days: int,
    not_before: datetime.datetime | None,
) -> bytes:
    _check_days(days)
    ca_key, ca_cert = _load_ca(ca_key_pem, ca_cert_pem)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    names += [x509.IPAddress(_parse_ip(address)) for address in ip_addresses]
    names += [x509.DNSName(_check_dns_name(name)) for name in dns_names]

    if not_before is None:
        start = _utc_now()
        valid_from = start - CLOCK_SKEW
    elif not_before.tzinfo is None:
        raise ValueError("not_before must be timezone-aware")
    else:
        start = valid_from = not_before
    valid_until = start + datetime.timedelta(days=days)
    if valid_until > ca_cert.not_valid_after_utc:
        valid_until = ca_cert.not_valid_after_utc
        logger.warning(
            "shortened: certificate %s (ends with the CA on %s)", identity.uri, _format_time(valid_until)
        )

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_until)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _parse_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(address)
    except ValueError as err:
        raise TLSError(f"invalid IP address {address!r} for the certificate") from err


def _check_dns_name(name: str) -> str:
    if len(name) > 253 or not _DNS_PATTERN.fullmatch(name):
        raise TLSError(
            f"invalid DNS name {name!r} for the certificate: "
            "use dot-separated labels of letters, digits, '_' and inner '-'"
        )
    return name


def identity_from_cert_pem(cert_pem: bytes) -> Identity:
    """Return the identity in the certificate's quil:// URI SAN.

    Raises TLSError unless the certificate parses and carries exactly one quil://
    URI SAN that is a valid identity. URI SANs of other schemes are ignored.
    """
    cert = _load_cert(cert_pem, "certificate")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as err:
        raise TLSError("certificate carries no quil-cluster identity (it has no subjectAltName)") from err

    uris = [
        uri
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.lower().startswith(f"{SCHEME}:")
    ]
    if not uris:
        raise TLSError("certificate carries no quil-cluster identity (no quil:// URI SAN)")
    if len(uris) > 1:
        raise TLSError(f"certificate carries {len(uris)} quil:// URI SANs; expected exactly one")
    return Identity.parse_uri(uris[0])


def _format_time(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def check_pair(
    key_pem: bytes,
    cert_pem: bytes,
    ca_cert_pem: bytes,
    *,
    key_path: str | os.PathLike[str] | None = None,
    cert_path: str | os.PathLike[str] | None = None,
    ca_path: str | os.PathLike[str] | None = None,
    now: datetime.datetime | None = None,
) -> Identity:
    """Check that a key and certificate can be used with the cluster CA; return the identity.

    The certificate must be signed by the CA, be valid at now (default: the
    current time), carry a quil:// identity, and match the key. The CA
    certificate must be valid at now too. Each TLSError names the file from the
    *_path arguments when they are given.
    """
    key_label = _label("private key", key_path)
    cert_label = _label("certificate", cert_path)
    ca_label = _label("CA certificate", ca_path)
    moment = now if now is not None else _utc_now()

    cert = _load_cert(cert_pem, cert_label)
    key = _load_key(key_pem, key_label)
    ca_cert = _issuer_in_bundle(cert, ca_cert_pem, cert_label, ca_label)
    _check_validity(ca_cert, ca_label, moment, "create a new cluster CA and reissue every certificate")
    _check_validity(cert, cert_label, moment, _REISSUE_HINT)
    if key.public_key() != cert.public_key():
        raise TLSError(f"{key_label} does not match the public key in {cert_label}")

    try:
        return identity_from_cert_pem(cert_pem)
    except TLSError as err:
        raise TLSError(f"{cert_label}: {err}") from err


def _issuer_in_bundle(cert: x509.Certificate, ca_pem: bytes, cert_label: str, ca_label: str) -> x509.Certificate:
    """Return the CA of the bundle that issued cert; a bundle contains two CAs while the CA is rotated."""
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as err:
        raise TLSError(f"{ca_label} is not a valid PEM certificate ({err})") from err
    for ca_cert in cas[:-1]:
        try:
            _check_issued_by(cert, ca_cert, cert_label, ca_label)
            return ca_cert
        except TLSError:
            continue
    _check_issued_by(cert, cas[-1], cert_label, ca_label)
    return cas[-1]


def split_bundle(bundle_pem: bytes) -> list[bytes]:
    """Split a PEM bundle into its certificates, each as PEM."""
    return [c.public_bytes(serialization.Encoding.PEM) for c in x509.load_pem_x509_certificates(bundle_pem)]


def _label(kind: str, path: str | os.PathLike[str] | None) -> str:
    return kind if path is None else f"{kind} {os.fspath(path)}"


def _check_issued_by(
    cert: x509.Certificate, ca_cert: x509.Certificate, cert_label: str, ca_label: str
) -> None:
    # verify_directly_issued_by checks the issuer name and then the signature. A
    # certificate from a CA with the same name, such as a second CA created for
    # the same cluster, fails only the signature check.
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise TLSError(
            f"{cert_label} was not issued by {ca_label} (its issuer is {cert.issuer.rfc4514_string()}); "
            f"check the path or {_REISSUE_HINT}"
        ) from err


def _check_validity(cert: x509.Certificate, label: str, moment: datetime.datetime, hint: str) -> None:
    if moment >= cert.not_valid_after_utc:
        raise TLSError(f"{label} expired on {_format_time(cert.not_valid_after_utc)}; {hint}")
    if moment < cert.not_valid_before_utc:
        raise TLSError(
            f"{label} is not valid before {_format_time(cert.not_valid_before_utc)}; "
            f"check this host's clock or {hint}"
        )


@dataclass(frozen=True)
class PemFiles:
    """A checked key, certificate and CA certificate, as PEM, with the certificate's identity."""

    # repr=False keeps the private key out of reprs, tracebacks and logs.
    key_pem: bytes = field(repr=False)
    cert_pem: bytes
    ca_pem: bytes
    identity: Identity
    not_valid_after: datetime.datetime


def load_pem_files(
    key_path: str | os.PathLike[str],
    cert_path: str | os.PathLike[str],
    ca_path: str | os.PathLike[str],
    *,
    now: datetime.datetime | None = None,
) -> PemFiles:
    """Read a key, certificate and CA certificate and check them with check_pair.

    Logs a warning when the key file is readable by group or others, or when the
    certificate expires within EXPIRY_WARNING_DAYS. Raises TLSError naming the file
    when a file cannot be read or the check fails.
    """
    key_pem = _read("private key", key_path)
    cert_pem = _read("certificate", cert_path)
    ca_pem = _read("CA certificate", ca_path)
    identity = check_pair(
        key_pem, cert_pem, ca_pem, key_path=key_path, cert_path=cert_path, ca_path=ca_path, now=now
    )

    _warn_if_key_exposed(key_path)
    loaded = x509.load_pem_x509_certificate(cert_pem)
    not_valid_after = loaded.not_valid_after_utc
    moment = now if now is not None else _utc_now()
    days_left = (not_valid_after - moment).days
    # Short-lived certificates are renewed when a third of their life is left,
    # so only a quarter left means renewal is failing.
    lifetime = not_valid_after - loaded.not_valid_before_utc
    if not_valid_after - moment < min(datetime.timedelta(days=EXPIRY_WARNING_DAYS), lifetime / 4):
        logger.warning(
            "expiring: certificate %s identity=%s (on %s, in %d days; %s)",
            os.fspath(cert_path),
            identity.uri,
            _format_time(not_valid_after),
            days_left,
            _REISSUE_HINT,
        )
    return PemFiles(key_pem, cert_pem, ca_pem, identity, not_valid_after)


def _read(kind: str, path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise TLSError(f"failed to read {kind} {os.fspath(path)}: {err.strerror}") from err


def _warn_if_key_exposed(key_path: str | os.PathLike[str]) -> None:
    mode = stat.S_IMODE(os.stat(key_path).st_mode)
    if mode & 0o077:
        logger.warning(
            "exposed: private key %s is readable by other users (mode %04o); run chmod 600 on it",
            os.fspath(key_path),
            mode,
        )


def spki_sha256(cert_pem: bytes) -> str:
    """Return 'sha256:' and the hex SHA-256 of the certificate's SubjectPublicKeyInfo (DER).

    The value stays the same when a certificate is reissued for the same key, so it
    can pin the cluster CA.
    """
    cert = _load_cert(cert_pem, "certificate")
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"sha256:{hashlib.sha256(spki).hexdigest()}"


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a secret file atomically with mode 0600, whatever the umask.

    Raises OSError when the directory is not writable.
    """
    write_atomic(Path(path), data, mode=0o600)


def write_public(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a file atomically with mode 0644, whatever the umask.

    Raises OSError when the directory is not writable.
    """
    write_atomic(Path(path), data, mode=0o644)


def serial_hex(cert_pem: bytes) -> str:
    """Return the certificate's serial number as lower-case hex, the form revocation lists use."""
    return format(_load_cert(cert_pem, "certificate").serial_number, "x")


def not_after(cert_pem: bytes) -> float:
    """Return the certificate's expiry as Unix time in seconds."""
    return _load_cert(cert_pem, "certificate").not_valid_after_utc.timestamp()


def issued_by(cert_pem: bytes, ca_pem: bytes) -> bool:
    """Return whether the CA certificate signed the certificate."""
    try:
        _check_issued_by(_load_cert(cert_pem, "certificate"), _load_cert(ca_pem, "CA certificate"), "", "")
    except TLSError:
        return False
    return True
