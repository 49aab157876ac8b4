"""Hugging Face model directories: config.json, safetensors (single or sharded index),
tokenizer.json and generation_config.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from worker.loaders.model_files import ModelFiles
from worker.tokenizer import Tokenizer
from worker.vocab.errors import ModelLoadError


def load_hf_dir(path: str | Path, name: str | None = None) -> ModelFiles:
    root = Path(path)
    config = _read_json(root / "config.json")
    files = _weight_files(root)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{f}: unreadable safetensors file ({e})") from None
    tokenizer = Tokenizer.from_hf_dir(root)
    return ModelFiles(
        config=config,
        tensors=tensors,
        tokenizer=tokenizer,
        eos_token_ids=_eos_ids(root, config, tokenizer),
        name=name or root.name,
        fingerprint=_fingerprint(root / "config.json", files),
        source_path=str(root),
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} not found: not a Hugging Face model directory") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e})") from None


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map", {})
        return [root / f for f in sorted(set(weight_map.values()))]
    single = root / "model.safetensors"
    if single.exists():
        return [single]
    raise ModelLoadError(f"{root}: no model.safetensors or model.safetensors.index.json")


def _eos_ids(root: Path, config: dict, tokenizer: Tokenizer) -> tuple[int, ...]:
    ids: list[int] = []
    gen = root / "generation_config.json"
    sources = [_read_json(gen).get("eos_token_id")] if gen.exists() else []
    sources += [config.get("eos_token_id"), tokenizer.eos_token_id]
    for value in sources:
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v not in ids:
                ids.append(int(v))
    return tuple(ids)


def _fingerprint(config_path: Path, files: list[Path]) -> str:
    """sha256 over config.json and every weight file's bytes: same bytes, same model."""
    h = hashlib.sha256(config_path.read_bytes())
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()
