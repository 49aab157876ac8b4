"""A step that mixes decodes with longer chunks attends in two parts: the decode rows
through the decode path (the native kernel where it is built), the chunks padded among
themselves. The reference is the same step attended as one batch, every sequence padded
to the longest chunk. fp32, same keys, only the summation order differs:
|parts - one batch| <= 1e-5 on every logit.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine_driver import run_teacher_forced
from tests.tiny_models import VOCAB
from worker.loaders.hf import load_hf_dir
from worker.model_runner import ModelRunner
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
            rows = sorted(r for rows, _ in meta.parts for r in rows.tolist())
            assert rows == list(range(sum(lengths)))  # each query row in one part
            assert [p.max_q for _, p in meta.parts] == [1, lengths[-1]]
        return meta

    monkeypatch.setattr(ModelRunner, "_group_metadata", recording)
    parts = run_teacher_forced(model, sequences, PROMPT_LENGTHS)
    assert split_steps, "no step mixed decodes with chunks"
    assert all(lengths[0] == 1 and lengths[-1] > 1 for lengths in split_steps)

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
