"""Local TLS material for a homelab: a private CA and a server certificate.

Tailscale clients insist on TLS to DERP nodes (PROTOCOL.md 5.8). Two ways to
make them trust homescale without a public certificate:

* a CA the clients trust (``SSL_CERT_FILE`` for Go on Linux), signing a leaf
  whose SANs name the server (an IP literal needs an IP SAN); or
* pinning: the DERPMap node's ``CertName = "sha256-raw:<hex>"`` (net/tlsdial
  SetConfigExpectedCertHash). The client then accepts exactly one presented
  certificate, the one whose DER hashes to that value, valid for HostName and
  today. So in pin mode the listener must present the leaf alone, no chain.

Files are written once (never overwritten) with 0600 keys.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .store import STATE_DIR_MODE


class TLSCertError(Exception):
    """Certificate material cannot be created or read; the message names the file."""


# Apple and browsers cap leaf lifetimes at 398 days; Go does not, but a homelab
# cert that also works in a browser is less surprising.
LEAF_DAYS = 397
CA_DAYS = 3650
# Go rejects certificates that are not valid yet; tolerate a little clock skew.
_BACKDATE = dt.timedelta(hours=1)


@dataclass(frozen=True)
class CertPaths:
    """Where ``generate_local_tls`` put things."""

    ca_cert: Path | None
    ca_key: Path | None
    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _san_list(hosts: Iterable[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for h in hosts:
        h = h.strip().strip("[]")
        if not h:
            continue
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    if not sans:
        raise TLSCertError("a server certificate needs at least one host name or IP address")
    return sans


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively with ``mode``: never clobber existing material."""
    path.parent.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise TLSCertError(f"{path} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # in case the umask narrowed or widened it


def make_ca(common_name: str = "homescale local CA") -> tuple[bytes, bytes]:
    """A self-signed CA: (cert PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make_server_cert(
    hosts: Iterable[str],
    *,
    ca_cert_pem: bytes | None = None,
    ca_key_pem: bytes | None = None,
    days: int = LEAF_DAYS,
) -> tuple[bytes, bytes]:
    """A server leaf for ``hosts`` (names and IPs): (cert PEM, key PEM).

    Without a CA the leaf is self-signed, which is what ``CertName`` pinning wants.
    """
    hosts = list(hosts)
    sans = _san_list(hosts)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0].strip("[]"))])
    if ca_cert_pem is not None and ca_key_pem is not None:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        loaded = serialization.load_pem_private_key(ca_key_pem, password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise TLSCertError("the CA key must be an EC key made by homescale")
        issuer, signer = ca_cert.subject, loaded
    else:
        ca_cert, issuer, signer = None, subject, key
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if ca_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    cert = builder.sign(signer, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def generate_local_tls(
    directory: str | os.PathLike[str],
    hosts: Iterable[str],
    *,
    with_ca: bool = True,
) -> CertPaths:
    """Write ``ca.pem``/``ca.key`` (if ``with_ca``) and ``server.pem``/``server.key``.

    Never overwrites: if any target exists, nothing is written and
    ``TLSCertError`` names the file (checked up front so no half set is left).
    """
    d = Path(directory)
    paths = CertPaths(
        ca_cert=d / "ca.pem" if with_ca else None,
        ca_key=d / "ca.key" if with_ca else None,
        cert=d / "server.pem",
        key=d / "server.key",
    )
    for p in (paths.ca_cert, paths.ca_key, paths.cert, paths.key):
        if p is not None and p.exists():
            raise TLSCertError(f"{p} already exists; refusing to overwrite it")
    if with_ca:
        assert paths.ca_cert is not None
        assert paths.ca_key is not None
        ca_pem, ca_key = make_ca()
        cert_pem, key_pem = make_server_cert(hosts, ca_cert_pem=ca_pem, ca_key_pem=ca_key)
        _write_new(paths.ca_key, ca_key, 0o600)
        _write_new(paths.ca_cert, ca_pem, 0o644)
    else:
        cert_pem, key_pem = make_server_cert(hosts)
    _write_new(paths.key, key_pem, 0o600)
    _write_new(paths.cert, cert_pem, 0o644)
    return paths


def ensure_pinned_cert(cert: Path, key: Path, hosts: Iterable[str]) -> bool:
    """Create a self-signed leaf at `cert`/`key` when both are missing (first start of
    the shipped config); True if it did. Clients pin it (`cert_name_pin`), so no CA.
    One file without the other is left for the admin to sort out (TLSCertError)."""
    if cert.exists() and key.exists():
        return False
    if cert.exists() or key.exists():
        missing = key if cert.exists() else cert
        raise TLSCertError(f"{missing} is missing (its pair exists); restore it or remove both")
    cert_pem, key_pem = make_server_cert(hosts)
    _write_new(key, key_pem, 0o600)
    _write_new(cert, cert_pem, 0o644)
    return True


def cert_name_pin(cert_pem: bytes) -> str:
    """``DERPNode.CertName`` pinning ``cert_pem``'s first certificate.

    net/tlsdial SetConfigExpectedCertHash compares ``%02x`` of
    sha256(cert.Raw), i.e. lowercase hex of the SHA-256 of the DER encoding
    (cmd/derper/cert.go builds CertName the same way).
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise TLSCertError(f"not a PEM certificate: {e}") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    return "sha256-raw:" + hashlib.sha256(der).hexdigest()
