"""The embedded default's TLS: a throwaway local CA and the center's server certificate.

In local mode the center serves HTTPS like a production one, so the edge's client, the tests
and the intruder suite all go through a real TLS handshake and a real certificate check. The
CA's private key signs the center's certificate once and is then dropped: nothing can issue a
second certificate this edge would trust. Files (under data_dir/keys, keys mode 0600):
``local-ca.pem`` (what the edge trusts), ``center-tls.pem`` and ``center-tls.key``.
A certificate that expires within ``RENEW_BEFORE`` is made anew with a new CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from radbridge.errors import ConfigError
from radbridge.files import write_atomic

__all__ = ["RENEW_BEFORE", "check_server_files", "ensure_local_tls"]

VALID_FOR = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=7)
# Valid from a day before they are made: an edge whose clock lags (or stepped back an hour)
# still accepts the center's certificate, as it would one a real CA issued days before.
BACKDATED = dt.timedelta(days=1)
SERVER_NAMES = ("localhost",)
SERVER_ADDRESSES = ("127.0.0.1", "::1")


def ensure_local_tls(ca_file: Path, cert_file: Path, key_file: Path) -> None:
    """Create the CA certificate, the center's certificate and key where missing or expiring."""
    if _usable(ca_file, cert_file, key_file):
        return
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "radbridge local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATED)
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in SERVER_ADDRESSES]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "radbridge center")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATED)
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    write_atomic(
        key_file,
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    write_atomic(cert_file, cert.public_bytes(pem) + ca_cert.public_bytes(pem), mode=0o644)
    write_atomic(ca_file, ca_cert.public_bytes(pem), mode=0o644)


def certificate_expiry(cert_file: Path) -> float:
    """When the (first) certificate of a PEM file expires, as a Unix time; for the
    ``*_certificate_expiry_timestamp_seconds`` gauges and their alerts."""
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cert_file}: not a usable PEM certificate ({exc})") from None
    return cert.not_valid_after_utc.timestamp()


def check_server_files(cert_file: Path, key_file: Path, field: str = "center.tls") -> None:
    """Raise ``ConfigError`` naming ``field`` unless the pair loads as a TLS server identity."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(certfile=cert_file, keyfile=key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{field}.cert_file/key_file: cannot load {cert_file} with {key_file}: {exc}"
        ) from None


def _usable(ca_file: Path, cert_file: Path, key_file: Path) -> bool:
    if not (ca_file.exists() and cert_file.exists() and key_file.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        x509.load_pem_x509_certificate(ca_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cert_file}: not a usable PEM certificate ({exc})") from None
    return cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > RENEW_BEFORE
