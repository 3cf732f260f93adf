"""The embedded default's throwaway identity: keys and trust files under the data directory.

In local mode (`radbridge up`, `radbridge center`, `radbridge gateway` on one machine) every
credential is real: the edge's request-signing key, the center's trust file, the operator and
integration secrets, the center's result-signing key and the public keys the edge trusts, the
local CA and the center's TLS certificate (radbridge.pki). They are made here on first start
(keys mode 0600), so every run and every test goes through real signatures and a checked HTTPS
connection. Outside local mode nothing is made: the files are given (docs/kubernetes.md).
"""

from __future__ import annotations

from radbridge.agreements import load_agreements
from radbridge.auth import ensure_local_identity
from radbridge.pki import ensure_local_tls
from radbridge.settings import Settings
from radbridge.signing import ensure_local_signing

__all__ = ["prepare_local_identity"]


def prepare_local_identity(settings: Settings) -> None:
    """Create what is missing of the local identity; a no-op outside local mode."""
    if settings.mode != "local":
        return
    agreements = [a.id for a in load_agreements(settings.agreements_file).agreements]
    ensure_local_identity(
        settings.edge_key_file, settings.center_trust_file, settings.edge.id, agreements
    )
    ensure_local_signing(settings.center_signing_key_file, settings.edge_center_keys_file)
    tls, keys = settings.center.tls, settings.data_dir / "keys"
    if tls is not None and tls.cert_file == keys / "center-tls.pem":  # the derived default
        ensure_local_tls(keys / "local-ca.pem", tls.cert_file, tls.key_file)
