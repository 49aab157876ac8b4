"""The bad-input matrix: malformed requests and blobs sent to a real router and real
workers (tiny random Gemma 3 with a sliding window, a cluster key, a real redis-server),
each answered with the right status and a message that names what was wrong.

Every case is raw bytes on the wire, so the matrix also covers bytes that are no message
at all. A greedy stream runs through the router for the whole module; at the end it must
equal an undisturbed in-process run, every worker must be idle with all KV blocks free,
no sequence may be left in Redis, no descriptor may have leaked, and both kinds of
process must still serve. Forged and damaged prompt-cache entries are the blobs that are
not answered with an error: the right answer there is to compute the prompt (the
output equals a cold run) and to count the fallback.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from protos.slotmesh.v1 import common_pb2 as c
from protos.slotmesh.v1 import router_pb2 as r
from protos.slotmesh.v1 import worker_pb2 as w
from services.client.clients import AsyncClient, Client
from services.metadata import keys
from services.rpc.plumbing import channel
from services.security.cluster_auth import CREDENTIAL_METADATA, UNAUTHENTICATED, caller_metadata
from tests.cluster_harness import (
    is_idle,
    metric_value,
    scrape,
    sequence_keys,
    tiny_cluster,
    wait_metadata_flushed,
    wait_until,
)

pytestmark = pytest.mark.cluster  # real Redis and/or server processes

CLUSTER_KEY = bytes(range(7, 39))
OTHER_KEY = bytes(32)
CREDENTIAL = caller_metadata(CLUSTER_KEY)  # what the workers ask their callers for
MAX_SNAPSHOT_MB = 1
BLOCK_SIZE = 16  # the workers' KV block size (the default)
SLOTS, MAX_WAITING = 4, 2  # tiny_cluster's slots; a short queue to fill
CTX = 512  # the tiny model's context
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT

ROUTER_GENERATE = "/slotmesh.v1.Router/Generate"
WORKER_GENERATE = "/slotmesh.v1.Worker/Generate"
RESTORE = "/slotmesh.v1.Worker/RestoreSequence"


@dataclass(frozen=True)
class Case:
    name: str
    target: str  # "router" or "worker"
    method: str  # full gRPC method name
    payload: bytes | list[bytes]  # a list: the request stream of a client-streaming call
    code: grpc.StatusCode
    message: str | tuple[str, ...]  # what the status message starts with
    metadata: tuple[tuple[str, str], ...] | None = None  # None: the cluster credential


def gen(**request) -> bytes:
    return c.GenerateRequest(**request).SerializeToString()


def params(**fields) -> c.SamplingParams:
    return c.SamplingParams(**fields)


def bias(n: int, value: float = 1.0) -> list[c.LogitBias]:
    return [c.LogitBias(token_id=i, bias=value) for i in range(n)]


def field_cases() -> list[Case]:
    """Every invalid field of GenerateRequest, through the router."""
    bad = [
        ("no prompt", "prompt", dict()),
        ("empty text", "text", dict(text="")),
        ("empty chat", "chat.messages", dict(chat=c.ChatMessages())),
        ("chat without role", "chat.messages.role", dict(chat=c.ChatMessages(
            messages=[c.ChatMessage(role="", content="hi")]))),
        ("empty token_ids", "token_ids", dict(token_ids=c.TokenIds())),
        ("negative token id", "token_ids", dict(token_ids=c.TokenIds(ids=[1, -5]))),
        ("token id past vocab", "token_ids", dict(token_ids=c.TokenIds(ids=[1, 100_000]))),
        ("request_id too long", "request_id", dict(text="x", request_id="a" * 200)),
        ("request_id not printable", "request_id", dict(text="x", request_id="bad\nid")),
        ("max_tokens 0", "max_tokens", dict(text="x", params=params(max_tokens=0))),
        ("temperature < 0", "temperature", dict(text="x", params=params(temperature=-1))),
        ("temperature NaN", "temperature", dict(text="x", params=params(
            temperature=float("nan")))),
        ("top_k < 0", "top_k", dict(text="x", params=params(top_k=-1))),
        ("top_p 0", "top_p", dict(text="x", params=params(top_p=0))),
        ("top_p > 1", "top_p", dict(text="x", params=params(top_p=1.5))),
        ("min_p > 1", "min_p", dict(text="x", params=params(min_p=2))),
        ("typical_p 0", "typical_p", dict(text="x", params=params(typical_p=0))),
        ("repetition_penalty 0", "repetition_penalty", dict(text="x", params=params(
            repetition_penalty=0))),
        ("presence_penalty > 2", "presence_penalty", dict(text="x", params=params(
            presence_penalty=3))),
        ("frequency_penalty < -2", "frequency_penalty", dict(text="x", params=params(
            frequency_penalty=-3))),
        ("logit_bias id past vocab", "logit_bias", dict(text="x", params=params(
            logit_bias=[c.LogitBias(token_id=100_000, bias=1)]))),
        ("logit_bias inf", "logit_bias", dict(text="x", params=params(
            logit_bias=[c.LogitBias(token_id=1, bias=float("inf"))]))),
        ("logit_bias > 100", "logit_bias", dict(text="x", params=params(
            logit_bias=[c.LogitBias(token_id=1, bias=101)]))),
        ("1,025 logit_bias entries", "logit_bias", dict(text="x", params=params(
            logit_bias=bias(1025)))),
        ("seed >= 2^63", "seed", dict(text="x", params=params(seed=2**63))),
        ("logprobs 21", "logprobs", dict(text="x", params=params(logprobs=21))),
        ("empty stop string", "stop", dict(text="x", params=params(stop=[""]))),
        ("17 stop strings", "stop", dict(text="x", params=params(
            stop=[f"s{i}" for i in range(17)]))),
        ("257-character stop string", "stop", dict(text="x", params=params(stop=["s" * 257]))),
        ("stop id past vocab", "stop_token_ids", dict(text="x", params=params(
            stop_token_ids=[100_000]))),
        ("257 stop ids", "stop_token_ids", dict(text="x", params=params(
            stop_token_ids=list(range(257))))),
        ("num_candidates 5000", "num_candidates", dict(text="x", params=params(
            num_candidates=5000))),
        ("prompt past the context", "text", dict(text="word " * 600)),
        ("1M token ids", "token_ids", dict(token_ids=c.TokenIds(ids=[5] * 1_000_000))),
        ("4 MiB of text", "text", dict(text="word " * (800 << 10))),
        ("4 MiB of chat", "chat.messages", dict(chat=c.ChatMessages(messages=[
            c.ChatMessage(role="user", content="word " * (800 << 10))]))),
        ("max_tokens past the context", "max_tokens", dict(text="x", params=params(
            max_tokens=CTX + 1))),
        ("max_tokens 10^9", "max_tokens", dict(text="x", params=params(max_tokens=10**9))),
        ("max_tokens -1 as uint32", "max_tokens", dict(text="x", params=params(
            max_tokens=2**32 - 1))),
        ("resume id past vocab", "resume.output_token_ids", dict(
            text="x", params=params(seed=1), resume=c.ResumeState(
                output_token_ids=[100_000]))),
        ("resume reaches max_tokens", "resume.output_token_ids", dict(
            text="x", params=params(max_tokens=2, seed=1), resume=c.ResumeState(
                output_token_ids=[5, 6]))),
        ("resume emitted_chars too far", "resume.emitted_chars", dict(
            text="x", params=params(seed=1), resume=c.ResumeState(
                output_token_ids=[5], emitted_chars=10_000))),
    ]
    return [Case(name, "router", ROUTER_GENERATE, gen(**kwargs), INVALID, field + ":")
            for name, field, kwargs in bad]


# bytes that no request message parses to (protobuf refuses them)
UNPARSABLE = {"truncated varint": b"\x08", "bad wire type": b"\x0f\x01",
              "invalid UTF-8 string": b"\x0a\x02\xff\xfe", "length past the end": b"\x12\x7fabc"}


def wire_cases() -> list[Case]:
    """Bytes that are no message, wrong types, unknown enum values, oversize messages,
    callers of a worker without the cluster's credential."""
    cases = []
    for what, raw in UNPARSABLE.items():
        cases.append(Case(f"router Generate: {what}", "router", ROUTER_GENERATE, raw, INVALID,
                          "request: not a valid Generate"))
        cases.append(Case(f"worker Generate: {what}", "worker", WORKER_GENERATE, raw, INVALID,
                          "request: not a valid Generate"))
    cases += [
        Case("router Migrate: bad wire type", "router", "/slotmesh.v1.Router/Migrate",
             b"\x0f\x01", INVALID, "request: not a valid Migrate"),
        # a string field sent as a number is an unknown field to protobuf: no prompt is set
        Case("text sent as a varint", "router", ROUTER_GENERATE, b"\x10\x05", INVALID,
             "prompt:"),
        Case("token_ids sent as a string", "worker", WORKER_GENERATE, b"\x22\x02\xff\xff",
             INVALID, ("request: not a valid Generate", "token_ids:")),
        Case("unknown snapshot kind (Migrate)", "router", "/slotmesh.v1.Router/Migrate",
             r.MigrateRequest(request_id="x", kind=9).SerializeToString(), INVALID, "kind:"),
        Case("unknown snapshot kind (Export)", "worker", "/slotmesh.v1.Worker/ExportSequence",
             w.ExportSequenceRequest(request_id="x", kind=9).SerializeToString(), INVALID,
             "kind:"),
        Case("unknown snapshot kind (Import)", "worker", "/slotmesh.v1.Worker/ImportSequence",
             w.ImportSequenceRequest(source_address="127.0.0.1:1", request_id="x",
                                     kind=-3).SerializeToString(), INVALID, "kind:"),
        Case("17 MiB message to the router", "router", ROUTER_GENERATE,
             gen(text="x" * (17 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED,
             "SERVER: Received message larger than max"),
        Case("17 MiB chunk to a worker", "worker", RESTORE,
             [c.SnapshotChunk(data=bytes(17 << 20)).SerializeToString()],
             grpc.StatusCode.RESOURCE_EXHAUSTED,
             "SERVER: Received message larger than max"),
    ]
    stranger = caller_metadata(OTHER_KEY)
    for method, payload in [
            (WORKER_GENERATE, gen(token_ids=c.TokenIds(ids=[5, 6]))),
            ("/slotmesh.v1.Worker/ExportSequence",
             w.ExportSequenceRequest(request_id="x", kind=1).SerializeToString()),
            ("/slotmesh.v1.Worker/ImportSequence",
             w.ImportSequenceRequest(source_address="127.0.0.1:1", request_id="x",
                                     kind=1).SerializeToString())]:
        rpc_name = method.rsplit("/", 1)[1]
        for who, metadata in [("no", ()), ("another cluster's", stranger),
                              ("a mangled", ((CREDENTIAL_METADATA, "x" * 64),))]:
            cases.append(Case(f"worker {rpc_name} with {who} credential", "worker", method,
                              payload, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED,
                              metadata))
    return cases


def call_cases() -> list[Case]:
    """Requests well formed but naming things that are not there or not allowed."""
    return [
        Case("GetSequence of an unknown id", "router", "/slotmesh.v1.Router/GetSequence",
             r.GetSequenceRequest(request_id="nope").SerializeToString(),
             grpc.StatusCode.NOT_FOUND, "request_id:"),
        Case("Abort of an unknown id", "router", "/slotmesh.v1.Router/Abort",
             c.AbortRequest(request_id="nope").SerializeToString(),
             grpc.StatusCode.NOT_FOUND, "request_id:"),
        Case("Migrate of an unknown id", "router", "/slotmesh.v1.Router/Migrate",
             r.MigrateRequest(request_id="nope").SerializeToString(),
             grpc.StatusCode.NOT_FOUND, "request_id:"),
        Case("Drain without a worker", "router", "/slotmesh.v1.Router/Drain",
             r.DrainRequest().SerializeToString(), INVALID, "worker_id:"),
        Case("Drain of an unknown worker", "router", "/slotmesh.v1.Router/Drain",
             r.DrainRequest(worker_id="nope").SerializeToString(),
             grpc.StatusCode.NOT_FOUND, "worker_id: no worker 'nope'"),
        Case("Undrain without a worker", "router", "/slotmesh.v1.Router/Undrain",
             r.UndrainRequest().SerializeToString(), INVALID, "worker_id:"),
        Case("Undrain of an unknown worker", "router", "/slotmesh.v1.Router/Undrain",
             r.UndrainRequest(worker_id="nope").SerializeToString(),
             grpc.StatusCode.NOT_FOUND, "worker_id: no worker 'nope'"),
        Case("Export of an unknown id", "worker", "/slotmesh.v1.Worker/ExportSequence",
             w.ExportSequenceRequest(request_id="nope", kind=1).SerializeToString(),
             grpc.StatusCode.NOT_FOUND, "request_id:"),
        Case("Import without a source", "worker", "/slotmesh.v1.Worker/ImportSequence",
             w.ImportSequenceRequest(request_id="x", kind=1).SerializeToString(), INVALID,
             "source_address:"),
        Case("Import from a URL", "worker", "/slotmesh.v1.Worker/ImportSequence",
             w.ImportSequenceRequest(source_address="http://evil.example/x", request_id="x",
                                     kind=1).SerializeToString(), INVALID, "source_address:"),
        Case("Import from a port out of range", "worker", "/slotmesh.v1.Worker/ImportSequence",
             w.ImportSequenceRequest(source_address="127.0.0.1:70000", request_id="x",
                                     kind=1).SerializeToString(), INVALID, "source_address:"),
        Case("Import from nowhere", "worker", "/slotmesh.v1.Worker/ImportSequence",
             w.ImportSequenceRequest(source_address="127.0.0.1:1", request_id="x",
                                     kind=1).SerializeToString(),
             grpc.StatusCode.UNAVAILABLE, "source worker:"),
        Case("Restore of nothing", "worker", RESTORE, [], INVALID, "snapshot: no data"),
        Case("Restore parts out of order", "worker", RESTORE,
             [c.SnapshotChunk(data=b"x", part=1).SerializeToString()], INVALID, "part:"),
        Case("Restore of 2 MiB (limit 1 MiB)", "worker", RESTORE,
             [c.SnapshotChunk(data=bytes(1 << 20)).SerializeToString()] * 2, INVALID,
             "snapshot: larger than the limit"),
    ]


# -- snapshots made for the matrix -------------------------------------------------------

def exported(model_dir: Path, prompt: str = "The quick brown fox jumps over the lazy dog"):
    """A running sequence of `model_dir`, exported after a few steps."""
    from worker.config import EngineConfig, ModelConfig
    from worker.engine import LLMEngine
    from worker.snapshot import SnapshotKind
    from worker.vocab.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(model_dir)), warmup=False))
    engine.add_request("forged", engine.encode_prompt(prompt=prompt),
                       SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    return engine.export("forged", SnapshotKind.FULL, pause=False)


def snapshot_cases(model_dir: Path, other_model_dir: Path) -> list[Case]:
    from worker.snapshot import encode

    snap = exported(model_dir)
    good = encode(snap, CLUSTER_KEY)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    newer = bytearray(good)
    newer[8] = 99  # the format version byte
    damaged = (grpc.StatusCode.DATA_LOSS, INVALID)
    blobs = [
        ("snapshot of another model", encode(exported(other_model_dir), CLUSTER_KEY),
         grpc.StatusCode.FAILED_PRECONDITION, "snapshot:"),
        ("snapshot without a MAC", encode(snap), grpc.StatusCode.PERMISSION_DENIED,
         "snapshot: not authenticated"),
        ("snapshot signed with another key", encode(snap, OTHER_KEY),
         grpc.StatusCode.DATA_LOSS, "snapshot: MAC does not verify"),
        ("snapshot with a flipped bit", bytes(flipped), grpc.StatusCode.DATA_LOSS,
         "snapshot: MAC does not verify"),
        ("snapshot cut to a third", good[: len(good) // 3], damaged, "snapshot:"),
        ("snapshot halves swapped", good[len(good) // 2:] + good[: len(good) // 2], damaged,
         "snapshot:"),
        ("snapshot of a newer format", bytes(newer), INVALID, "snapshot:"),
        ("not a snapshot at all", b"not a snapshot at all" * 3, INVALID,
         "snapshot: not a slotmesh snapshot"),
        ("a checkpoint of another prompt", None, grpc.StatusCode.DATA_LOSS, "checkpoint:"),
    ]
    cases = []
    for name, blob, code, message in blobs:
        if blob is None:  # the good snapshot with a checkpoint that is not its prefix's
            other = encode(exported(model_dir, "A different prompt entirely, " * 4),
                           CLUSTER_KEY)
            chunks = [c.SnapshotChunk(data=good, part=0), c.SnapshotChunk(data=other, part=1)]
        else:
            chunks = [c.SnapshotChunk(data=blob[i:i + 65536]) for i in range(0, len(blob),
                                                                                 65536)]
        cases.append(Case(name, "worker", RESTORE, [x.SerializeToString() for x in chunks],
                          code, message))
    return cases


# -- the cluster -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("gemma3")


@pytest.fixture(scope="module")
def cluster(model_dir, redis_server, tmp_path_factory):
    logs = tmp_path_factory.mktemp("bad-input")
    key_file = logs / "cluster.key"
    key_file.write_text(CLUSTER_KEY.hex())
    with tiny_cluster(model_dir, redis_server.url, logs, num_workers=2,
                      worker_args=("--max-snapshot-mb", str(MAX_SNAPSHOT_MB),
                                   "--checkpoint-min-step", "32",
                                   "--max-waiting", str(MAX_WAITING)),
                      min_step_ms=10,  # held streams are still held when checked, anywhere
                      cluster_key_file=key_file) as c:
        yield c


def reference_tokens(model_dir: Path, prompt: str, max_tokens: int) -> list[int]:
    from worker.config import CacheConfig, EngineConfig, ModelConfig
    from worker.engine import LLMEngine
    from worker.vocab.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=ModelConfig(model=str(model_dir)), warmup=False,
                                    cache=CacheConfig(enable_prefix_caching=False)))
    ids = prompt if isinstance(prompt, list) else engine.encode_prompt(prompt=prompt)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return engine.generate([ids], params)[0].token_ids


# Connections opened on demand after the first count: the router's channel to each
# worker, a worker's channel to its peer, Redis pool connections under concurrency (CI
# under load saw +5). A descriptor leaked per bad request would add about 90.
FD_MARGIN = 8


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


BACKGROUND_PROMPT = "A stream that runs while the matrix is tried"
BACKGROUND_TOKENS = 200


@pytest.fixture(scope="module")
def background(cluster):
    """Greedy streams through the router, one after another, for as long as the matrix
    runs; and the descriptors each process had before it."""
    processes = [*cluster.routers, *cluster.workers]
    fds = {p.name: open_fds(p.proc.pid) for p in processes}
    runs: list[list[int]] = []
    stop = threading.Event()

    def run() -> None:
        with Client(cluster.router_address, timeout=600) as client:
            while not stop.is_set():
                runs.append(client.generate(text=BACKGROUND_PROMPT,
                                            max_tokens=BACKGROUND_TOKENS, temperature=0.0,
                                            ignore_eos=True).token_ids)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: any(not is_idle(x.address, CREDENTIAL) for x in cluster.workers), 60,
               "the background stream to start")
    yield stop, thread, runs, fds
    stop.set()


CASES = [*field_cases(), *wire_cases(), *call_cases()]
UNARY = ("Abort", "GetSequence", "Migrate", "Drain", "Undrain", "CommitExport")
# room to send what the servers must refuse (their limit is services/rpc/plumbing.py's 16 MiB)
OVERSIZE_OPTIONS = (("grpc.max_send_message_length", 64 << 20),)


def send(cluster, case: Case) -> tuple[grpc.StatusCode, str]:
    """One case as raw bytes; the status and message it got."""
    address = (cluster.router_address if case.target == "router"
               else cluster.workers[0].address)

    async def call():
        metadata = CREDENTIAL if case.metadata is None else case.metadata
        call = {"timeout": 60, "metadata": metadata if case.target == "worker" else ()}
        async with grpc.aio.insecure_channel(address, options=OVERSIZE_OPTIONS) as ch:
            try:
                if isinstance(case.payload, list):
                    async for _ in ch.stream_stream(case.method)(iter(case.payload), **call):
                        pass
                elif case.method.endswith(UNARY):
                    await ch.unary_unary(case.method)(case.payload, **call)
                else:
                    async for _ in ch.unary_stream(case.method)(case.payload, **call):
                        pass
            except grpc.aio.AioRpcError as e:
                return e.code(), e.details() or ""
        return OK, ""

    return asyncio.run(call())


def check(cluster, case: Case) -> None:
    code, message = send(cluster, case)
    codes = case.code if isinstance(case.code, tuple) else (case.code,)
    assert code in codes, (case.name, code, message)
    assert message.startswith(case.message), (case.name, message)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_bad_request(cluster, background, case) -> None:
    check(cluster, case)


# Valid requests at the extremes of every numeric sampling field (float32 rounds many of
# them to 0, 1 or inf): each must finish like its limit does, and the background stream
# that shares the workers' steps must stay token-exact (checked at the end of the module).
EXTREME_PARAMS = {
    "top_p 1e-50": dict(top_p=1e-50),
    "top_p 5e-324": dict(top_p=5e-324),
    "temperature 1e-310": dict(temperature=1e-310),
    "temperature 1e-40": dict(temperature=1e-40),
    "temperature 1e300": dict(temperature=1e300),
    "temperature 1.7e308": dict(temperature=1.7e308),
    "typical_p 1e-300": dict(typical_p=1e-300),
    "min_p 1e-300": dict(min_p=1e-300),
    "min_p 1": dict(min_p=1.0),
    "repetition_penalty 1e-300": dict(repetition_penalty=1e-300),
    "repetition_penalty 1.7e308": dict(repetition_penalty=1.7e308),
    "penalties at the edges": dict(presence_penalty=-2.0, frequency_penalty=2.0),
    "logit_bias +-100": dict(logit_bias={5: 100.0, 6: -100.0}),
    "top_k 2^31 - 1": dict(top_k=2**31 - 1),
    "seed 2^63 - 1": dict(seed=2**63 - 1),
    "everything at once": dict(top_p=1e-50, temperature=1e-310, typical_p=1e-300,
                               repetition_penalty=1e-300, min_p=1e-300, top_k=1),
}
EXTREME_TOKENS = 24
GREEDY_LIMIT = {"top_p 1e-50", "top_p 5e-324", "temperature 1e-310", "temperature 1e-40",
                "min_p 1"}  # these keep only the top token: their limit is greedy


@pytest.mark.parametrize("name", EXTREME_PARAMS)
def test_extreme_sampling_values_finish_and_spare_the_neighbours(cluster, background,
                                                                 name) -> None:
    """Four at once, so they share steps with each other and the background stream."""
    request = dict(text="Extremes, four at a time", max_tokens=EXTREME_TOKENS, ignore_eos=True)

    async def four():
        async with AsyncClient(cluster.router_address, timeout=300) as client:
            return await asyncio.gather(*(
                client.generate(**request, **EXTREME_PARAMS[name]) for _ in range(4)))

    runs = asyncio.run(four())
    for done in runs:
        assert done.finish_reason == "length", (name, done)
        assert len(done.token_ids) == EXTREME_TOKENS
    if name in GREEDY_LIMIT:
        with Client(cluster.router_address, timeout=300) as client:
            greedy = client.generate(**request, temperature=0.0).token_ids
        assert all(done.token_ids == greedy for done in runs), name


SNAPSHOT_CASES = ["snapshot of another model", "snapshot without a MAC",
                  "snapshot signed with another key", "snapshot with a flipped bit",
                  "snapshot cut to a third", "snapshot halves swapped",
                  "snapshot of a newer format", "not a snapshot at all",
                  "a checkpoint of another prompt"]


@pytest.fixture(scope="module")
def snapshot_matrix(model_dir, tiny_model_dir) -> dict[str, Case]:
    cases = {case.name: case for case in snapshot_cases(model_dir, tiny_model_dir("llama"))}
    assert sorted(cases) == sorted(SNAPSHOT_CASES)
    return cases


@pytest.mark.parametrize("name", SNAPSHOT_CASES)
def test_forged_or_damaged_snapshot(cluster, background, snapshot_matrix, name) -> None:
    """Refused before anything is imported (the last test checks the worker is idle)."""
    check(cluster, snapshot_matrix[name])


def test_streams_beyond_slots_and_queue_are_resource_exhausted(cluster, background) -> None:
    """--slots running and --max-waiting queued on one worker: the next stream is refused
    with RESOURCE_EXHAUSTED, and the ones it holds carry on."""
    worker = cluster.workers[1]
    request = c.GenerateRequest(token_ids=c.TokenIds(ids=[5, 6, 7]), params=params(
        max_tokens=CTX - 8, temperature=0.0, ignore_eos=True)).SerializeToString()

    async def main():
        async with channel(worker.address, metadata=CREDENTIAL) as ch:
            generate = ch.unary_stream(WORKER_GENERATE)
            info = ch.unary_unary("/slotmesh.v1.Worker/Info",
                                  response_deserializer=c.WorkerInfo.FromString)
            held = [generate(request, timeout=120) for _ in range(SLOTS + MAX_WAITING)]
            for _ in range(600):  # the calls start at once; wait until all are admitted
                load = (await info(b"", timeout=10)).load
                if (load.num_running, load.num_waiting) == (SLOTS, MAX_WAITING):
                    break
                await asyncio.sleep(0.02)
            try:
                async for _ in generate(request, timeout=60):
                    pass
                refused = (OK, "")
            except grpc.aio.AioRpcError as e:
                refused = (e.code(), e.details())
            for call in held:
                call.cancel()
            return load, refused

    load, (code, message) = asyncio.run(main())
    assert (load.num_running, load.num_waiting) == (SLOTS, MAX_WAITING)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, message)
    assert message.startswith("queue full:"), message


