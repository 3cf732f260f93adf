"""DICOM TLS (PS3.15 B.1, BCP 195): the server context of the edge's TLS port."""

from __future__ import annotations

import ssl

from radbridge.errors import ConfigError
from radbridge.settings import EdgeTLS

__all__ = ["server_context"]


def server_context(tls: EdgeTLS) -> ssl.SSLContext:
    """A TLS >= 1.2 server context with the gateway's certificate and the hospitals' CA.

    With ``require_client_cert`` (the default) a client must present a certificate the CA
    signed; which certificate names an agreement accepts is checked per association.
    Raises ``ConfigError`` naming the setting when a file is missing or unusable.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"edge.tls.cert_file/key_file: cannot load {tls.cert_file}: {exc}"
        ) from None
    try:
        ctx.load_verify_locations(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"edge.tls.ca_file: cannot load {tls.ca_file}: {exc}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx
