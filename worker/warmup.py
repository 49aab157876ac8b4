"""Startup work so the first real request is not the slow one.

`warmup` runs the step shapes the scheduler will use (a prefill, a decode batch of every
slot, a mixed step; `warmup_shapes` says how long each prefill is) through the model and
the sampler, in the model's warmup mode (`DecoderModel.set_warmup`, llama.cpp's
`llama_set_warmup`): MoE layers send every token to every expert, so one pass touches
every expert's weights. The steps' outputs are discarded; their KV writes land in the
null block, which no sequence reads unmasked, and it is zeroed afterwards.
`check_attention_backend` tries the fast SDPA kernels for this head size and dtype and
reports which one attention will use.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from worker.config import SchedulerConfig
from worker.model_runner import ModelRunner
from worker.models.args import ModelArgs
from worker.scheduler import ScheduledSeq, SchedulerOutput
from worker.sequence import Sequence
from worker.vocab.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_WARMUP_PARAMS = (
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05,
                   repetition_penalty=1.1, logprobs=2),
)


def warmup_shapes(sched: SchedulerConfig, max_model_len: int, block_size: int,
                  device: torch.device) -> list[list[int]]:
    """The steps to run, as the new tokens of each sequence in them: a prefill alone, a
    decode batch of every slot, and a mixed step (one prefill among decodes).

    Only CUDA gets a full prefill chunk: its caching allocator then holds the largest
    step's activations, so the first long prompt allocates nothing and an out-of-memory
    shows at startup. Elsewhere, and in the mixed step everywhere, a short prefill warms
    the same code at a fraction of the cost: on a CPU a full chunk of a 135M model takes
    seconds and warms nothing a short one does not (no kernel is compiled or chosen per
    shape; scripts/warmup_timing.py measures it).
    """
    full = min(sched.max_num_batched_tokens, max_model_len - 1)
    short = min(full, 2 * block_size + 1)  # spans three blocks: the block-table gather
    shapes = [[full if device.type == "cuda" else short], [1] * sched.max_num_seqs]
    if sched.max_num_seqs > 1 and short > sched.max_num_seqs:
        shapes.append([short - sched.max_num_seqs + 1] + [1] * (sched.max_num_seqs - 1))
    return shapes


def warmup(runner: ModelRunner, shapes: list[list[int]]) -> float:
    """Run `shapes` (warmup_shapes) through the model and the sampler; returns the seconds
    it took."""
    t0 = time.perf_counter()
    decode = [[1] * n for n in runner.static.warmup_sizes()] if runner.static else []
    runner.model.set_warmup(True)
    try:
        for lengths in shapes + [d for d in decode if d not in shapes]:
            runner.execute(_fake_step(runner, lengths))  # results discarded
    finally:
        runner.model.set_warmup(False)
    for cache in runner.kv_caches:
        cache[:, :, 0].zero_()  # the null block back to zeros
    seconds = time.perf_counter() - t0
    log.info("warmup: %d step shapes in %.2fs", len(shapes), seconds)
    return seconds


def _fake_step(runner: ModelRunner, lengths: list[int]) -> SchedulerOutput:
    """Sequences whose every block is the null block, one per requested length."""
    bs = runner.layout.block_size
    out = SchedulerOutput()
    for i, n in enumerate(lengths):
        params = _WARMUP_PARAMS[i % len(_WARMUP_PARAMS)]
        seq = Sequence(seq_id=f"warmup-{i}", token_ids=[0] * n, num_prompt_tokens=n,
                       params=params, seed=i, slot=i)
        seq.block_tables = [[0] * (-(-n // bs)) for _ in runner.pools]
        out.scheduled.append(ScheduledSeq(seq, n, 0))
        out.admitted.append(seq)
    return out


def check_attention_backend(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> str:
    """Name of the SDPA kernel attention will use here, with the reason for a fallback."""
    if device.type != "cuda":
        reason = "flash / memory-efficient SDPA kernels need CUDA"
        log.info("attention backend: sdpa-math (paged gather, %s)", reason)
        return f"sdpa-cpu (paged gather; {reason})"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, args.num_heads, 4, args.head_dim, device=device, dtype=dtype)
    k = torch.randn(1, args.num_heads, 8, args.head_dim, device=device, dtype=dtype)
    mask = torch.ones(1, 1, 4, 8, dtype=torch.bool, device=device)
    for backend, name in ((SDPBackend.EFFICIENT_ATTENTION, "sdpa-memory-efficient"),):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
            log.info("attention backend: %s (head_dim %d, %s)", name, args.head_dim, dtype)
            return name
        except RuntimeError as e:
            log.warning("attention backend %s unavailable: %s; falling back", name, e)
    return "sdpa-math (fast kernels rejected this head size / dtype; see log)"
