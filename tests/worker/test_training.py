"""Fine-tuning building blocks: the training forward against transformers, the HF export
round trip, the learning-rate schedule, optimizer state sizes, data windows, statistics.

All on tiny random models, fp32, CPU, one torch thread (conftest `one_thread`).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.causal_attention import causal_attention, causal_attention_reference
from tests.tiny_models import FAMILIES, VOCAB
from worker.loaders.hf import load_hf_dir
from worker.models.registry import build_model, hf_state_dict, load_weights
from worker.training.data import epoch_order, make_windows
from worker.training.optim import (
    SGDInBackward,
    make_optimizer,
    moment_buffer_bytes,
    parameter_bytes,
    select_trainable,
    state_bytes,
)
from worker.training.progress import RunningStats
from worker.training.schedule import LRSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-4  # max |logit difference|, fp32, as the serving parity test
SEQ_LEN = 70  # longer than the tiny models' sliding window (48)


def _model(path, requires_grad: bool = False):
    ckpt = load_hf_dir(path)
    model = build_model(ckpt.config, ckpt.tensors, torch.float32, torch.device("cpu"))
    return model.requires_grad_(requires_grad), ckpt


@pytest.mark.parametrize("window", [None, 5, 100])
def test_causal_attention_matches_reference(window) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 24, 6, 16, generator=gen)  # [B, L, H, D], 3 query heads per KV head
    k, v = torch.randn(2, 2, 24, 2, 16, generator=gen).unbind(1)
    got = causal_attention(q, k, v, 0.25, window)
    want = causal_attention_reference(q, k, v, 0.25, window)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.slow  # imports transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_training_forward_matches_transformers(family, tiny_model_dir) -> None:
    """forward_dense (full causal attention, sliding window, no KV cache) gives the logits
    transformers gives for whole sequences, and every parameter receives a gradient."""
    import transformers as tf

    path = tiny_model_dir(family)
    model, _ = _model(path, requires_grad=True)
    reference = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(2, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    logits = model.compute_logits(model.forward_dense(ids))  # [2, L, vocab]
    with torch.no_grad():
        want = reference(ids).logits
    assert (logits.detach() - want).abs().max().item() <= TOLERANCE
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_state_dict_is_what_load_weights_reads(family, tiny_model_dir) -> None:
    model, ckpt = _model(tiny_model_dir(family))
    exported = hf_state_dict(model)
    assert set(exported) == set(ckpt.tensors)  # the names transformers wrote
    assert all(torch.equal(exported[k], ckpt.tensors[k]) for k in exported)
    again, _ = _model(tiny_model_dir(family))
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    load_weights(again, exported)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(),
                                                 strict=True))


def test_schedule_halves_exactly() -> None:
    lr = 1e-3
    # --lr-halvings N over N epochs: each epoch exactly half the one before
    assert LRSchedule.build(lr=lr, epochs=4, halvings=4).rates() == [
        1e-3, 5e-4, 2.5e-4, 1.25e-4]
    # --lr-min lr/8 over --decay-epochs 3 of 5: three halvings, then lr_min
    assert LRSchedule.build(lr=lr, epochs=5, lr_min=lr / 8, decay_epochs=3).rates() == [
        lr, lr / 2, lr / 4, lr / 8, lr / 8]
    # llama.cpp: decay_epochs at or above the epochs means "over all epochs"
    assert LRSchedule.build(lr=lr, epochs=2, lr_min=lr / 4, decay_epochs=7).rates() == [
        lr, lr / 2]
    # two halvings spread over four epochs: half a halving per epoch
    rates = LRSchedule.build(lr=lr, epochs=4, halvings=2).rates()
    assert rates[0] == lr and rates[2] == lr / 2
    assert rates[1] == pytest.approx(lr * math.sqrt(0.5), rel=1e-15)
    assert rates[3] == pytest.approx(lr / 2 * math.sqrt(0.5), rel=1e-15)
    assert LRSchedule.build(lr=lr, epochs=3).rates() == [lr, lr, lr]  # no --lr-min


def _one_step(model, optimizer) -> None:
    ids = torch.randint(2, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    logits = model.compute_logits(model.forward_dense(ids[:, :-1]))
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    optimizer.step()


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_sgd_keeps_no_state_adamw_two_moments(tiny_model_dir, grad_accum) -> None:
    """--train-only: frozen parameters get no gradient and no state; SGD holds zero bytes
    of optimizer state, AdamW's moment buffers are exactly 2× the trainable bytes."""
    path = tiny_model_dir("llama")
    for name in ("sgd", "adamw"):
        model, _ = _model(path)
        trainable = select_trainable(model, (r"layers\.[01]\.", r"^norm"))
        optimizer = make_optimizer(name, trainable, 1e-3, 0.1, grad_accum)
        _one_step(model, optimizer)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for p in frozen)
        assert not any(p in optimizer.state for p in frozen)
        if name == "sgd":
            assert state_bytes(optimizer) == 0 and not optimizer.state
        else:
            assert moment_buffer_bytes(optimizer) == 2 * parameter_bytes(trainable)


def test_sgd_in_backward_is_torch_sgd(tiny_model_dir) -> None:
    """Stepping inside backward gives torch.optim.SGD's update, and frees every gradient."""
    path = tiny_model_dir("gemma3")  # tied embeddings: the hook must wait for both uses
    fused, _ = _model(path, requires_grad=True)
    plain, _ = _model(path, requires_grad=True)
    fused_opt = make_optimizer("sgd", list(fused.parameters()), 0.1, 0.01)
    assert isinstance(fused_opt, SGDInBackward)
    _one_step(fused, fused_opt)
    _one_step(plain, torch.optim.SGD(plain.parameters(), lr=0.1, weight_decay=0.01))
    assert all(p.grad is None for p in fused.parameters())
    for a, b in zip(fused.parameters(), plain.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-7)


def test_windows_split_and_order() -> None:
    ids = list(range(1000, 1000 + 32 * 10 + 5))
    w = make_windows(ids, ctx=32, val_split=0.2, seed=3)
    assert w.train.shape == (8, 33) and w.val.shape == (2, 33)
    starts = sorted(int(x[0]) for x in torch.cat([w.train, w.val]))
    assert starts == [1000 + 32 * i for i in range(10)]  # every window once
    assert all(torch.equal(x[1:], x[:-1] + 1) for x in w.train)  # labels = inputs shifted
    assert torch.equal(make_windows(ids, 32, 0.2, 3).val, w.val)  # seeded
    assert not torch.equal(make_windows(ids, 32, 0.2, 4).val, w.val)
    assert make_windows(ids, 32, 0.05, 3).val.shape[0] == 1  # ⌈0.5⌉
    assert make_windows(ids, 32, 0.0, 3).val.shape[0] == 0
    assert epoch_order(8, 3, 1) == epoch_order(8, 3, 1) != epoch_order(8, 3, 2)
    assert sorted(epoch_order(8, 3, 1)) == list(range(8))


def test_running_stats_standard_errors() -> None:
    stats = RunningStats()
    stats.add([1.0, 2.0], num_correct=3, num_tokens=4)
    stats.add([3.0], num_correct=1, num_tokens=4)
    assert stats.loss == 2.0
    assert stats.loss_se == pytest.approx(1.0 / math.sqrt(3))  # sample sd 1, n 3
    assert stats.accuracy == 0.5
    assert stats.accuracy_se == pytest.approx(math.sqrt(0.25 / 7))
    assert "loss=2.00000±0.57735 acc=50.00±18.90%" in stats.postfix()
    assert RunningStats().summary()["loss"] is None  # NaN never reaches metrics.json
