"""A step that mixes decodes with longer chunks, or chunks of different lengths, attends in
parts: the decode rows through the decode path (the native kernel where it is built),
the chunks grouped by length. The reference is the same step attended as one batch,
every sequence padded to the longest chunk. fp32, same keys, only the summation order
differs: |parts - one batch| <= 1e-5 on every logit.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine_driver import run_teacher_forced
from tests.tiny_models import VOCAB
from worker.loaders.hf import load_hf_dir
from worker.model_runner import MAX_CHUNK_PARTS, ModelRunner, _attention_parts
from worker.models.registry import build_model

TOLERANCE = 1e-5
PROMPT_LENGTHS = [37, 70, 100, 9]  # with a budget of 64: chunks beside decodes
DECODE_STEPS = 24


@pytest.mark.slow  # builds a tiny model with transformers
@pytest.mark.parametrize("family", ["qwen2", "gemma3"])  # GQA; + a sliding-window group
def test_a_mixed_step_attended_in_parts_equals_one_padded_batch(family, tiny_model_dir,
                                                               monkeypatch) -> None:
    ckpt = load_hf_dir(tiny_model_dir(family))
    model = build_model(ckpt.config, ckpt.tensors, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    sequences = [torch.randint(2, VOCAB, (n + DECODE_STEPS,), generator=gen).tolist()
                 for n in PROMPT_LENGTHS]

    split_steps = []
    in_parts = ModelRunner._group_metadata

    def recording(self, g, scheduled, batch):
        meta = in_parts(self, g, scheduled, batch)
        if meta.parts is not None:
            lengths = sorted(batch.lengths)
            split_steps.append(lengths)
            rows = sorted(r for rows, _ in meta.parts for r in _expand(rows))
            assert rows == list(range(sum(lengths)))  # each query row in one part
            chunk_lengths = {n for n in lengths if n > 1}
            max_q = [p.max_q for _, p in meta.parts]
            if lengths[0] == 1:  # the decodes first, as one part
                assert max_q.pop(0) == 1
            assert len(max_q) == min(len(chunk_lengths), MAX_CHUNK_PARTS)
            assert set(max_q) <= chunk_lengths
        return meta

    monkeypatch.setattr(ModelRunner, "_group_metadata", recording)
    parts = run_teacher_forced(model, sequences, PROMPT_LENGTHS)
    assert any(lengths[0] == 1 for lengths in split_steps), "no step mixed decodes with chunks"
    assert all(lengths[-1] > 1 for lengths in split_steps)

    def one_batch(self, g, scheduled, batch):
        meta = in_parts(self, g, scheduled, batch)
        return self._part_metadata(g, scheduled, batch, range(len(scheduled)),
                                   meta.slot_mapping)

    monkeypatch.setattr(ModelRunner, "_group_metadata", one_batch)
    whole = run_teacher_forced(model, sequences, PROMPT_LENGTHS)

    for n, got, ref in zip(PROMPT_LENGTHS, parts, whole, strict=True):
        assert sorted(got) == sorted(ref) == list(range(n, n + DECODE_STEPS))
        for pos, logits in got.items():
            diff = (logits - ref[pos]).abs().max().item()
            assert diff <= TOLERANCE, f"{family}: position {pos} differs by {diff}"


def _expand(rows) -> list[int]:
    if isinstance(rows, slice):
        return list(range(rows.start, rows.stop))
    return rows.tolist()


def test_parts_group_chunks_by_length_and_merge_the_cheapest_beyond_the_cap() -> None:
    assert _attention_parts([1, 1, 1]) == [[0, 1, 2]]
    assert _attention_parts([128, 128, 128, 128]) == [[0, 1, 2, 3]]
    # the burst's third step: decodes, a prompt's last 4 tokens, three whole prompts and
    # the first 124 tokens of the next
    assert _attention_parts([1, 1, 4, 128, 128, 128, 124]) == [[0, 1], [2], [6], [3, 4, 5]]
    # four chunk lengths: merging 120 into 128 pads one row by 8, the cheapest merge
    assert _attention_parts([1, 4, 60, 120, 128, 128]) == [[0], [1], [2], [3, 4, 5]]
    # padding 2 rows of 10 to 12 (4 rows) is cheaper than 1 row of 3 to 10 (7)
    assert _attention_parts([3, 10, 10, 12, 50]) == [[0], [1, 2, 3], [4]]

