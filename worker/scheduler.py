"""Continuous batching with chunked prefill under a token budget.

Plain Python, no torch (tested to import without it). The engine calls
`schedule()` → hands the `SchedulerOutput` to the model runner → `update()` with the
sampled token ids. Running sequences are served oldest first; when the KV pool is full
the youngest running sequence is preempted back to the front of the queue (its blocks
freed, recomputed later), so pressure never fails every sequence at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from worker.block_manager import BlockManager, cdiv
from worker.config import SchedulerConfig
from worker.sequence import Sequence, SequenceStatus
from worker.vocab.errors import CapacityError


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """Compute num_new_tokens tokens of seq, starting at seq.num_computed_tokens."""

    seq: Sequence
    num_new_tokens: int
    start: int  # seq.num_computed_tokens when scheduled

    @property
    def is_sampling(self) -> bool:
        """The chunk reaches the last token, so the step samples the next one."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # took a slot this step
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One sampled token appended to seq; `finished` when it ended the sequence."""

    seq: Sequence
    token_id: int
    finished: bool


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # exported for migration: no slot, blocks kept until the target confirms
        self.paused: dict[str, Sequence] = {}
        self.free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0
        # prefix-cache effectiveness, counted once per admission (vLLM counts tokens too)
        self.num_prefix_query_tokens = 0
        self.num_prefix_hit_tokens = 0

    # -- intake ----------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a validated sequence. Raises CapacityError if it can never fit."""
        self.check_capacity(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def check_capacity(self, seq: Sequence) -> None:
        """CapacityError when the queue is full or the sequence can never fit the pool."""
        # waiting sequences that free slots will take at the next step are not "queued"
        if len(self.waiting) - len(self.free_slots) >= self.config.max_waiting:
            raise CapacityError(f"queue full: {len(self.waiting)} requests waiting for "
                                f"{self.config.max_num_seqs} slots "
                                f"(max_waiting={self.config.max_waiting})")
        max_len = min(seq.num_prompt_tokens + seq.params.max_tokens, self.max_model_len)
        need = cdiv(max_len, self.block_manager.block_size)
        for pool, total in zip(self.block_manager.pools, self.block_manager.num_total_blocks,
                               strict=True):
            if not pool.trims and need > total:
                raise CapacityError(
                    f"prompt + max_tokens needs {need} KV blocks; the pool has {total}"
                )

    def get(self, seq_id: str) -> Sequence | None:
        if seq_id in self.paused:
            return self.paused[seq_id]
        for seq in self.running:
            if seq.seq_id == seq_id:
                return seq
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                return seq
        return None

    # -- the step ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            self.block_manager.trim_window(seq)
            while not self.block_manager.can_allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    return budget
            self.block_manager.allocate(seq, num_new)
            out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens))
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and self.free_slots:
            seq = self.waiting[0]
            # a resumed or imported sequence already holds its computed KV
            hit = (seq.num_computed_tokens if seq.block_tables
                   else self.block_manager.find_prefix_hit(seq))
            num_new = min(seq.num_tokens - hit, budget)
            if not self.block_manager.can_allocate(seq, num_new, hit):
                return
            self.waiting.popleft()
            self.num_prefix_query_tokens += seq.num_tokens
            self.num_prefix_hit_tokens += hit
            self.block_manager.allocate(seq, num_new, hit)
            seq.slot = self.free_slots.pop()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.admitted.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens))
            budget -= num_new

    def _preempt(self, seq: Sequence) -> None:
        """Back to the front of the queue; its KV is recomputed on re-admission."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def pause(self, seq: Sequence) -> None:
        """Take a sequence out of scheduling for an export (at a step boundary). It keeps
        its blocks, so `resume` continues without recomputation; its slot is freed."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._release_slot(seq)
        seq.status = SequenceStatus.MIGRATING
        self.paused[seq.seq_id] = seq

    def resume(self, seq: Sequence) -> None:
        """Back to the front of the queue with the KV it held (an export was called off)."""
        del self.paused[seq.seq_id]
        seq.status = SequenceStatus.PREEMPTED
        self.waiting.appendleft(seq)

    def add_with_kv(self, seq: Sequence) -> None:
        """Queue a sequence whose block tables and num_computed_tokens are already set
        (an imported snapshot). Its blocks are held while it waits for a slot."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    # -- after the step ----------------------------------------------------------------

    def update(self, out: SchedulerOutput, sampled: list[int]) -> list[TokenEvent]:
        """Advance every scheduled sequence; append the tokens of the sampling ones.

        `sampled` holds one token id per sampling entry of out.scheduled, in order.
        """
        events = []
        tokens = iter(sampled)
        for item in out.scheduled:
            seq = item.seq
            token_id = next(tokens) if item.is_sampling else None
            if seq.status != SequenceStatus.RUNNING:
                continue  # aborted during the step
            seq.num_computed_tokens = item.start + item.num_new_tokens
            self.block_manager.commit(seq)
            if token_id is None:
                continue
            seq.token_ids.append(token_id)
            status = self._stop_status(seq, token_id)
            if status is not None:
                self.finish(seq, status)
            events.append(TokenEvent(seq, token_id, status is not None))
        return events

    def _stop_status(self, seq: Sequence, token_id: int) -> SequenceStatus | None:
        params = seq.params
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """End a sequence (stop, length, abort, error) and give back all it holds."""
        assert status.is_finished
        if seq.status.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            self.paused.pop(seq.seq_id, None)
        self._release(seq)
        seq.status = status

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self._release_slot(seq)

    def _release_slot(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            seq.slot = None
