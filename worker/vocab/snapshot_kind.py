"""What a snapshot carries (torch-free, so the router can name it)."""

from __future__ import annotations

import enum


class SnapshotKind(enum.IntEnum):
    FULL = 1  # tokens, state and every layer's KV: resumes without recomputation
    SWA_ONLY = 2  # only the sliding-window layers' KV (checkpoints)
    TOKENS_ONLY = 3  # tokens and state; the importer recomputes the KV
