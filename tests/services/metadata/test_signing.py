"""Registry records signed under the cluster key (services/metadata/signing.py): a record
verifies only unaltered, under the Redis key it was written under, with the writer's key,
within its expiry; a reader without a key takes only unsigned records."""

from __future__ import annotations

import json

import pytest

from services.metadata import keys
from services.metadata.records import CorruptRecordError, RouterRecord, WorkerRecord
from services.metadata.signing import (
    MAX_CLOCK_SKEW_MS,
    UnverifiedRecordError,
    record_mac,
    sign,
    verify,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW_MS = 1_700_000_000_000
EXPIRES_MS = NOW_MS + 6_000

RECORD = WorkerRecord(
    worker_id="worker-0", address="127.0.0.1:50061", model="tiny", fingerprint="f" * 16,
    architecture="LlamaForCausalLM", dtype="float32", device="cpu", max_model_len=2048,
    slots=4, block_size=16, attention_backend="sdpa", version="0.1", num_running=0,
    num_waiting=0, kv_blocks_free=64, kv_blocks_total=64, heartbeat_ms=NOW_MS,
    draining=False, instance_id="i0", weights="float32 x18")
REDIS_KEY = keys.worker(RECORD.worker_id)


def signed(record=RECORD, *, key=KEY, redis_key=REDIS_KEY) -> dict:
    return json.loads(sign(record, key=key, redis_key=redis_key, expires_ms=EXPIRES_MS))


def check(raw, *, key=KEY, redis_key=REDIS_KEY, now_ms=NOW_MS, cls=WorkerRecord):
    if isinstance(raw, dict):
        raw = json.dumps(raw)
    return verify(cls, raw, key=key, redis_key=redis_key, now_ms=now_ms)


def test_a_signed_record_verifies_under_its_key() -> None:
    assert check(signed()) == RECORD
    router = RouterRecord(router_id="r1", address="127.0.0.1:50051", heartbeat_ms=NOW_MS)
    raw = sign(router, key=KEY, redis_key=keys.router("r1"), expires_ms=EXPIRES_MS)
    assert check(raw, redis_key=keys.router("r1"), cls=RouterRecord) == router


def test_the_mac_covers_canonical_json_whatever_the_field_order() -> None:
    data = signed()
    shuffled = dict(reversed(list(data.items())))
    assert json.dumps(shuffled) != json.dumps(data)
    assert check(json.dumps(shuffled, indent=2)) == RECORD


@pytest.mark.parametrize("field, value", [
    ("address", "10.6.6.6:50061"),  # the attack: same worker, the planter's address
    ("worker_id", "worker-1"),
    ("draining", True),
    ("kv_blocks_free", 65),
    ("expires_ms", EXPIRES_MS + 3_600_000),  # stretching its life
])
def test_a_tampered_field_is_refused(field, value) -> None:
    data = signed()
    data[field] = value
    with pytest.raises(UnverifiedRecordError, match="does not verify"):
        check(data)


def test_an_added_field_is_refused() -> None:
    data = signed()
    data["extra"] = "x"
    with pytest.raises(UnverifiedRecordError, match="does not verify"):
        check(data)


@pytest.mark.parametrize("other_key", [keys.worker("worker-1"), keys.router("worker-0"),
                                       keys.worker("worker-0 "), "slotmesh:worker:"])
def test_a_record_moved_to_another_key_is_refused(other_key) -> None:
    with pytest.raises(UnverifiedRecordError, match="does not verify"):
        check(signed(), redis_key=other_key)


def test_a_record_without_a_mac_is_refused() -> None:
    data = signed()
    del data["mac"]
    with pytest.raises(UnverifiedRecordError, match="unsigned"):
        check(data)
    unsigned = sign(RECORD, key=None, redis_key=REDIS_KEY, expires_ms=EXPIRES_MS)
    with pytest.raises(UnverifiedRecordError, match="unsigned"):
        check(unsigned)


@pytest.mark.parametrize("mac", [None, 0, ["a"], "", "00" * 32, "é" * 64])
def test_a_mac_of_the_wrong_shape_is_refused(mac) -> None:
    data = signed()
    data["mac"] = mac
    with pytest.raises(UnverifiedRecordError):
        check(data)


def test_a_record_signed_with_another_key_is_refused() -> None:
    with pytest.raises(UnverifiedRecordError, match="does not verify"):
        check(signed(key=OTHER_KEY))
    with pytest.raises(UnverifiedRecordError, match="does not verify"):
        check(signed(), key=OTHER_KEY)


def test_an_expired_record_written_back_is_refused() -> None:
    limit = EXPIRES_MS + MAX_CLOCK_SKEW_MS
    assert check(signed(), now_ms=limit) == RECORD
    with pytest.raises(UnverifiedRecordError, match="expired"):
        check(signed(), now_ms=limit + 1)


def test_a_signed_record_needs_an_integer_expiry() -> None:
    data = signed()
    for expires in (None, "1", 1.5, True):
        data["expires_ms"] = expires
        fields = {k: v for k, v in data.items() if k != "mac"}
        data["mac"] = record_mac(KEY, REDIS_KEY, fields)  # signed, but without an expiry
        with pytest.raises(UnverifiedRecordError, match="expiry"):
            check(data)


def test_the_mac_is_separated_from_other_uses_of_the_key() -> None:
    """The same key signs snapshots and derives the worker credential: a record MAC is
    never one of those (domain prefix), and depends on every byte of the Redis key."""
    from services.security.cluster_auth import cluster_credential

    fields = {k: v for k, v in signed().items() if k != "mac"}
    mac = record_mac(KEY, REDIS_KEY, fields)
    assert mac != cluster_credential(KEY)
    assert mac != record_mac(KEY, REDIS_KEY + "\0", fields)


def test_without_a_key_records_are_unsigned_and_signed_ones_refused() -> None:
    """A keyless cluster trusts Redis (local development); a keyless reader in a keyed
    cluster cannot check a record, so it refuses it (and says why)."""
    unsigned = sign(RECORD, key=None, redis_key=REDIS_KEY, expires_ms=EXPIRES_MS)
    assert "mac" not in json.loads(unsigned) and "expires_ms" not in json.loads(unsigned)
    assert check(unsigned, key=None) == RECORD
    with pytest.raises(UnverifiedRecordError, match="this process has none"):
        check(signed(), key=None)


def test_malformed_values() -> None:
    """Without a key a malformed value is corrupt (logged as before); with one, anything
    that is not a signed record is unverified (counted like a forgery)."""
    for raw in ("not json", "[]", json.dumps({"worker_id": 1})):
        with pytest.raises(CorruptRecordError) as e:
            check(raw, key=None)
        assert not isinstance(e.value, UnverifiedRecordError)
        with pytest.raises(UnverifiedRecordError, match="unsigned"):
            check(raw)
