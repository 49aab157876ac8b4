"""The only part of the engine that builds tensors: inputs, attention metadata, forward,
sampling. One device→host copy per step happens inside the sampler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kernels.paged_attention import PagedAttentionMetadata, use_native_decode
from kernels.rotary import rope_cache
from worker.block_manager import EMPTY, NULL_BLOCK, BlockPool, cdiv
from worker.decode_step import StaticDecode
from worker.kv_cache import KVLayout, allocate_kv_caches
from worker.models.decoder import DecoderModel, StepContext
from worker.sampler import Sampler, SampleResult, SamplingRow
from worker.scheduler import ScheduledSeq, SchedulerOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Batch:
    """Host-side view of one step, before it becomes tensors."""

    starts: list[int]  # first new position per sequence
    lengths: list[int]  # new tokens per sequence
    token_ids: list[int]  # [T]
    positions: list[int]  # [T]


class ModelRunner:
    def __init__(self, model: DecoderModel, layout: KVLayout, pools: list[BlockPool],
                 max_model_len: int, max_num_seqs: int, device: torch.device,
                 dtype: torch.dtype, static_decode: str = "off") -> None:
        self.model = model
        self.args = model.args
        self.layout = layout
        self.pools = pools
        self.device = device
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.kv_caches = allocate_kv_caches(self.args, layout, dtype, device)
        self.rope = {
            t: rope_cache(self.args.head_dim, max_model_len, r.theta, r.scaling, device)
            for t, r in self.args.rope.items()
        }
        self.sampler = Sampler(self.args.vocab_size, max_num_seqs, device)
        # on the CPU: KV writes through the native op (any dtype), and fp32/bf16 decode
        # attention reads the paged cache in place (native kernel)
        if device.type == "cpu":
            use_native_decode()
        # pure-decode steps on persistent buffers: "off" (the general path below, the
        # reference), "eager" or "compiled" (worker/decode_step.py)
        self.static = None
        if static_decode != "off":
            self.static = StaticDecode(model, layout, pools, self.kv_caches, self.rope,
                                       max_model_len, max_num_seqs, device, dtype,
                                       compile=static_decode == "compiled")

    # -- the step ----------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[SampleResult]:
        """Run one step; returns one SampleResult per sampling entry, in order."""
        for seq in out.admitted:
            self.sampler.reset_slot(seq.slot, seq.prompt_token_ids, seq.output_token_ids)
        sampling, logits = self.compute_logits(out.scheduled)
        if not sampling:
            return []
        rows = [
            SamplingRow(params=item.seq.params, slot=item.seq.slot,
                        position=item.seq.num_tokens, seed=item.seq.seed)
            for item in sampling
        ]
        return self.sampler.sample(logits, rows)

    def compute_logits(self, scheduled: list[ScheduledSeq]
                       ) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Forward one step: the sampling entries and their fp32 logits [num_sampling,
        vocab]. A pure-decode step takes the static path when it is on."""
        if self.static is not None and self.static.can_run(scheduled):
            return scheduled, self.static.execute(scheduled)
        input_ids, ctx, logits_index = self.prepare_inputs(scheduled)
        hidden = self.model(input_ids, ctx)  # [T, hidden]
        sampling = [item for item in scheduled if item.is_sampling]
        if not sampling:
            return [], hidden.new_empty(0)
        return sampling, self.model.compute_logits(hidden[logits_index])

    def prepare_inputs(self, scheduled: list[ScheduledSeq]
                       ) -> tuple[torch.Tensor, StepContext, torch.Tensor]:
        batch = self._host_batch(scheduled)
        dev = self.device
        input_ids = torch.tensor(batch.token_ids, dtype=torch.long, device=dev)
        positions = torch.tensor(batch.positions, dtype=torch.long, device=dev)
        cos_sin = {t: cache[positions] for t, cache in self.rope.items()}
        attn = [self._group_metadata(g, scheduled, batch) for g in range(len(self.pools))]
        ends, last = 0, []
        for item, n in zip(scheduled, batch.lengths, strict=True):
            ends += n
            if item.is_sampling:
                last.append(ends - 1)
        logits_index = torch.tensor(last, dtype=torch.long, device=dev)
        return input_ids, StepContext(cos_sin, attn, self.kv_caches), logits_index

    @staticmethod
    def _host_batch(scheduled: list[ScheduledSeq]) -> _Batch:
        starts, lengths, token_ids, positions = [], [], [], []
        for item in scheduled:
            s, n = item.start, item.num_new_tokens
            starts.append(s)
            lengths.append(n)
            token_ids.extend(item.seq.token_ids[s : s + n])
            positions.extend(range(s, s + n))
        return _Batch(starts, lengths, token_ids, positions)

    def _group_metadata(self, g: int, scheduled: list[ScheduledSeq],
                        batch: _Batch) -> PagedAttentionMetadata:
        """The step's attention metadata for KV group g. A step whose sequences bring
        different numbers of new tokens attends in parts (`_attention_parts`): padded to
        the longest chunk, every decode row cost a chunk's worth of attention (SmolLM2,
        512 prefill tokens beside 12 decodes: 0.59 s a step against 0.42 with none), and
        a padded batch gathers its query rows into place and back (~5 ms a 512-token
        step); so decodes go through the decode path (the native kernel where it runs)
        and chunks of one length attend together, each part's rows a slice of the step's
        where they are adjacent."""
        bs = self.layout.block_size
        slots = []
        for item, s, n in zip(scheduled, batch.starts, batch.lengths, strict=True):
            table = item.seq.block_tables[g]
            slots.extend(table[p // bs] * bs + p % bs for p in range(s, s + n))
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=self.device)
        groups = _attention_parts(batch.lengths)
        if len(groups) == 1:
            return self._part_metadata(g, scheduled, batch, groups[0], slot_mapping)
        first_row = [0]
        for n in batch.lengths:
            first_row.append(first_row[-1] + n)
        parts = []
        for members in groups:
            rows = [r for i in members for r in range(first_row[i], first_row[i + 1])]
            part = self._part_metadata(g, scheduled, batch, members, slot_mapping)
            parts.append((self._rows(rows), part))
        last = parts[-1][1]  # what the fields of the step as a whole hold: unused
        return PagedAttentionMetadata(
            slot_mapping=slot_mapping, block_tables=last.block_tables, mask=last.mask,
            max_q=last.max_q, pad_index=last.pad_index, unpad_index=last.unpad_index,
            parts=tuple(parts))

    def _rows(self, rows: list[int]) -> slice | torch.Tensor:
        """A part's query rows: a slice where they are adjacent (a view, no gather)."""
        if rows == list(range(rows[0], rows[-1] + 1)):
            return slice(rows[0], rows[-1] + 1)
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _part_metadata(self, g: int, scheduled: list[ScheduledSeq], batch: _Batch,
                       members, slot_mapping: torch.Tensor) -> PagedAttentionMetadata:
        """Metadata attending the query rows of the sequences scheduled[i], i in members."""
        pool, bs = self.pools[g], self.layout.block_size
        tables, first_blocks, starts, lengths = [], [], [], []
        for i in members:
            s, n = batch.starts[i], batch.lengths[i]
            table = scheduled[i].seq.block_tables[g]
            first = pool.first_needed_block(s)
            visible = table[first : cdiv(s + n, bs)]
            tables.append([NULL_BLOCK if b == EMPTY else b for b in visible])
            first_blocks.append(first)
            starts.append(s)
            lengths.append(n)
        width = max(len(t) for t in tables)
        padded = [t + [NULL_BLOCK] * (width - len(t)) for t in tables]
        dev = self.device
        block_tables = torch.tensor(padded, dtype=torch.long, device=dev)
        mask = self._mask(starts, lengths, first_blocks, width * bs, pool.window)
        pad_index, unpad_index = self._pad_indices(lengths)
        return PagedAttentionMetadata(
            slot_mapping=slot_mapping, block_tables=block_tables, mask=mask,
            max_q=max(lengths), pad_index=pad_index, unpad_index=unpad_index,
        )

    def _mask(self, starts: list[int], lengths: list[int], first_blocks: list[int],
              num_keys: int, window: int | None) -> torch.Tensor:
        """[B, 1, max_q, S] additive mask: causal, within the window, real queries only."""
        dev, bs = self.device, self.layout.block_size
        max_q = max(lengths)
        starts = torch.tensor(starts, device=dev)[:, None, None]  # [B, 1, 1]
        lengths = torch.tensor(lengths, device=dev)[:, None, None]
        key0 = torch.tensor(first_blocks, device=dev)[:, None, None] * bs
        q_idx = torch.arange(max_q, device=dev)[None, :, None]  # [1, max_q, 1]
        k_pos = key0 + torch.arange(num_keys, device=dev)[None, None, :]  # [B, 1, S]
        q_pos = starts + q_idx  # [B, max_q, 1]
        mask = (k_pos <= q_pos) & (q_idx < lengths)
        if window is not None:
            mask &= k_pos > q_pos - window
        # padding query rows see key 0 so SDPA never softmaxes an all-masked row into NaN
        mask[:, :, 0] |= (q_idx < lengths).logical_not()[:, :, 0]
        additive = torch.zeros(mask.shape, dtype=self.dtype, device=dev)
        return additive.masked_fill_(mask.logical_not(), float("-inf"))[:, None]

    def _pad_indices(self, lengths: list[int]
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        max_q = max(lengths)
        if min(lengths) == max_q:  # no padding: the rows are already [B, max_q] in order
            return None, None
        pad, unpad, offset = [], [], 0
        for b, n in enumerate(lengths):
            pad.extend(offset + min(i, n - 1) for i in range(max_q))
            unpad.extend(b * max_q + i for i in range(n))
            offset += n
        dev = self.device
        return (torch.tensor(pad, dtype=torch.long, device=dev),
                torch.tensor(unpad, dtype=torch.long, device=dev))


MAX_CHUNK_PARTS = 3  # chunk lengths attended apart, beyond which the closest are padded


def _attention_parts(lengths: list[int]) -> list[list[int]]:
    """Which scheduled sequences attend together: the decodes (one new token) as one part,
    the chunks grouped by length, in row order within a part. Beyond MAX_CHUNK_PARTS
    lengths (each part is one attention call a layer), the two groups whose merge pads
    the fewest query rows merge, the shorter padded to the longer."""
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    decodes = by_length.pop(1, None)
    chunks = [[n, members] for n, members in sorted(by_length.items())]
    while len(chunks) > MAX_CHUNK_PARTS:
        # merging neighbour j into j + 1 pads each of j's members by the length gap
        j = min(range(len(chunks) - 1),
                key=lambda j: len(chunks[j][1]) * (chunks[j + 1][0] - chunks[j][0]))
        chunks[j + 1][1] = sorted(chunks[j][1] + chunks[j + 1][1])
        del chunks[j]
    return ([decodes] if decodes else []) + [members for _, members in chunks]

