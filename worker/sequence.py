"""A sequence's life inside one worker: tokens, progress, blocks and status.

Plain Python (no torch): the scheduler and the block manager work on these.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from worker.vocab.sampling_params import SamplingParams


class SequenceStatus(enum.IntEnum):
    """Ordered lifecycle; everything >= FINISHED_STOPPED is final."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    MIGRATING = 3
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12
    FINISHED_ERROR = 13
    FINISHED_MIGRATED = 14  # handed to another worker; the stream continues there

    @property
    def is_finished(self) -> bool:
        return self >= SequenceStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
    SequenceStatus.FINISHED_ERROR: "error",
    SequenceStatus.FINISHED_MIGRATED: "migrated",
}


@dataclass(slots=True, eq=False)
class Sequence:
    """One request. `token_ids` holds prompt + output; positions are indices into it.

    num_computed_tokens: tokens whose KV is in the cache (prefix hits included).
    block_tables: one list of block ids per KV group; -1 marks a sliding-window block
        that has left the window and was given back.
    slot: the row of the sampler's per-sequence state while running, else None.
    """

    seq_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    arrival: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    block_tables: list[list[int]] = field(default_factory=list)
    slot: int | None = None
    error: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    queue_time_s: float | None = None  # arrival to its first step, once it had one

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens
