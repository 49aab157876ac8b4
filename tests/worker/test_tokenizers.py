"""GGUF tokenizers against transformers' tokenizer from the same GGUF, chat templates and
streaming detokenisation. Fetches the models once into the shared test cache."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

import pytest

from tests.paths import model_cache_dir
from worker.loaders.gguf import read_gguf_header
from worker.loaders.gguf_tokenizer import build_gguf_tokenizer, tokenizer_from_metadata
from worker.loaders.hub import fetch_model
from worker.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from worker.vocab.errors import InvalidRequestError

MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]

TRICKY = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "multiple    spaces   inside",
    "tabs\tand\ttabs",
    "new\nline\n\nand\n\n\nmore",
    "\n starts with newline",
    "numbers 1 12 123 1234 12345 3.14159 -42 1e10",
    "2024-11-28T09:03:00Z",
    "naïve café résumé Zürich",
    "emoji 🤗🚀👍🏽 family 👨‍👩‍👧‍👦",
    "中文测试，你好世界！",
    "日本語のテキストとカタカナ",
    "한국어 텍스트",
    "Ελληνικά и русский текст",
    "مرحبا بالعالم",
    "def f(x):\n    return x ** 2  # square\n",
    "if (a && b) { return c[i]; }",
    "<html><body><table><tr><td>cell</td></tr></table></body></html>",
    "don't can't I'm you'll we've they'd",
    "DON'T CAN'T",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after",
    "<start_of_turn>user\nhello<end_of_turn>",
    "<bos>bos in text",
    "zero\u200bwidth and nbsp\u00a0here",
    "🤗",
    "a",
    "",
    "ŉ weird ǅ letters ﬁ ligature",
    "repeated !!!!!!!! ???? ....",
]


def cache_dir() -> Path:
    return model_cache_dir()


@cache
def our_tokenizer(name: str):
    path = fetch_model(name, cache_dir())
    return build_gguf_tokenizer(path, read_gguf_header(path).metadata)


def reference_ids(name: str) -> dict[str, list[int]]:
    """transformers' ids for TRICKY, memoised beside the model (building transformers'
    tokenizer from a GGUF takes 10-55 s); the key covers texts, file and version."""
    transformers = pytest.importorskip("transformers")
    path = fetch_model(name, cache_dir())
    key = hashlib.sha256(json.dumps([TRICKY, transformers.__version__,
                                     path.stat().st_size]).encode()).hexdigest()
    memo = path.with_name(f"{path.name}.hf-ids-{key[:16]}.json")
    if memo.exists():
        return json.loads(memo.read_text())
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # BOS: llama.cpp adds BOS only if tokenizer.ggml.add_bos_token says so (gemma3: yes,
    # smollm2 / qwen2.5: no), so ids are compared without specials; BOS checked below.
    ids = {text: theirs.encode(text, add_special_tokens=False) for text in TRICKY}
    memo.write_text(json.dumps(ids))
    return ids


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    """(name, our Tokenizer, transformers' ids for TRICKY) for one model."""
    return request.param, our_tokenizer(request.param), reference_ids(request.param)


@pytest.mark.slow  # loads the real models' tokenizers and transformers'
@pytest.mark.parametrize("text", TRICKY)
def test_encode_matches_transformers(pair, text):
    name, ours, reference = pair
    assert ours.encode(text, add_special_tokens=False) == reference[text], (name, text)


@pytest.mark.slow  # loads the real models' tokenizers and transformers'
def test_bos_policy_follows_gguf(pair):
    name, ours, _ = pair
    ids = ours.encode("hi")
    assert ours.add_bos == (name == "gemma3-270m")
    assert (ids[0] == ours.bos_token_id) == ours.add_bos
    assert ours.encode("hi", add_special_tokens=False) == ids[int(ours.add_bos):]


@pytest.mark.slow  # loads the real models' tokenizers and transformers'
@pytest.mark.parametrize("text", TRICKY)
def test_decode_round_trips(pair, text):
    _, ours, _ = pair
    assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


@pytest.mark.slow  # loads the real models' tokenizers and transformers'
def test_special_tokens_in_text_are_single_ids(pair):
    name, ours, _ = pair
    marker = "<end_of_turn>" if name.startswith("gemma") else "<|im_end|>"
    ids = ours.encode(f"x{marker}y", add_special_tokens=False)
    assert ours.backend.token_to_id(marker) in ids
    assert ours.backend.token_to_id(marker) in ours.special_token_ids
    assert marker not in ours.decode(ids, skip_special_tokens=True)


STREAM_TEXTS = [
    "🤗🚀👍🏽 emoji 👨‍👩‍👧‍👦 soup 🎉🎉",
    "中文测试，你好世界！日本語のテキスト",
    " leading and  double  spaces\n\n  indented",
    "mixed ünïcödé, 数字 123 and 😀 at the end 😀",
]


@pytest.mark.slow  # loads the real models' tokenizers and transformers'
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_detokenizer(pair, text):
    _, ours, _ = pair
    prompt = ours.encode("Prompt: ")
    generated = ours.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(ours, prompt)
    deltas = [detok.push(t) for t in generated]
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    expected = ours.decode(prompt + generated)[len(ours.decode(prompt)):]
    assert "".join(deltas) == detok.text == expected
    fresh = IncrementalDetokenizer(ours, [])
    assert "".join(fresh.push(t) for t in generated) == ours.decode(generated)


def test_byte_fallback_tokens_stream_whole_characters():
    """gemma3 spells rare characters as <0xNN> byte tokens; no partial char may leak."""
    ours = our_tokenizer("gemma3-270m")
    byte_ids = [ours.backend.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    detok = IncrementalDetokenizer(ours, [])
    assert [detok.push(t) for t in byte_ids] == ["", "", "", "😀"]


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-0.5b"])
def test_chatml_template_renders(name):
    tokenizer = our_tokenizer(name)
    text = tokenizer.apply_chat_template(CHAT)
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    no_prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")


def test_no_template_is_invalid_request():
    tokenizer = our_tokenizer("gemma3-270m")
    with pytest.raises(InvalidRequestError):
        tokenizer.apply_chat_template(CHAT)


def test_tokenizer_cache_round_trip(tmp_path):
    src = fetch_model("smollm2-135m", cache_dir())
    md = read_gguf_header(src).metadata
    built = tokenizer_from_metadata(md)
    again = type(built).from_json(built.to_json())
    assert again.encode(TRICKY[11]) == built.encode(TRICKY[11])
    assert again.chat_template == built.chat_template
