"""The working tokenizer: encode/decode, chat templates and streaming detokenisation.

Owns one `tokenizers.Tokenizer` (built from GGUF metadata by `loaders.gguf_tokenizer` or
read from an HF directory) plus the facts the engine needs around it: BOS/EOS ids, whether
BOS is prepended, the jinja chat template. Hands the engine token ids and the API text.

BOS policy lives in the backend's post-processor: `encode(text)` adds exactly what the
model asks for (llama.cpp's `add_bos_token`), and special tokens written in the text are
always parsed as specials (llama.cpp's `parse_special=true`, which its server uses).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

import tokenizers
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from worker.vocab.errors import InvalidRequestError, ModelLoadError

REPLACEMENT_CHAR = "\ufffd"
# vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: prompt tokens re-decoded as context.
_PREFIX_CONTEXT_TOKENS = 5


class Tokenizer:
    """A `tokenizers.Tokenizer` with the model's special ids and chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id: int | None,
                 eos_token_id: int | None, chat_template: str | None = None) -> None:
        self.backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_id = eos_token_id
        self._chat_template = chat_template or None

    # ------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode does not), so a long prompt
        # tokenized in a thread does not stall the worker's event loop and other streams.
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @cached_property
    def add_bos(self) -> bool:
        """Whether `encode(text)` prepends BOS (probed through the post-processor)."""
        ids = self.encode("a", add_special_tokens=True)
        return self._bos_token_id is not None and bool(ids) and ids[0] == self._bos_token_id

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        decoder = self.backend.get_added_tokens_decoder()
        return frozenset(i for i, token in decoder.items() if token.special)

    def token_text(self, token_id: int | None) -> str:
        """The vocabulary string of one id ('' for None or out-of-range)."""
        if token_id is None:
            return ""
        return self.backend.id_to_token(token_id) or ""

    # ------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict],
                            add_generation_prompt: bool = True) -> str:
        """Render the model's jinja template as transformers does (same env and vars)."""
        if self._chat_template is None:
            raise InvalidRequestError("chat", "this model has no chat template; "
                                      "send a plain prompt instead")
        try:
            return _compile_template(self._chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.token_text(self._bos_token_id),
                eos_token=self.token_text(self._eos_token_id),
            )
        except TemplateError as exc:
            raise InvalidRequestError("chat", f"chat template failed: {exc}") from exc

    # ------------------------------------------------------------ persistence

    def to_json(self) -> str:
        meta = {"bos_token_id": self._bos_token_id, "eos_token_id": self._eos_token_id,
                "chat_template": self._chat_template}
        return json.dumps({"meta": meta, "tokenizer": self.backend.to_str()})

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        blob = json.loads(text)
        return cls(tokenizers.Tokenizer.from_str(blob["tokenizer"]), **blob["meta"])

    def save_hf_dir(self, path: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json that `from_hf_dir` reads back as this
        tokenizer (same ids, same BOS policy, same chat template)."""
        path = Path(path)
        self.backend.save(str(path / "tokenizer.json"))
        config = {
            "bos_token": self.token_text(self._bos_token_id) or None,
            "eos_token": self.token_text(self._eos_token_id) or None,
            "add_bos_token": self.add_bos,
            "chat_template": self._chat_template,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """tokenizer.json (+ tokenizer_config.json, special_tokens_map.json if present)."""
        path = Path(path)
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ModelLoadError(f"{path}: cannot read tokenizer.json: {exc}") from exc
        config = _read_json(path / "tokenizer_config.json")
        specials = _read_json(path / "special_tokens_map.json")
        bos = _token_id(backend, config.get("bos_token") or specials.get("bos_token"))
        eos = _token_id(backend, config.get("eos_token") or specials.get("eos_token"))
        template = _hf_chat_template(path, config)
        _apply_hf_bos_policy(backend, config, bos)
        return cls(backend, bos_token_id=bos, eos_token_id=eos, chat_template=template)


# ---------------------------------------------------------------- helpers


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str):
    """transformers' environment: sandboxed, trim/lstrip blocks, loopcontrols, tojson."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _tojson(value, indent: int | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _token_id(backend: tokenizers.Tokenizer, token) -> int | None:
    if isinstance(token, dict):  # {"content": "<s>", ...}
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _hf_chat_template(path: Path, config: dict) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def _apply_hf_bos_policy(backend: tokenizers.Tokenizer, config: dict, bos: int | None) -> None:
    """tokenizer_config's `add_bos_token` wins over tokenizer.json's post-processor."""
    wanted = config.get("add_bos_token")
    if wanted is None or bos is None:
        return
    probe = backend.encode("a", add_special_tokens=True).ids
    has_bos = bool(probe) and probe[0] == bos
    if wanted and not has_bos:
        bos_text = backend.id_to_token(bos)
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos_text} $A", pair=f"{bos_text} $A $B",
            special_tokens=[(bos_text, bos)])
    elif not wanted and has_bos:
        backend.post_processor = None


class IncrementalDetokenizer:
    """Streams text for generated ids: vLLM's prefix/read offset technique.

    Each `push` decodes the window `ids[prefix_offset:]` and the shorter `ids[prefix_offset:
    read_offset]`; the difference is new text. Decoding a few tokens of context keeps
    SentencePiece's leading-space rules and byte-fallback tokens right, and a delta ending
    in U+FFFD is held back until the next token completes the UTF-8 character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int],
                 skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids[-_PREFIX_CONTEXT_TOKENS:])  # context + generated
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self._text_parts: list[str] = []

    def push(self, token_id: int) -> str:
        """Append one generated id; returns the text it makes final ('' if none yet)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT_CHAR):
            return ""  # incomplete UTF-8 sequence (or nothing visible) so far
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._text_parts.append(delta)
        return delta

    def flush(self) -> str:
        """At the end of a sequence: whatever is held back (e.g. a lone invalid byte)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset],
                                       self.skip_special_tokens)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], self.skip_special_tokens)
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset = self.read_offset = len(self.ids)
        if delta:
            self._text_parts.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All generated text made final so far."""
        return "".join(self._text_parts)
