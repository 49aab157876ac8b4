"""Resumable checkpoints: a servable HF model directory plus the optimizer and the loop.

Layout of `<out>.checkpoint/` (written whole, replacing an older one):
  config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
  generation_config.json   the model so far (export.write_model_dir: `slotmesh generate`
                           can serve a checkpoint as it is)
  optimizer.safetensors    the optimizer's per-parameter state, "<index>.<key>" (empty
                           for SGD)
  trainer_state.json       format version, the run's FinetuneConfig, where the loop is
                           (epoch, windows done, running stats, history) and the SHA-256
                           of the data file
Nothing is pickled: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from worker.loaders.hf import load_hf_dir
from worker.loaders.model_files import ModelFiles
from worker.models.decoder import DecoderModel
from worker.training.export import staged_dir, write_json, write_model_dir
from worker.training.optim import flat_state
from worker.vocab.errors import InvalidRequestError

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def default_resume_dir(out: Path) -> Path:
    """Where Ctrl-C saves: a sibling of --out, `<out>.checkpoint`."""
    return out.with_name(out.name + ".checkpoint")


def save_resume_state(path: Path, model: DecoderModel, source: ModelFiles,
                    optimizer: torch.optim.Optimizer, state: dict) -> None:
    with staged_dir(path) as tmp:
        write_model_dir(tmp, model, source)
        save_file(flat_state(optimizer), str(tmp / OPTIMIZER_FILE))
        write_json(tmp / STATE_FILE, {"format_version": FORMAT_VERSION} | state)


@dataclass(slots=True)
class SavedRun:
    source: ModelFiles  # the model so far, as the HF loader reads it
    optimizer_state: dict[str, torch.Tensor]
    state: dict  # trainer_state.json


def read_resume_state(path: Path) -> SavedRun:
    """InvalidRequestError unless `path` is a checkpoint this version wrote."""
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        raise InvalidRequestError(
            "resume", f"{path}: not a slotmesh finetune checkpoint (no readable "
                      f"{STATE_FILE})") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise InvalidRequestError("resume", f"{path}: checkpoint format "
                                            f"{state.get('format_version')}, expected "
                                            f"{FORMAT_VERSION}")
    try:
        optimizer_state = load_file(str(path / OPTIMIZER_FILE))
    except (SafetensorError, OSError) as exc:
        raise InvalidRequestError("resume", f"{path}: unreadable {OPTIMIZER_FILE} ({exc})") \
            from None
    source = load_hf_dir(path, name=state["config"]["model"])
    return SavedRun(source=source, optimizer_state=optimizer_state, state=state)
