"""Registry records signed under the cluster key: Redis is storage, not a trust anchor.

Whoever can write to Redis could otherwise plant a worker record (an address that then
receives client prompts and the cluster credential) or a router record (one that
receives forwarded Drain/Migrate calls and the peer token). So with a cluster key every
worker and router record carries an HMAC, and every reader checks it before it uses the
record. What is signed, canonically:

    b"slotmesh-record-v1\\0" + redis key + b"\\0"
      + JSON of every field but "mac" (sorted keys, no spaces, ASCII)

The Redis key inside the MAC binds a record to the key it was written under: a valid
record copied under another worker's (or a router's) key does not verify. The signed
fields include `expires_ms` (written as now + the registry TTL), so a record saved and
written back after its worker is gone stops verifying MAX_CLOCK_SKEW_MS after it
expired, whatever TTL Redis was given.

Without a cluster key records are written unsigned and read unchecked: Redis is then
trusted, as the rest of a keyless cluster is (local development; docs/security.md). A
reader without a key refuses a signed record, as worker/vocab/integrity.py refuses a
keyed snapshot: it cannot check it, and its process is misconfigured.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, TypeVar

from services.metadata.records import CorruptRecordError, from_dict, parse_object, to_dict

DOMAIN = b"slotmesh-record-v1\0"
MAC_FIELD = "mac"
EXPIRES_FIELD = "expires_ms"
MAX_CLOCK_SKEW_MS = 30_000  # clocks of writer and reader may differ this much
T = TypeVar("T")


class UnverifiedRecordError(CorruptRecordError):
    """A registry record without a valid MAC under this process's cluster key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":"), sort_keys=True,
                      ensure_ascii=True).encode("ascii")


def record_mac(key: bytes, redis_key: str, fields: dict[str, Any]) -> str:
    """Hex HMAC-SHA-256 of the signed payload (`fields` without the mac)."""
    payload = DOMAIN + redis_key.encode() + b"\0" + _canonical(fields)
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def sign(record: Any, *, key: bytes | None, redis_key: str, expires_ms: int) -> str:
    """The JSON value to store under `redis_key`: the record's fields, and with a key its
    expiry and MAC (readers without a key ignore both)."""
    fields = to_dict(record)
    if key is None:
        return _canonical(fields).decode()
    fields[EXPIRES_FIELD] = expires_ms
    fields[MAC_FIELD] = record_mac(key, redis_key, fields)
    return _canonical(fields).decode()


def verify(cls: type[T], raw: bytes | str, *, key: bytes | None, redis_key: str,
           now_ms: int) -> T:
    """The record stored under `redis_key`, once its MAC verifies; UnverifiedRecordError
    (a CorruptRecordError) when it does not, CorruptRecordError when it is malformed."""
    try:
        data = parse_object(cls, raw)
    except CorruptRecordError as e:
        if key is None:
            raise
        raise UnverifiedRecordError(f"unsigned ({e})") from e
    mac = data.pop(MAC_FIELD, None)
    if key is None:
        if mac is not None:
            raise UnverifiedRecordError("signed under a cluster key; this process has none "
                                        "(--cluster-key-file)")
        return from_dict(cls, data)
    if not isinstance(mac, str):
        raise UnverifiedRecordError("unsigned" if mac is None else "mac is not a string")
    if not hmac.compare_digest(mac.encode("ascii", "replace"),
                               record_mac(key, redis_key, data).encode()):
        raise UnverifiedRecordError("MAC does not verify (altered, forged, moved from "
                                    "another key, or signed with another key)")
    expires = data.get(EXPIRES_FIELD)
    if not isinstance(expires, int) or isinstance(expires, bool):
        raise UnverifiedRecordError("signed without an expiry")
    if now_ms > expires + MAX_CLOCK_SKEW_MS:
        raise UnverifiedRecordError("expired (an old record written back)")
    return from_dict(cls, data)
