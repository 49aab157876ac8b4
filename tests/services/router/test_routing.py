"""Router pieces without servers: conversion and validation at the edge, prefix hashes,
routing policies, Redis record decoding, registry exclusions."""

from __future__ import annotations

import dataclasses

import pytest

from protos.slotmesh.v1 import common_pb2
from services.metadata.records import CorruptRecordError, WorkerRecord, decode, encode
from services.router.policy import Candidate, LeastLoaded, PrefixAffinity, RouteRequest
from services.router.prefix import BYTE_BLOCK, MAX_BLOCKS, TOKEN_BLOCK, prefix_hashes
from services.router.registry import WorkerRegistry
from services.rpc.convert import (
    Prompt,
    chunk_from_pb,
    chunk_to_pb,
    params_from_pb,
    params_to_pb,
    request_from_pb,
)
from worker.vocab.errors import InvalidRequestError
from worker.vocab.sampling_params import SamplingParams
from worker.vocab.streams import TokenChunk


def test_sampling_params_round_trip_exactly() -> None:
    params = SamplingParams(max_tokens=77, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05,
                            typical_p=0.95, repetition_penalty=1.1, presence_penalty=0.3,
                            frequency_penalty=-0.2, logit_bias=((5, -100.0), (7, 2.5)),
                            seed=2**63 - 1, logprobs=3, stop=("\n\n", "END"),
                            stop_token_ids=(9,), ignore_eos=True, num_candidates=64)
    assert params_from_pb(params_to_pb(params)) == params
    assert params_from_pb(common_pb2.SamplingParams()) == SamplingParams()


def test_zero_temperature_is_kept_and_unset_is_default() -> None:
    assert params_from_pb(common_pb2.SamplingParams(temperature=0)).temperature == 0.0
    assert params_from_pb(common_pb2.SamplingParams()).temperature == 1.0


def test_request_validation_names_fields() -> None:
    with pytest.raises(InvalidRequestError) as e:
        request_from_pb(common_pb2.GenerateRequest(
            text="x", params=common_pb2.SamplingParams(top_p=2)), vocab_size=None)
    assert e.value.field == "top_p"
    # the router (no vocabulary) lets big ids through; the worker's check catches them
    req = common_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[600]))
    assert request_from_pb(req, vocab_size=None).prompt.token_ids == (600,)
    with pytest.raises(InvalidRequestError, match="token_ids: token id 600"):
        request_from_pb(req, vocab_size=512)


def test_chunk_round_trip() -> None:
    chunk = TokenChunk(request_id="r", token_ids=(1, 2), text="ab", finish_reason="stop",
                  logprobs=(-0.5, -1.0), top_logprobs=(((1, -0.5),), ((2, -1.0), (3, -2.0))),
                  num_prompt_tokens=4, worker_id="w")
    assert chunk_from_pb(chunk_to_pb(chunk)) == chunk


def test_prefix_hashes_share_leading_blocks() -> None:
    base = "x" * (BYTE_BLOCK * 3 + 5)
    a, whole_a = prefix_hashes(Prompt(text=base))
    b, whole_b = prefix_hashes(Prompt(text=base + " and more" * 20))
    assert len(a) == 3 and b[:3] == a and whole_a != whole_b
    assert prefix_hashes(Prompt(text=base)) == (a, whole_a)  # stable
    ids, _ = prefix_hashes(Prompt(token_ids=tuple(range(TOKEN_BLOCK * 2))))
    assert len(ids) == 2 and not set(ids) & set(a)
    long, _ = prefix_hashes(Prompt(text="y" * BYTE_BLOCK * (MAX_BLOCKS + 10)))
    assert len(long) == MAX_BLOCKS
    short, whole = prefix_hashes(Prompt(messages=(("user", "hi"),)))
    assert short == [] and whole


