"""The one thing every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from worker.tokenizer import Tokenizer


@dataclass(slots=True, kw_only=True)
class ModelFiles:
    """A model as loaded from disk, before it is turned into a module.

    config: a Hugging Face config.json-style dict; `config["architectures"][0]` keys the
        model registry. GGUF metadata is translated into the same keys.
    tensors: HF parameter names -> CPU tensors (float32 after GGUF dequantisation, or the
        safetensors dtype). GGUF tensors are renamed and un-permuted into HF layout.
        Under a quantized weights policy a GGUF's 2-D weights are
        `worker.quantize.QuantizedTensor`s instead (the model registry packs them).
    tokenizer: the working tokenizer with special tokens and chat template.
    eos_token_ids: every id that ends a generation (generation_config + tokenizer).
    name: a short display name; fingerprint: a stable hash of weights+config identity.
    """

    config: dict
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]
    name: str
    fingerprint: str
    source_path: str = ""
    extra: dict = field(default_factory=dict)
