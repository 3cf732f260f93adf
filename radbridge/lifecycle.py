"""Study and job states, one vocabulary for the edge and the center."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["CenterStudyState", "DeliveryState", "EdgeStudyState", "JobState"]


class EdgeStudyState(StrEnum):
    RECEIVING = "receiving"  # instances arriving; stable after the agreement's quiet period
    FORWARDING = "forwarding"  # claimed by the forwarder (reset to receiving on restart)
    FORWARDED = "forwarded"  # the center accepted every instance and the completion
    # Held at the edge; last_error says why: no legal basis in force now (retried when it is),
    # or de-identification refused / quarantined instances (burned-in annotation): a person.
    BLOCKED = "blocked"


class CenterStudyState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    # Retention (serving/retention.py): a purge is marked before any file goes, so a purge
    # cut short is found and finished; a fully purged study has no row left.
    PURGING_IMAGES = "purging-images"
    IMAGES_PURGED = "images-purged"
    PURGING = "purging"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(StrEnum):
    PENDING = "pending"  # waiting for (another) C-STORE attempt to the hospital PACS
    DELIVERED = "delivered"  # the PACS answered 0x0000
    DEAD = "dead"  # older than the maximum age or refused for good; needs a person (resend)
