"""Writing a trained model as a Hugging Face directory, and writing directories safely.

The directory is what `worker.loaders.hf.load_hf_dir` (so `slotmesh generate` and the
worker) reads: config.json (the source's HF config, `architectures` kept, dtype float32),
model.safetensors (HF tensor names, unfused by `registry.hf_state_dict`), tokenizer.json
+ tokenizer_config.json (the source tokenizer, GGUF-embedded ones included, with its BOS
policy and chat template) and generation_config.json (BOS and every EOS id).

Directories appear whole or not at all: they are written to a temporary sibling and
renamed into place, and the temporary one is removed if anything fails.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file

from worker.loaders.model_files import ModelFiles
from worker.models.decoder import DecoderModel
from worker.models.registry import hf_state_dict
from worker.vocab.errors import InvalidRequestError

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "generation_config.json")


def write_model_dir(path: Path, model: DecoderModel, source: ModelFiles) -> None:
    """The HF files of `model`, with config and tokenizer from `source`, into `path`."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    save_file(hf_state_dict(model), str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in source.config.items() if not k.startswith("_")}
    write_json(path / "config.json", config | {"torch_dtype": dtype, "dtype": dtype})
    source.tokenizer.save_hf_dir(path)
    write_json(path / "generation_config.json", {
        "bos_token_id": source.tokenizer.bos_token_id,
        "eos_token_id": list(source.eos_token_ids),
    })


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def check_output_dir(out: Path) -> None:
    """--out must be new (or an empty directory) under a directory we can write in."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidRequestError("out", f"{out} already exists and is not an empty directory")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidRequestError("out", f"{parent} is not a directory")
    try:  # a probe, not os.access: root passes access() on read-only mounts too
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".slotmesh-probe-"))
    except OSError as exc:
        raise InvalidRequestError("out", f"cannot write in {parent} ({exc.strerror})") from None


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """A temporary directory beside `target`, renamed onto it when the block succeeds.

    An existing `target` (an empty --out, or an older checkpoint) is replaced only after
    the new one is complete; on any exception the temporary directory is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, target: Path) -> None:
    if not target.exists():
        os.rename(src, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    os.rename(src, target)
    shutil.rmtree(old, ignore_errors=True)
