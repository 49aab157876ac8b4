"""Checksums and MACs of slotmesh's binary formats (snapshots, prompt-cache block records).

Without a cluster key a blob ends with the SHA-256 of its bytes (format version 1), which
catches damage. With one (`--cluster-key-file`), it ends with HMAC-SHA-256 under the key
(format version 2): a blob altered or forged by anyone without the key, in Redis, on the
wire or in a file, is rejected before anything is allocated. A worker with a key refuses
version-1 blobs; a worker without one cannot check, and refuses, version 2.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from worker.vocab.errors import (
    DataLossError,
    InvalidRequestError,
    PermissionDeniedError,
    PreconditionError,
)

PLAIN = 1  # SHA-256
KEYED = 2  # HMAC-SHA-256 under the cluster key
DIGEST_BYTES = 32
MIN_KEY_BYTES = 32


def new_digest(key: bytes | None):
    """The running hash a writer feeds every byte before the trailer."""
    return hmac.new(key, digestmod=hashlib.sha256) if key else hashlib.sha256()


def version_for(key: bytes | None) -> int:
    return KEYED if key else PLAIN


def verify(body: bytes | memoryview, trailer: bytes, version: int, key: bytes | None,
           what: str) -> None:
    """Raise unless `trailer` authenticates `body` the way `version` says, and that is
    the way this process requires."""
    if version == KEYED and not key:
        raise PreconditionError(f"{what}: made by a cluster with a key; this worker has "
                                "none (--cluster-key-file)")
    if version == PLAIN and key:
        raise PermissionDeniedError(f"{what}: not authenticated; this cluster requires a "
                                    "MAC under its key")
    digest = new_digest(key)
    digest.update(body)
    if not hmac.compare_digest(digest.digest(), trailer):
        raise DataLossError(f"{what}: " + ("MAC does not verify (altered, forged, or made "
                                           "with another key)" if key else
                                           "checksum mismatch (damaged in transit or on "
                                           "disk)"))


def load_key(path: str | Path, flag: str = "--cluster-key-file") -> bytes:
    """A key file: at least 32 random bytes, raw or as hex (`openssl rand -hex 32`)."""
    try:
        raw = Path(path).read_bytes().strip()
    except OSError as e:
        raise InvalidRequestError(flag, f"cannot read {path}: {e.strerror}") from e
    try:
        key = bytes.fromhex(raw.decode("ascii"))
    except ValueError:
        key = raw
    if len(key) < MIN_KEY_BYTES:
        raise InvalidRequestError(flag, f"the key must be at least {MIN_KEY_BYTES} bytes "
                                        f"(e.g. `openssl rand -hex 32`); {path} has "
                                        f"{len(key)}")
    return key
