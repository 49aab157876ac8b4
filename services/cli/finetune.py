"""`slotmesh finetune`: flags → FinetuneConfig → run.

services/cli/main.py registers this with `add_finetune_parser(sub)` (the benchmark's
flags are in services/tools/bench_finetune.py); bad input raises SlotmeshError,
which the entry point turns into one message and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.cli.flags import add_device_flags, default_of
from worker.training.config import FinetuneConfig
from worker.vocab.errors import InvalidRequestError


def _default(name: str):
    """A FinetuneConfig field's default: each default is written once, there."""
    return default_of(FinetuneConfig, name)


_DESCRIPTION = """\
Fine-tune a served model on a UTF-8 text file and write a Hugging Face directory
(config.json, model.safetensors, tokenizer.json, generation_config.json, metrics.json)
that `slotmesh generate --model DIR` and the worker load as they are. The text is
tokenized with the model's tokenizer, cut into windows of --ctx tokens, shuffled by
--seed and split into train and validation by --val-split. Each epoch shows a progress
bar for training and for validation (loss ± standard error, next-token accuracy ±
standard error, elapsed, ETA); a validation pass before training gives the baseline.

Ctrl-C stops after the current step, saves a resumable checkpoint to OUT.checkpoint and
exits with code 130; `slotmesh finetune --resume OUT.checkpoint` continues the same run
(model, data, settings and --out come from the checkpoint; other flags are ignored) and
removes OUT.checkpoint once OUT is written. Bad input exits with code 2 before anything
is written. Flags, schedule, memory and metrics.json: docs/finetune.md."""


def add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on a text file (docs/finetune.md)",
                       description=_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="known name (e.g. smollm2-135m), a GGUF file (dequantised "
                                   "to float32) or a Hugging Face directory")
    p.add_argument("--data", type=Path, help="UTF-8 text file to train on")
    p.add_argument("--out", type=Path, help="output directory; must not exist or be empty")
    p.add_argument("--resume", type=Path, default=None, metavar="DIR",
                   help="continue an interrupted run from its checkpoint directory")
    p.add_argument("--optimizer", default=_default("optimizer"),
                   help="adamw or sgd (SGD keeps no moment buffers) (default: %(default)s)")
    p.add_argument("--lr", type=float, default=_default("lr"),
                   help="learning rate (default: %(default)s)")
    lr_min = p.add_mutually_exclusive_group()
    lr_min.add_argument("--lr-min", type=float, default=None,
                        help="halve the rate from --lr down to this over --decay-epochs "
                             "(default: constant rate)")
    lr_min.add_argument("--lr-halvings", type=float, default=None, metavar="N",
                        help="instead of --lr-min: halve N times over --decay-epochs")
    p.add_argument("--decay-epochs", type=float, default=None, metavar="E",
                   help="epochs over which the rate decays (default: all of them)")
    p.add_argument("--weight-decay", type=float, default=_default("weight_decay"),
                   help="weight decay, for AdamW and SGD alike (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=_default("epochs"), help="(default: %(default)s)")
    p.add_argument("--val-split", type=float, default=_default("val_split"),
                   help="fraction of windows held out for validation, in [0, 0.5] "
                        "(default: %(default)s)")
    p.add_argument("--ctx", type=int, default=_default("ctx"),
                   help="tokens per training window (default: %(default)s)")
    p.add_argument("--batch", type=int, default=_default("batch"),
                   help="windows per forward/backward pass (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=_default("grad_accum"), metavar="G",
                   help="passes per optimizer step (default: %(default)s)")
    p.add_argument("--seed", type=int, default=_default("seed"),
                   help="shuffles the windows and each epoch's order (default: %(default)s)")
    p.add_argument("--train-only", action="append", default=[], metavar="PATTERN",
                   help="train only parameters whose name matches this regex (repeatable), "
                        "e.g. 'layers\\.29\\.' or 'norm'; the rest are frozen")
    add_device_flags(p)
    p.set_defaults(func=run_finetune_command)


def finetune_config(args: argparse.Namespace):
    from worker.loaders.hub import default_cache_dir
    from worker.training.config import FinetuneConfig

    for flag in ("model", "data", "out"):
        if getattr(args, flag) is None:
            raise InvalidRequestError(flag, f"--{flag} is required (unless --resume)")
    return FinetuneConfig(
        model=args.model, data=args.data, out=args.out,
        cache_dir=args.cache_dir or default_cache_dir(os.environ),
        optimizer=args.optimizer, lr=args.lr, lr_min=args.lr_min,
        lr_halvings=args.lr_halvings, decay_epochs=args.decay_epochs,
        weight_decay=args.weight_decay, epochs=args.epochs, val_split=args.val_split,
        ctx=args.ctx, batch=args.batch, grad_accum=args.grad_accum, seed=args.seed,
        train_only=tuple(args.train_only), device=args.device,
    )


def run_finetune_command(args: argparse.Namespace) -> int:
    from worker.training.run import EXIT_INTERRUPTED, finetune

    config = None if args.resume is not None else finetune_config(args)
    try:
        result = finetune(config, sys.stdout, resume=args.resume)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("\ninterrupted; no checkpoint written", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if result.interrupted else 0