# -- the prompt cache: forged entries are recomputed, counted, and removed --------------

def _flip_checkpoint(rdb: redis.Redis, checkpoint: str, blocks: list[str]) -> None:
    rdb.setrange(checkpoint, rdb.strlen(checkpoint) // 2, b"\xff\x00")


def _flip_block(rdb: redis.Redis, checkpoint: str, blocks: list[str]) -> None:
    rdb.setrange(blocks[0], 40, b"\x01")


def _unsigned_checkpoint(rdb: redis.Redis, checkpoint: str, blocks: list[str]) -> None:
    """Re-encoded with a plain checksum: what someone without the key could write."""
    from worker.snapshot import decode, encode

    rdb.set(checkpoint, encode(decode(rdb.get(checkpoint), CLUSTER_KEY)), keepttl=True)


def _swap_blocks(rdb: redis.Redis, checkpoint: str, blocks: list[str]) -> None:
    """Two valid records under each other's keys."""
    v1, v2 = rdb.get(blocks[0]), rdb.get(blocks[1])
    rdb.set(blocks[0], v2, keepttl=True)
    rdb.set(blocks[1], v1, keepttl=True)


PROMPT_CACHE_CASES = [(_flip_checkpoint, "corrupt"), (_flip_block, "corrupt"),
                      (_swap_blocks, "corrupt"), (_unsigned_checkpoint, "unauthenticated")]


def worker_tokens(address: str, token_ids: list[int], max_tokens: int):
    from services.client.clients import Completion, build_request
    from services.rpc.convert import chunk_from_pb

    async def call():
        done = Completion()
        async with channel(address, metadata=CREDENTIAL) as ch:
            rpc = ch.unary_stream(WORKER_GENERATE,
                                  response_deserializer=c.GenerateResponse.FromString)
            async for msg in rpc(build_request(token_ids=token_ids, max_tokens=max_tokens,
                                               temperature=0.0, ignore_eos=True)
                                 .SerializeToString(), timeout=120):
                done.add(chunk_from_pb(msg))
        return done

    return asyncio.run(call())


def fallbacks(worker, reason: str) -> float:
    return metric_value(scrape(worker.metrics_address),
                        f'slotmesh_worker_prompt_cache_fallbacks_total{{reason="{reason}"}}')


@pytest.mark.parametrize("damage,reason", PROMPT_CACHE_CASES,
                         ids=[d.__name__.strip("_") for d, _ in PROMPT_CACHE_CASES])
def test_forged_prompt_cache_entry_is_recomputed(cluster, background, redis_server, model_dir,
                                                 damage, reason) -> None:
    import random

    from worker.vocab.block_hash import chain_hashes

    rdb = redis.Redis.from_url(redis_server.url)
    rng = random.Random(damage.__name__)
    prompt = [rng.randrange(3, 500) for _ in range(96)]
    continued = prompt + [rng.randrange(3, 500) for _ in range(16)]
    a, b = cluster.workers
    worker_tokens(a.address, prompt, 1)  # ends at 97 tokens: a checkpoint at 96
    hashes = [h.hex() for h in chain_hashes(prompt, BLOCK_SIZE)]

    def entry_keys() -> tuple[str, list[str]] | None:
        """This prompt's checkpoint and block records (the background stream has its own)."""
        for key in rdb.scan_iter(f"{keys.NAMESPACE}:{{pc:*}}:ckpt:{hashes[-1]}"):
            layout = key.decode().split("{pc:", 1)[1].split("}", 1)[0]
            blocks = [keys.block(layout, h) for h in hashes]
            if rdb.exists(*blocks) == len(blocks):
                return key.decode(), blocks
        return None

    wait_until(lambda: entry_keys() is not None, 30, "the prompt's checkpoint in Redis")
    damage(rdb, *entry_keys())
    before = fallbacks(b, reason)
    done = worker_tokens(b.address, continued, 8)
    assert done.num_cached_tokens == 0
    assert list(done.token_ids) == reference_tokens(model_dir, continued, 8)
    assert fallbacks(b, reason) == before + 1
    rdb.close()


# -- afterwards ----------------------------------------------------------------------------

def test_everything_still_serves_and_nothing_leaked(cluster, background, model_dir,
                                                    redis_server) -> None:
    """Runs last (file order): every background stream was exact, processes are up,
    idle, and hold no more descriptors than before, give or take FD_MARGIN."""
    stop, thread, runs, fds = background
    stop.set()
    thread.join(timeout=300)
    reference = reference_tokens(model_dir, BACKGROUND_PROMPT, BACKGROUND_TOKENS)
    assert runs and all(tokens == reference for tokens in runs), len(runs)
    with Client(cluster.router_address, timeout=60) as client:
        assert client.generate(text="still serving", max_tokens=3).finish_reason == "length"
    for x in cluster.workers:
        assert x.proc.poll() is None, x.name
        wait_until(lambda x=x: is_idle(x.address, CREDENTIAL), 10,
                   f"{x.name} idle with all blocks free")
        done = worker_tokens(x.address, [5, 6, 7, 8], 3)
        assert done.finish_reason == "length"
    # records are written behind: once the routers have flushed, none may be left (a
    # leaked one would stay for its lease, far longer than this test)
    wait_metadata_flushed(cluster)
    assert sequence_keys(redis_server.url) == []
    for p in [*cluster.routers, *cluster.workers]:
        assert open_fds(p.proc.pid) <= fds[p.name] + FD_MARGIN, (p.name, fds[p.name])