def record(worker_id: str, running: int = 0, waiting: int = 0, free: int = 100,
           slots: int = 4, instance_id: str = "i0") -> WorkerRecord:
    return WorkerRecord(worker_id=worker_id, address="x:1", model="m", fingerprint="f",
                        architecture="a", dtype="float32", device="cpu", max_model_len=512,
                        slots=slots, block_size=16, attention_backend="sdpa", version="0",
                        num_running=running, num_waiting=waiting, kv_blocks_free=free,
                        kv_blocks_total=100, heartbeat_ms=0, draining=False,
                        instance_id=instance_id, weights="float32 x18")


def test_least_loaded_uses_fresher_of_heartbeat_and_inflight() -> None:
    policy = LeastLoaded()
    route = RouteRequest(prefix_hashes=(), prefix_owners=())
    a = Candidate(record=record("a", running=1), num_inflight=0)
    b = Candidate(record=record("b", running=0), num_inflight=3)  # heartbeat lags
    assert policy.select(route, [a, b]).worker_id == "a"
    c = Candidate(record=record("c", running=1, free=10), num_inflight=0)
    assert policy.select(route, [c, a]).worker_id == "a"  # tie: more free KV
    assert policy.select(route, []) is None


def test_prefix_affinity_longest_owner_then_balance() -> None:
    policy = PrefixAffinity(LeastLoaded(), max_load_imbalance=1.0)
    a = Candidate(record=record("a", running=2), num_inflight=0)
    b = Candidate(record=record("b"), num_inflight=0)
    route = RouteRequest(prefix_hashes=("h1", "h2", "h3"), prefix_owners=("b", "a", None))
    assert policy.select(route, [a, b]).worker_id == "a"  # longest matched prefix: a
    busy = Candidate(record=record("a", running=4, waiting=2), num_inflight=0)
    assert policy.select(route, [busy, b]).worker_id == "b"  # 1.5 slots busier: yields
    gone = RouteRequest(prefix_hashes=("h1",), prefix_owners=("dead",))
    assert policy.select(gone, [a, b]).worker_id == "b"


def test_records_reject_wrong_types() -> None:
    rec = record("a")
    assert decode(WorkerRecord, encode(rec)) == rec
    bad = encode(dataclasses.replace(rec)).replace('"slots":4', '"slots":"4"')
    for raw in (bad, "not json", "[]", '{"worker_id": "a"}', b"\xff\xfe"):
        with pytest.raises(CorruptRecordError):
            decode(WorkerRecord, raw)


def routable_ids(registry: WorkerRegistry) -> list[str]:
    return [r.worker_id for r in registry.routable()]


def test_a_drain_excludes_the_process_that_drained_not_a_new_one_under_its_id() -> None:
    """The registry's cached copy only (a refresh replaces `workers` with what Redis
    holds): exclusions are keyed by (worker id, instance id)."""
    registry = WorkerRegistry(store=None, poll_s=1.0)
    drained = record("w", instance_id="first")
    registry.workers = {"v": record("v"), "w": drained}
    registry.exclude(drained, 120.0)
    assert routable_ids(registry) == ["v"]
    registry.workers = {"v": record("v"), "w": record("w", instance_id="second")}  # restarted
    assert routable_ids(registry) == ["v", "w"]
    registry.workers["w"] = drained  # the drained process is still excluded
    assert routable_ids(registry) == ["v"]
    assert registry.include("w") is True  # undrain: every process of the worker
    assert routable_ids(registry) == ["v", "w"]
    assert registry.include("w") is False
    registry.workers["w"] = dataclasses.replace(drained, draining=True)  # its own flag
    assert routable_ids(registry) == ["v"]


def test_a_shorter_exclusion_never_cuts_a_longer_one() -> None:
    registry = WorkerRegistry(store=None, poll_s=1.0)
    w = record("w")
    registry.workers = {"w": w}
    registry.exclude(w, 120.0)  # drained
    registry.exclude(w, 0.0)  # then unreachable for no time at all
    assert routable_ids(registry) == []
