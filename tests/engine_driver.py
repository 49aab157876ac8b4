"""Teacher-forced driving of the scheduler + model runner, recording logits per step."""

from __future__ import annotations

import torch

from worker.block_manager import BlockManager
from worker.config import CacheConfig, SchedulerConfig
from worker.kv_cache import plan_kv_layout
from worker.model_runner import ModelRunner
from worker.models.decoder import DecoderModel
from worker.scheduler import Scheduler
from worker.sequence import Sequence
from worker.vocab.sampling_params import SamplingParams


def run_teacher_forced(model: DecoderModel, sequences: list[list[int]], num_prompt: list[int],
                       max_num_batched_tokens: int = 64, block_size: int = 8,
                       max_model_len: int = 512, static_decode: str = "off"
                       ) -> list[dict[int, torch.Tensor]]:
    """Feed each sequence's prompt, then its remaining tokens one decode step at a time
    (as if sampled), through chunked prefill and the paged cache, all batched together.
    static_decode: how the runner runs pure-decode steps ("off", "eager", "compiled").
    Returns per sequence {position sampled: fp32 logits [vocab]}.
    """
    args = model.args
    sched_cfg = SchedulerConfig(max_num_seqs=len(sequences),
                                max_num_batched_tokens=max_num_batched_tokens)
    cache_cfg = CacheConfig(block_size=block_size, kv_cache_bytes=64 << 20)
    layout = plan_kv_layout(args, cache_cfg, sched_cfg, max_model_len, torch.float32)
    bm = BlockManager(block_size, layout.pool_sizes, layout.windows)
    scheduler = Scheduler(sched_cfg, bm, max_model_len, eos_token_ids=())
    runner = ModelRunner(model, layout, bm.pools, max_model_len, len(sequences),
                         torch.device("cpu"), next(model.parameters()).dtype,
                         static_decode=static_decode)
    seqs = []
    for i, (tokens, n) in enumerate(zip(sequences, num_prompt, strict=True)):
        params = SamplingParams(max_tokens=len(tokens) - n, temperature=0.0, ignore_eos=True)
        seq = Sequence(seq_id=str(i), token_ids=list(tokens[:n]), num_prompt_tokens=n,
                       params=params, seed=0, arrival=i)
        scheduler.add(seq)
        seqs.append(seq)
    logits_by_seq: list[dict[int, torch.Tensor]] = [{} for _ in sequences]
    with torch.inference_mode():
        while scheduler.has_unfinished:
            out = scheduler.schedule()
            sampling, logits = runner.compute_logits(out.scheduled)
            forced = []
            for row, item in enumerate(sampling):
                i = int(item.seq.seq_id)
                pos = item.seq.num_tokens
                logits_by_seq[i][pos] = logits[row].clone()
                forced.append(sequences[i][pos])
            scheduler.update(out, forced)
    # idle cached prefix blocks sit in the free queue too, so everything is free again
    assert all(p.num_free_blocks == p.num_blocks - 1 for p in bm.pools)
    return logits_by_seq
