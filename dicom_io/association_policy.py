"""Which agreement an A-ASSOCIATE-RQ belongs to, or why the edge refuses it (PS3.8 9.3.4).

The association is accepted only from a calling AE title owned by an active agreement, a source
address that agreement allows, the called AE title the hospital must use, over TLS with a known
client certificate when the agreement requires it, and within the hospital's association limit.
Otherwise A-ASSOCIATE-RJ with the standard result/source/reason (PS3.8 7.1.1.9):

| check | result, source, reason |
|---|---|
| calling AE title unknown or its agreement inactive | 1, 1, 3 calling AE not recognized |
| called AE title not the hospital's | 1, 1, 7 called AE not recognized |
| source address, TLS required, client certificate | 1, 1, 1 no reason given |
| hospital's max_associations reached | 2, 3, 2 local limit exceeded |
| edge.max_associations reached | 2, 3, 2 local limit exceeded |
| application context not DICOM's | 1, 1, 2 application context name not supported |

The first five rows are :func:`admit`'s; the edge-wide limit and the application context are
checked by the SCP (``dicom_io.scp``), which owns the socket and the edge-wide count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dicom_io.association_counts import AssociationCounts
from dicom_io.upper_layer import AssociateRequest
from radbridge.agreements import Agreement, AgreementSet

__all__ = ["Peer", "Refusal", "admit"]

log = logging.getLogger("radbridge.edge.scp")

REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02
SERVICE_USER, SERVICE_PROVIDER_PRESENTATION = 0x01, 0x03
NO_REASON, APPLICATION_CONTEXT_NOT_SUPPORTED = 0x01, 0x02
CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED = 0x03, 0x07
LOCAL_LIMIT_EXCEEDED = 0x02


@dataclass(frozen=True)
class Refusal:
    """An A-ASSOCIATE-RJ's fields, and the reason's metric label."""

    reason: str
    result: int
    source: int
    diagnostic: int


@dataclass(frozen=True)
class Peer:
    """What the transport says of the requestor."""

    address: str
    tls: bool
    common_name: str | None  # the TLS client certificate's subject CN


def admit(
    request: AssociateRequest,
    peer: Peer,
    agreements: AgreementSet,
    edge_ae_title: str,
    counts: AssociationCounts,
) -> Agreement | Refusal:
    """The agreement whose association this is (counted open in ``counts``), or why not."""
    agreement = agreements.for_calling_ae(request.calling_ae)
    if agreement is None:
        log.warning(
            "association rejected: calling AE %r has no active agreement", request.calling_ae
        )
        return Refusal("calling_ae", REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNIZED)
    hospital = agreement.hospital
    if request.called_ae != (hospital.called_ae_title or edge_ae_title):
        log.warning("association rejected: wrong called AE for agreement %s", agreement.id)
        return Refusal("called_ae", REJECTED_PERMANENT, SERVICE_USER, CALLED_AE_NOT_RECOGNIZED)
    if not hospital.allows_ip(peer.address):
        log.warning(
            "association rejected: %s is not an allowed source for agreement %s",
            peer.address,
            agreement.id,
        )
        return Refusal("source_ip", REJECTED_PERMANENT, SERVICE_USER, NO_REASON)
    if hospital.require_tls and not peer.tls:
        log.warning("association rejected: agreement %s requires DICOM TLS", agreement.id)
        return Refusal("tls_required", REJECTED_PERMANENT, SERVICE_USER, NO_REASON)
    if peer.tls and hospital.tls_client_names and peer.common_name not in hospital.tls_client_names:
        log.warning(
            "association rejected: client certificate not allowed for agreement %s", agreement.id
        )
        return Refusal("client_cert", REJECTED_PERMANENT, SERVICE_USER, NO_REASON)
    if not counts.open(agreement.id, hospital.max_associations):
        log.warning("association rejected: agreement %s at its association limit", agreement.id)
        return Refusal(
            "agreement_limit",
            REJECTED_TRANSIENT,
            SERVICE_PROVIDER_PRESENTATION,
            LOCAL_LIMIT_EXCEEDED,
        )
    return agreement
