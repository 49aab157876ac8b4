"""Scheduler and block manager on the CPU with fake model outputs (no torch)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worker.block_manager import EMPTY, BlockManager
from worker.config import SchedulerConfig
from worker.scheduler import Scheduler
from worker.sequence import Sequence, SequenceStatus
from worker.vocab.errors import CapacityError
from worker.vocab.sampling_params import SamplingParams

BS = 4


def make_seq(i: int, prompt_len: int, max_tokens: int = 8,
             prefix: list[int] | None = None) -> Sequence:
    tokens = (prefix or []) + [100 + i * 1000 + j for j in range(prompt_len - len(prefix or []))]
    return Sequence(seq_id=f"s{i}", token_ids=tokens, num_prompt_tokens=len(tokens),
                    params=SamplingParams(max_tokens=max_tokens, ignore_eos=True), seed=i,
                    arrival=i)


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 4, budget: int = 16,
                   windows: list[int | None] | None = None) -> Scheduler:
    windows = windows or [None]
    bm = BlockManager(BS, [num_blocks] * len(windows), windows)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
                     bm, max_model_len=256, eos_token_ids=(2,))


def run_to_completion(s: Scheduler, max_steps: int = 10_000) -> int:
    steps = 0
    while s.has_unfinished:
        out = s.schedule()
        assert not out.is_empty, "scheduler stalled with work queued"
        s.update(out, [7] * sum(1 for x in out.scheduled if x.is_sampling))
        steps += 1
        assert steps < max_steps
    return steps


@pytest.mark.parametrize("module", ["worker.scheduler", "worker.block_manager"])
@pytest.mark.slow  # a fresh interpreter per module
def test_imports_without_torch(module: str) -> None:
    code = (f"import sys; sys.modules['torch'] = None; import {module}; "
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chunked_prefill_respects_budget() -> None:
    s = make_scheduler(budget=16)
    s.add(make_seq(0, 40))
    s.add(make_seq(1, 5))
    out = s.schedule()
    assert [x.num_new_tokens for x in out.scheduled] == [16]
    assert not out.scheduled[0].is_sampling
    s.update(out, [])
    out = s.schedule()
    assert [x.num_new_tokens for x in out.scheduled] == [16]
    s.update(out, [])
    out = s.schedule()  # 8 left of seq 0, then seq 1 joins with 5 of the 8 remaining budget
    assert [x.num_new_tokens for x in out.scheduled] == [8, 5]
    assert all(x.is_sampling for x in out.scheduled)


def test_slots_limit_concurrency() -> None:
    s = make_scheduler(max_num_seqs=2, budget=64)
    for i in range(5):
        s.add(make_seq(i, 3))
    out = s.schedule()
    assert len(out.scheduled) == 2 and len(s.waiting) == 3
    run_to_completion(s)


def test_pressure_preempts_youngest_and_everything_completes() -> None:
    s = make_scheduler(num_blocks=12, max_num_seqs=4, budget=64)  # 11 usable blocks
    seqs = [make_seq(i, 6, max_tokens=10) for i in range(6)]  # each needs 4 blocks at the end
    for seq in seqs:
        s.add(seq)
    run_to_completion(s)
    assert s.num_preemptions > 0
    assert all(seq.status == SequenceStatus.FINISHED_LENGTH for seq in seqs)
    assert all(seq.num_output_tokens == 10 for seq in seqs)
    pool = s.block_manager.pools[0]
    assert pool.num_free_blocks == pool.num_blocks - 1
    assert all(b.ref_count == 0 for b in pool.blocks)


def test_request_larger_than_pool_is_rejected_up_front() -> None:
    s = make_scheduler(num_blocks=4)
    with pytest.raises(CapacityError, match="KV blocks"):
        s.add(make_seq(0, 20, max_tokens=10))


def test_prefix_blocks_are_shared_and_counted() -> None:
    s = make_scheduler(budget=64)
    shared = list(range(500, 512))  # 3 full blocks
    a = make_seq(0, 14, prefix=shared)
    s.add(a)
    out = s.schedule()
    s.update(out, [7])
    b = make_seq(1, 15, prefix=shared)
    s.add(b)
    out = s.schedule()
    assert b.num_cached_tokens == 12
    assert a.block_tables[0][:3] == b.block_tables[0][:3]
    pool = s.block_manager.pools[0]
    assert all(pool.blocks[i].ref_count == 2 for i in a.block_tables[0][:3])
    s.update(out, [7] * sum(x.is_sampling for x in out.scheduled))
    run_to_completion(s)
    assert pool.num_free_blocks == pool.num_blocks - 1


def test_idle_cached_prefix_is_evicted_before_preemption() -> None:
    s = make_scheduler(num_blocks=9, budget=64)  # 8 usable
    s.add(make_seq(0, 16, max_tokens=1))
    run_to_completion(s)  # leaves 4 cached full blocks, all idle
    pool = s.block_manager.pools[0]
    assert len(pool.cached) == 4 and pool.num_free_blocks == 8
    s.add(make_seq(1, 28, max_tokens=2))  # needs 8 blocks: must evict the idle prefix
    run_to_completion(s)
    assert s.num_preemptions == 0


def test_abort_frees_blocks() -> None:
    s = make_scheduler(budget=64)
    seq = make_seq(0, 10)
    s.add(seq)
    out = s.schedule()
    s.update(out, [7])
    s.finish(seq, SequenceStatus.FINISHED_ABORTED)
    pool = s.block_manager.pools[0]
    assert pool.num_free_blocks == pool.num_blocks - 1 and not s.has_unfinished
    assert s.free_slots and len(s.free_slots) == 4


def test_sliding_window_gives_back_blocks_out_of_window() -> None:
    s = make_scheduler(budget=64, windows=[8])
    seq = make_seq(0, 30, max_tokens=20)
    s.add(seq)
    out = s.schedule()
    s.update(out, [7])
    s.schedule()
    table = seq.block_tables[0]
    live = [b for b in table if b != EMPTY]
    # next query at position 30 sees keys 23..30 → blocks 5..7 only
    assert table[:5] == [EMPTY] * 5 and len(live) == 3


def test_eos_and_stop_ids_finish() -> None:
    s = make_scheduler()
    seq = make_seq(0, 3)
    seq.params = SamplingParams(max_tokens=8)
    s.add(seq)
    out = s.schedule()
    events = s.update(out, [2])
    assert events[0].finished and seq.status == SequenceStatus.FINISHED_STOPPED


def test_queue_limit_counts_only_requests_beyond_free_slots() -> None:
    bm = BlockManager(BS, [64], [None])
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_waiting=1), bm, max_model_len=256,
                  eos_token_ids=(2,))
    for i in range(3):  # two will take the free slots, one queues
        s.add(make_seq(i, 4))
    with pytest.raises(CapacityError, match="queue full"):
        s.add(make_seq(3, 4))
    s.schedule()  # two admitted: still one queued beyond the (now busy) slots
    with pytest.raises(CapacityError, match="queue full"):
        s.add(make_seq(4, 4))
    assert run_to_completion(s) > 0
