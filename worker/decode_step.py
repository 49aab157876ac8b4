"""The static decode step: pure-decode batches on persistent buffers, compiled per size.

A step in which every scheduled sequence computes exactly one token (the steady state of
serving) runs here instead of the general path of `ModelRunner`:

- Batches are padded to a few sizes (1, 2, 4, 8, … up to the slot count), so a compiled
  graph sees a handful of shapes. Padding rows read the spare table row (all null block),
  write their K/V into the null block and are dropped after the logits.
- Inputs live in persistent buffers. Per step the host builds one [3, B] int64 tensor
  (token id, position, slot of each row) and copies it in. Block tables live in one
  [slots + 1, max_blocks] buffer per KV group, indexed by slot; a row is written only when
  its sequence's table changed (a new block, a new sequence in the slot), not rebuilt.
- Slot mapping, the visible blocks of each row and the attention mask are computed inside
  the graph from those buffers, so the whole step — embedding, every layer, KV writes,
  attention, the final norm and the logits — is one function that `torch.compile`
  (inductor; dense weights frozen as constants) turns into one graph per size.

The general path stays the reference: with compilation off nothing here runs, and the
tests compare this step, eager and compiled, against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.block_linear import BLOCKS_LAYOUT
from kernels.fp16_linear import FBGEMM_LAYOUT, fbgemm_fp16_available
from kernels.packed_weight import PackedWeight
from kernels.paged_attention import PagedAttentionMetadata
from worker.block_manager import EMPTY, NULL_BLOCK, BlockPool, cdiv
from worker.kv_cache import KVLayout
from worker.models.decoder import DecoderModel, StepContext
from worker.quantize import cpu_has_native_bf16
from worker.scheduler import ScheduledSeq

# A full-attention group's visible width is rounded up to a power of two of blocks, at
# least this many, so the compiled graph sees few distinct widths.
_MIN_KEY_BLOCKS = 4


def static_decode_mode(compile: str, device: torch.device, dtype: torch.dtype,
                       weights: str | None = None, blocks: bool = False) -> str:
    """The ModelRunner's static_decode for ModelConfig.compile ("auto" | "on" | "off"):
    "compiled" or "off".

    auto compiles where it measured a clear gain for its cost:
    - a CPU with native bf16 (AVX512_BF16 / AMX) running bf16 or fp16, where the compiled
      step took half the time of the eager one (MODELS.md);
    - `--weights float16` on FBGEMM (x86): the compiled step is 1.5x faster than the
      eager one at 1-4 sequences and 1.25x at 16 on a 2-core AVX2 CPU (native ops), and
      packed weights compile unfrozen, so only the first start pays the compile
      (docs/benchmarks.md);
    - `blocks`: the model multiplies 4/8-bit blocks with the CPU's native op (auto or
      int4 on a GGUF, kernels/block_linear.py): SmolLM2 auto's step 20.6 → 13.5 ms at one
      sequence, 67.7 → 58.5 ms at 16 (2-core AVX2), compiled in ~40 s once, ~8 s from
      the cache after.
    Dense fp32 on a 2-core AVX2 CPU gained 14% (SmolLM2 batch 1: 96 → 83 ms a step) for
    ~2 minutes of compiling at every start (a frozen graph is not cached); CUDA waits for
    CUDA graphs (the GPU issue): both stay eager under auto.
    """
    if compile not in ("auto", "on", "off"):
        raise ValueError(f"compile: {compile!r} is not auto, on or off")
    if compile != "auto":
        return "compiled" if compile == "on" else "off"
    if device.type != "cpu":
        return "off"
    native_bf16 = cpu_has_native_bf16() and dtype in (torch.bfloat16, torch.float16)
    fbgemm = weights == "float16" and fbgemm_fp16_available()
    return "compiled" if native_bf16 or fbgemm or blocks else "off"


def batch_buckets(max_num_seqs: int) -> list[int]:
    """The padded batch sizes: 1, powers of two below max_num_seqs, then max_num_seqs.

    A batch of one is its own bucket although the compiler specialises any dimension of
    size 1 (so it costs a graph of its own, compiled at warmup with the others): a padded
    second row is not free. With the CPU's 4/8-bit block weights every row of x costs its
    own integer work, and SmolLM2-135M's compiled step took 16.5-18.8 ms at batch 2
    against 9.6-12.8 ms at batch 1 (AVX-512 EPYC, 2 threads).
    """
    sizes, b = [1], 2
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes if max_num_seqs == 1 else [*sizes, max_num_seqs]


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(slots=True)
class _SyncedRow:
    """What a slot's table row holds: the sequence's list (kept alive, so `is` is a safe
    identity) and how many of its entries were written."""

    table: list[int]
    length: int


class DecodeModule(nn.Module):
    """forward(inputs, tables, kv_caches, key_offsets) → fp32 logits [B, vocab].

    inputs: [3, B] int64: token id, position and slot of each row (the slot indexes the
    table buffers). tables: per KV group [slots + 1, max_blocks] int64 block ids.
    key_offsets: per KV group arange(n), n = how many blocks each row attends over from
    its first visible block. n is a tensor dimension, which the compiler keeps symbolic;
    an int argument would be specialised first and recompiled as the context grows.
    """

    def __init__(self, model: DecoderModel, layout: KVLayout, windows: list[int | None],
                 rope: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.block_size = layout.block_size
        self.windows = windows
        self.rope = rope
        self.dtype = dtype

    def forward(self, inputs: torch.Tensor, tables: list[torch.Tensor],
                kv_caches: list[torch.Tensor], key_offsets: list[torch.Tensor]
                ) -> torch.Tensor:
        token_ids, positions, rows = inputs[0], inputs[1], inputs[2]
        cos_sin = {t: cache[positions] for t, cache in self.rope.items()}
        attn = [self._metadata(positions, table[rows], window, offsets)
                for table, window, offsets in zip(tables, self.windows, key_offsets,
                                                  strict=True)]
        hidden = self.model(token_ids, StepContext(cos_sin, attn, kv_caches))  # [B, hidden]
        return self.model.compute_logits(hidden)

    def _metadata(self, positions: torch.Tensor, table: torch.Tensor, window: int | None,
                  offsets: torch.Tensor) -> PagedAttentionMetadata:
        """table: [B, max_blocks] rows of the step's sequences; offsets: [num_blocks]
        0, 1, … → one decode query per row over num_blocks blocks from its first
        visible one."""
        bs = self.block_size
        current = table.gather(1, (positions // bs)[:, None])[:, 0]  # [B] block of the token
        slot_mapping = current * bs + positions % bs
        first = torch.zeros_like(positions)
        if window is not None:  # first block holding a key the query still sees
            first = (positions - window + 1).clamp(min=0) // bs
        index = (first[:, None] + offsets).clamp(max=table.shape[1] - 1)  # [B, num_blocks]
        blocks = table.gather(1, index)
        key_pos = (index[:, :, None] * bs
                   + torch.arange(bs, device=table.device)).flatten(1)  # [B, S]
        query = positions[:, None]
        visible = key_pos <= query
        if window is not None:
            visible &= key_pos > query - window
        zero = torch.zeros((), dtype=self.dtype, device=table.device)
        mask = torch.where(visible, zero, float("-inf"))[:, None, None, :]  # [B, 1, 1, S]
        return PagedAttentionMetadata(slot_mapping=slot_mapping, block_tables=blocks,
                                      mask=mask, max_q=1, pad_index=None, unpad_index=None)


def _packed_weights(model: DecoderModel) -> list[PackedWeight]:
    weights = []
    for m in model.modules():
        if (w := getattr(m, "packed", None)) is not None:
            weights.append(w)
        for pair in getattr(m, "packed_experts", None) or ():
            weights.extend(pair)
    return weights


def _native_ops_only(weights: list[PackedWeight]) -> bool:
    """Whether there are packed weights and each runs through one of slotmesh's C++ ops
    (CPU blocks, or FBGEMM fp16 in the native op, not the Python op over a handle)."""
    return bool(weights) and all(
        w.layout in (BLOCKS_LAYOUT, FBGEMM_LAYOUT) and not w.handle_key for w in weights)


def _guard_options() -> dict:
    """torch.compile options that drop the guards on the model's modules.

    The model never changes after load (no weight swaps; MoE's warmup flag is not read
    under compile, decoder.py) and one compiled engine per process resets the caches
    (StaticDecode._compile), so the guards checking every module attribute and
    parameter before each step only cost time: SmolLM2-135M `auto` at batch 1, min / p25
    of 300 steps, three alternating pairs, 7.0-7.4 / 7.3-8.3 ms without them against
    7.7-8.3 / 8.4-10.5 ms with (AVX-512 EPYC, 2 threads). The inputs (ids, tables, caches,
    key offsets) keep theirs. Older torch without guard filters compiles as before.
    """
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    return {} if skip is None else {"guard_filter_fn": skip}


class StaticDecode:
    """Pure-decode steps through DecodeModule: eager, or compiled per batch bucket."""

    def __init__(self, model: DecoderModel, layout: KVLayout, pools: list[BlockPool],
                 kv_caches: list[torch.Tensor], rope: dict[str, torch.Tensor],
                 max_model_len: int, max_num_seqs: int, device: torch.device,
                 dtype: torch.dtype, compile: bool) -> None:
        self.layout = layout
        self.kv_caches = kv_caches
        self.max_num_seqs = max_num_seqs
        self.buckets = batch_buckets(max_num_seqs)
        self.device = device
        self.max_blocks = cdiv(max_model_len, layout.block_size)
        self.windows = [p.window for p in pools]
        # row max_num_seqs is the padding rows' table: every entry the null block
        self.tables = [torch.full((max_num_seqs + 1, self.max_blocks), NULL_BLOCK,
                                  dtype=torch.long, device=device) for _ in pools]
        self.offsets = torch.arange(self.max_blocks, device=device)  # sliced per step
        self.synced: list[list[_SyncedRow | None]] = [[None] * max_num_seqs for _ in pools]
        self.module = DecodeModule(model, layout, self.windows, rope, dtype).eval()
        self.compiled = compile
        # frozen: dense weights, and block weights' bf16 twins where they could not be
        # prepacked (see _compile); the C++ wrapper for an unfrozen graph whose every
        # packed weight's op is native C++
        packed = _packed_weights(model)
        freeze = not packed or any(w.batched is not None and w.batched.prepacked is None
                                   for w in packed)
        self.cpp_wrapper = (compile and device.type == "cpu" and not freeze
                            and _native_ops_only(packed))
        self.forward = self._compile(self.module, freeze=freeze,
                                     cpp_wrapper=self.cpp_wrapper) if compile else self.module

    @staticmethod
    def _compile(module: DecodeModule, freeze: bool, cpp_wrapper: bool = False):
        """torch.compile(module), each call under the inductor settings it was made with.

        freeze: weights become constants of the graph, so mkldnn prepacks the dense ones
        (the KV caches and table buffers stay inputs: their in-place updates stay
        visible). A frozen graph is never served from inductor's on-disk cache, so every
        start pays the compile; packed weights (FBGEMM fp16, int8, int4) gain nothing from
        it, so they compile unfrozen and a second start reads the graph from the cache.
        Block weights' bf16 twins (`auto+bfloat16`) are prepacked for oneDNN at load
        (`kernels.packed_weight.prepack_dense`) and enter the graph as inputs of
        slotmesh's `prepacked_linear` op, so that graph stays unfrozen and cached: SmolLM2
        at batch 16, 26.2-27.9 ms a step against 27.5-30.3 frozen, a second start 22 s
        against 105 s (the twins unprepacked and unfrozen had taken 44.4 ms). Without the
        native library the twins are plain and the graph freezes again.

        cpp_wrapper: inductor writes the code that calls the graph's kernels and ops in C++
        instead of Python. A step calls ~180 ops (SmolLM2-135M: 121 block GEMMs, 30 KV
        writes and attentions) and the Python wrapper's per-op work (size asserts, tensor
        views, dispatch) is ~1.3 ms of a batch-of-one step: `auto` weights, 400 steps
        alternating in one process, mean 11.2 ms against 12.5 (AVX-512 EPYC, 2 threads).
        The C++ build doubles the first compile (78 s against 31-49 s for the batch-of-one
        graph), so it is used for packed weights only, whose graph the on-disk cache
        serves from the second start on.
        """
        import torch._inductor.config as inductor_config

        # The compiled code is cached per code object (DecodeModule.forward), and its guards
        # check the weights' shapes, not which tensors they are: a frozen graph compiled
        # for an earlier engine in this process would run a later one on the first one's
        # weights. One compiled engine per process, then: a new one drops the caches (an
        # older engine still in use compiles again on its next call).
        torch._dynamo.reset()
        compiled = torch.compile(module, dynamic=None, options=_guard_options())

        def forward(*args):  # compiling happens inside the first call of each shape
            with inductor_config.patch(freezing=freeze, cpp_wrapper=cpp_wrapper):
                return compiled(*args)

        return forward

    def can_run(self, scheduled: list[ScheduledSeq]) -> bool:
        """A pure-decode step that fits the largest bucket."""
        return (0 < len(scheduled) <= self.max_num_seqs
                and all(s.num_new_tokens == 1 and s.is_sampling for s in scheduled))

    def execute(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """fp32 logits [len(scheduled), vocab] of one pure-decode step."""
        num_rows = len(scheduled)
        padded = next(b for b in self.buckets if b >= num_rows)
        pad = padded - num_rows
        host = torch.tensor([
            [s.seq.token_ids[s.start] for s in scheduled] + [0] * pad,
            [s.start for s in scheduled] + [0] * pad,
            [s.seq.slot for s in scheduled] + [self.max_num_seqs] * pad,
        ], dtype=torch.long)  # [3, padded]: the step's one upload
        inputs = host.to(self.device, non_blocking=True)
        if self.compiled:  # one graph for every bucket: the batch size is symbolic
            torch._dynamo.maybe_mark_dynamic(inputs, 1)
        for g in range(len(self.tables)):
            self._sync_tables(g, scheduled)
        last = max(s.start for s in scheduled)
        key_offsets = [self.offsets[:self._key_blocks(g, last)]
                       for g in range(len(self.tables))]
        if self.compiled:
            for g, offsets in enumerate(key_offsets):
                if self.windows[g] is None:  # grows with the context: symbolic
                    torch._dynamo.maybe_mark_dynamic(offsets, 0)
        logits = self.forward(inputs, self.tables, self.kv_caches, key_offsets)
        return logits[:num_rows]

    def _key_blocks(self, g: int, last_position: int) -> int:
        window = self.windows[g]
        if window is not None:  # a window spans at most this many blocks
            return min((window - 1) // self.layout.block_size + 2, self.max_blocks)
        needed = last_position // self.layout.block_size + 1
        return min(max(_next_pow2(needed), _MIN_KEY_BLOCKS), self.max_blocks)

    def _sync_tables(self, g: int, scheduled: list[ScheduledSeq]) -> None:
        """Write what changed in each scheduled sequence's table row since last time.

        Entries a sliding-window pool trimmed to EMPTY are never rewritten: they lie
        before the row's first visible block, which the graph never reads.
        """
        synced, buffer = self.synced[g], self.tables[g]
        for s in scheduled:
            table, slot = s.seq.block_tables[g], s.seq.slot
            row = synced[slot]
            if row is not None and row.table is table and row.length == len(table):
                continue
            start = row.length if row is not None and row.table is table else 0
            fresh = [NULL_BLOCK if b == EMPTY else b for b in table[start:]]
            buffer[slot, start:len(table)] = torch.tensor(fresh, dtype=torch.long)
            synced[slot] = _SyncedRow(table, len(table))

    def warmup_sizes(self) -> list[int]:
        """Decode batch sizes to run at warmup: every bucket. The batch dimension is
        dynamic, so the first compiles the graph the others share, unless a guard
        singles one out (inductor guarded `batch != 16` where the block size is 16):
        that one compiles its own graph here, not on a user's request."""
        return self.buckets if self.compiled else []
