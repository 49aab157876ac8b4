"""GGUF tokenizer metadata -> `Tokenizer`, in about a second, cached beside the file.

Owns the translation of llama.cpp's `tokenizer.ggml.*` keys into a `tokenizers` pipeline
that tokenizes as llama.cpp does:
  - `gpt2`: byte-level BPE from the file's tokens and merges, split first by the regexes
    llama.cpp uses for `tokenizer.ggml.pre` (llama-vocab.cpp);
  - `llama` (SentencePiece, e.g. gemma3): BPE whose merges are derived from the token
    scores (SentencePieceExtractor's way: every split of a token into two vocabulary
    pieces, best score first), `<0xNN>` byte fallback, spaces as U+2581, and a prefix
    space per text fragment only if `add_space_prefix` is set (llama.cpp's SPM session).
Control tokens become special added tokens; user-defined ones (gemma's newline and space
runs, `<tool_call>`) become plain added tokens, matched whole in the text as llama.cpp
does. BOS/EOS policy is a TemplateProcessing post-processor.

The built tokenizer is cached as `<file>.tokenizer.json`, keyed by the file's SHA-256 and
size and by `_CACHE_VERSION`; an unwritable directory just means no cache.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.processors import TemplateProcessing

from worker.loaders.hub import file_sha256
from worker.tokenizer import Tokenizer
from worker.vocab.errors import ModelLoadError

_CACHE_VERSION = 1
SPACE = "\u2581"

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, as llama-vocab.cpp applies them (each splits the previous pieces).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "gpt-2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),  # also starcoder, refact, command-r, codeshell...
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "deepseek-r1-qwen": (_QWEN2_SPLIT,),
}
# llama.cpp looks whole words up in the vocabulary before merging only for these.
_IGNORE_MERGES = {"llama-bpe", "llama3"}
# Tokens llama.cpp treats as end-of-generation when present (llama-vocab.cpp EOG list).
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|eom_id|>", "<EOT>", "<|end_of_text|>", "<|return|>", "<|call|>")


def build_gguf_tokenizer(path: Path, metadata: dict) -> Tokenizer:
    """The tokenizer of one GGUF file: from the cache beside it, else built and cached."""
    cache = path.with_name(path.name + ".tokenizer.json")
    key = {"sha256": file_sha256(path), "size": path.stat().st_size,
           "version": _CACHE_VERSION}
    cached = _load_cache(cache, key)
    if cached is not None:
        return cached
    tokenizer = tokenizer_from_metadata(metadata)
    _store_cache(cache, key, tokenizer)
    return tokenizer


def tokenizer_from_metadata(md: dict) -> Tokenizer:
    kind = md.get("tokenizer.ggml.model")
    builder = _BUILDERS.get(kind)
    if builder is None or "tokenizer.ggml.tokens" not in md:
        raise ModelLoadError(f"GGUF tokenizer {kind!r} is not supported; "
                             f"supported: {', '.join(sorted(_BUILDERS))}")
    backend = builder(md)
    _add_special_tokens(backend, md)
    backend.post_processor = _post_processor(md)
    return Tokenizer(backend, bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
                     eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
                     chat_template=md.get("tokenizer.chat_template"))


def eos_token_ids(md: dict) -> tuple[int, ...]:
    """eos + eot/eom ids + control tokens llama.cpp treats as end-of-generation."""
    ids = [md.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    tokens = md.get("tokenizer.ggml.tokens", [])
    types = md.get("tokenizer.ggml.token_type") or [CONTROL] * len(tokens)
    index = {text: i for i, text in enumerate(tokens) if text in _EOG_TEXTS}
    ids += [i for i in index.values() if types[i] == CONTROL]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


# ---------------------------------------------------------------- builders


def _byte_level_bpe(md: dict) -> Backend:
    tokens = md["tokenizer.ggml.tokens"]
    pre = md.get("tokenizer.ggml.pre", "gpt-2")
    vocab = _vocab(tokens)
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES))
    splits = PRE_TOKENIZER_SPLITS.get(pre, (_GPT2_SPLIT,))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(md: dict) -> Backend:
    tokens = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = md.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(vocab=_vocab(tokens), merges=_merges_from_scores(tokens, scores, types),
                       unk_token=tokens[unk_id] if unk_id is not None else None,
                       byte_fallback=True, fuse_unk=True)
    backend = Backend(model)
    add_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    # Prepend runs per text fragment between added tokens, as llama.cpp's SPM session
    # prefixes a space to every raw-text fragment that follows a token.
    prefix = [normalizers.Prepend(SPACE)] if add_prefix else []
    backend.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if add_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return backend


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, text in enumerate(tokens):
        vocab.setdefault(text, i)  # first id wins for (rare) duplicate strings
    return vocab


def _merges_from_scores(tokens: list[str], scores: list[float],
                        types: list[int]) -> list[tuple[str, str]]:
    """Every split of a mergeable token into two vocabulary pieces, highest score first.

    llama.cpp's SPM merges the adjacent pair whose concatenation has the best score;
    ranking merges by that score makes HF's BPE pick the same pair.
    """
    vocab = _vocab(tokens)
    ranked = []
    for i, text in enumerate(tokens):
        if len(text) < 2 or types[i] in (CONTROL, BYTE, UNUSED):
            continue
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


_BUILDERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}


# ---------------------------------------------------------------- specials, BOS/EOS


def _add_special_tokens(backend: Backend, md: dict) -> None:
    tokens = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type") or []
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types, strict=False) if kind == CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=False) if kind == USER_DEFINED]
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def _post_processor(md: dict) -> TemplateProcessing | None:
    """BOS/EOS as llama.cpp adds them; `add_bos_token` defaults to True only for SPM."""
    tokens = md["tokenizer.ggml.tokens"]
    default_bos = md.get("tokenizer.ggml.model") == "llama"
    bos_id, eos_id = (md.get("tokenizer.ggml.bos_token_id"),
                      md.get("tokenizer.ggml.eos_token_id"))
    add_bos = md.get("tokenizer.ggml.add_bos_token", default_bos) and bos_id is not None
    add_eos = md.get("tokenizer.ggml.add_eos_token", False) and eos_id is not None
    if not (add_bos or add_eos):
        return None
    head = [tokens[bos_id]] if add_bos else []
    tail = [tokens[eos_id]] if add_eos else []
    specials = ([(tokens[bos_id], bos_id)] if add_bos else []) + (
        [(tokens[eos_id], eos_id)] if add_eos else [])
    return TemplateProcessing(single=" ".join([*head, "$A", *tail]),
                              pair=" ".join([*head, "$A", *tail, *head, "$B", *tail]),
                              special_tokens=list(dict.fromkeys(specials)))


# ---------------------------------------------------------------- cache


def _load_cache(cache: Path, key: dict) -> Tokenizer | None:
    try:
        blob = json.loads(cache.read_text())
        if blob.get("key") != key:
            return None
        return Tokenizer.from_json(blob["tokenizer"])
    except Exception:  # noqa: BLE001 - missing, stale or corrupt cache: rebuild
        return None


def _store_cache(cache: Path, key: dict, tokenizer: Tokenizer) -> None:
    """Atomic write; silently nothing if the directory is not writable."""
    try:
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.name, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "tokenizer": tokenizer.to_json()}, f)
        os.replace(tmp, cache)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
