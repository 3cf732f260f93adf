"""Routing: which model serves an instance, from the manifests (never hard-coded)."""

from __future__ import annotations

from models.manifest import ModelManifest, version_key

__all__ = ["route"]


def route(
    manifests: dict[str, ModelManifest], modality: str | None, body_part: str | None
) -> str | None:
    """The key of the newest model serving ``modality`` (and ``body_part`` when given)."""
    candidates = []
    for key, m in manifests.items():
        if modality not in m.modalities:
            continue
        if body_part and m.body_parts and body_part.upper() not in m.body_parts:
            continue
        candidates.append((m.name, version_key(m.version), key))
    if not candidates:
        return None
    return sorted(candidates)[-1][2]
