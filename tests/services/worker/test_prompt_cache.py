"""The cluster-wide prompt cache with a real redis-server: checkpoints of sliding-window
models (and the full-attention blocks they need) written by one worker let another
compute only the new tokens, with the logits of a cold run; damaged entries and a
missing Redis fall back to computing; the byte budget holds.

Workers here are engines in this process with the worker's real PromptCache and
RedisStore (no gRPC; tests/cluster/test_migration.py covers the served path)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import pytest
import redis
import torch

from services.local.redis_server import RedisServer
from services.metadata import keys
from services.metadata.store import RedisStore
from services.rpc.metrics import WorkerMetrics
from services.worker.prompt_cache import PromptCache, layout_id
from tests.paths import model_cache_dir
from worker.async_engine import AsyncEngine
from worker.config import (
    CacheConfig,
    CheckpointConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from worker.engine import LLMEngine
from worker.loaders import load_model_files
from worker.vocab.block_hash import chain_hashes
from worker.vocab.sampling_params import SamplingParams

pytestmark = pytest.mark.cluster  # real Redis and/or server processes

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
CHECKPOINTS = CheckpointConfig(max_per_sequence=4, every_tokens=1024, min_step_tokens=64)
LOGIT_TOLERANCE = 1e-4  # fp32, restored prefix against a cold run


def make_engine(model: str, *, checkpoints: CheckpointConfig | None = CHECKPOINTS,
                prefix_caching: bool = True, weights=None, **cache) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=model, cache_dir=model_cache_dir(), max_model_len=4096),
        cache=CacheConfig(enable_prefix_caching=prefix_caching, **cache),
        scheduler=SchedulerConfig(max_num_batched_tokens=256),
        checkpoints=checkpoints, warmup=False), model_files=weights)


@dataclass
class Run:
    token_ids: list[int]
    num_cached_tokens: int
    num_computed_tokens: int  # prompt tokens this engine computed
    num_restored_tokens: int  # prompt tokens installed from Redis
    logits: list[torch.Tensor]  # per sampled position, [vocab]


class Node:
    """One worker: an engine, its AsyncEngine and the worker's PromptCache on Redis."""

    def __init__(self, engine: LLMEngine, redis_url: str, *, max_bytes: int = 256 << 20,
                 ttl_s: float = 600.0, key: bytes | None = None) -> None:
        self.engine, self.redis_url = engine, redis_url
        self.max_bytes, self.ttl_s, self.key = max_bytes, ttl_s, key
        self.metrics = WorkerMetrics(engine.load)

    async def __aenter__(self) -> Node:
        self.aengine = AsyncEngine(self.engine)
        await self.aengine.start()
        self.store = RedisStore(self.redis_url)
        self.cache = PromptCache(self.store, self.aengine, self.metrics.prompt_cache,
                                 max_bytes=self.max_bytes, ttl_s=self.ttl_s, min_tokens=64,
                                 key=self.key)
        self.aengine.on_captures = self.cache.publish
        await self.cache.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.cache.close()
        await self.aengine.stop()
        await self.store.close()

    async def run(self, token_ids: list[int], params: SamplingParams = GREEDY,
                  request_id: str = "r") -> Run:
        """Like the worker's Generate: look the prompt up, queue it, stream it; then wait
        for its checkpoints to be written."""
        before = self.engine.load()
        logits: list[torch.Tensor] = []
        with record_logits(self.engine, logits):
            restore = await self.cache.lookup(token_ids)
            stream = await self.aengine.submit(request_id, token_ids, params, restore=restore)
            out, cached = [], None
            async for chunk in stream:
                out += chunk.token_ids
                if chunk.num_cached_tokens is not None:
                    cached = chunk.num_cached_tokens
        await self.cache.flush()
        after = self.engine.load()
        hit = after.num_prefix_hit_tokens - before.num_prefix_hit_tokens
        return Run(out, cached, len(token_ids) - hit,
                   after.num_restored_tokens - before.num_restored_tokens, logits)

    def count(self, metric: str, label: str) -> float:
        value = self.metrics.registry.get_sample_value(f"{metric}_total",
                                                       _label(metric, label))
        return value or 0.0


def _label(metric: str, value: str) -> dict:
    name = {"slotmesh_worker_prompt_cache_fallbacks": "reason"}.get(metric, "result")
    return {name: value}


@contextlib.contextmanager
def record_logits(engine: LLMEngine, out: list[torch.Tensor]):
    """Instrument the model's last projection: keep every row of logits it returns."""
    model, original = engine.model, engine.model.compute_logits

    def recording(hidden):
        logits = original(hidden)
        out.extend(logits.float().clone())
        return logits

    model.compute_logits = recording
    try:
        yield
    finally:
        del model.compute_logits


def assert_same_as_cold(run: Run, cold: Run) -> None:
    assert run.token_ids == cold.token_ids
    diffs = [(a - b).abs().max().item() for a, b in zip(run.logits, cold.logits, strict=True)]
    print(f"max |logit diff| restored vs cold: {max(diffs):.2e}")
    assert max(diffs) <= LOGIT_TOLERANCE


def tokens(n: int, seed: int, vocab: int = 500) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n,), generator=g).tolist()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The module's redis-server, emptied for each test."""
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


def entry_bytes(url: str, engine: LLMEngine) -> tuple[int, int, int]:
    """(checkpoint keys, payload bytes actually stored, bytes the books record)."""
    r = redis.Redis.from_url(url)
    layout = layout_id(engine.kv)
    entries = [k for k in r.scan_iter(f"{keys.prompt_cache(layout)}:*")
               if b":ckpt:" in k or b":blk:" in k]
    num_checkpoints = sum(1 for k in entries if b":ckpt:" in k)
    stored = sum(r.strlen(k) for k in entries)
    return num_checkpoints, stored, int(r.get(keys.prompt_cache_books(layout)[2]) or 0)


# -- another worker resumes a prompt: tiny Mistral (window 64) and gemma3-270m ------------

@pytest.fixture(scope="module")
def mistral_engines(tiny_model_dir):
    path = str(tiny_model_dir("mistral", window=64))
    return make_engine(path), make_engine(path), make_engine(path, checkpoints=None,
                                                             prefix_caching=False)


@pytest.fixture(scope="module")
def gemma_engines():
    weights = load_model_files("gemma3-270m", model_cache_dir())  # loaded once, shared
    return (make_engine("gemma3-270m", weights=weights),
            make_engine("gemma3-270m", weights=weights),
            make_engine("gemma3-270m", checkpoints=None, prefix_caching=False,
                        weights=weights))


def test_other_worker_computes_only_new_tokens_tiny_mistral(mistral_engines,
                                                            redis_url) -> None:
    prompt = tokens(320, seed=1)  # 5 windows of 64
    _resume_on_other_worker(*mistral_engines, redis_url, prompt, prompt + tokens(24, seed=2))


def test_other_worker_computes_only_new_tokens_gemma3(gemma_engines, redis_url) -> None:
    a = gemma_engines[0]
    text = " ".join(f"Entry {i} notes that the {i % 7}th fox met {i % 11} hens." for i in
                    range(200))
    ids = a.encode_prompt(prompt=text)
    prompt = ids[:2048]  # 4 windows of 512
    assert len(ids) >= 2048 + 40
    _resume_on_other_worker(*gemma_engines, redis_url, prompt, ids[:2048 + 40])


def _resume_on_other_worker(engine_a: LLMEngine, engine_b: LLMEngine, engine_cold: LLMEngine,
                            url: str, prompt: list[int], continued: list[int]) -> None:
    async def main():
        async with Node(engine_a, url) as a, Node(engine_b, url) as b, \
                Node(engine_cold, url) as cold:
            await a.run(prompt, request_id="a")
            on_b = await b.run(continued, request_id="b")
            reference = await cold.run(continued, request_id="cold")
            return a, b, on_b, reference

    a, b, on_b, reference = asyncio.run(main())
    assert a.count("slotmesh_worker_checkpoint_writes", "written") >= 1
    assert b.count("slotmesh_worker_prompt_cache_lookups", "hit") == 1
    # B computed only the continuation: the whole prompt came from Redis
    assert on_b.num_cached_tokens == on_b.num_restored_tokens == len(prompt)
    assert on_b.num_computed_tokens == len(continued) - len(prompt)
    assert reference.num_computed_tokens == len(continued)
    assert_same_as_cold(on_b, reference)


def gemma_turns(turns: list[tuple[str, str]]) -> str:
    """Gemma's turn format. The gemma3-270m GGUF ships no chat template, so the
    conversation is rendered here, as a client would (the turn markers are its special
    tokens either way)."""
    text = "".join(f"<start_of_turn>{role}\n{content}<end_of_turn>\n" for role, content in turns)
    return text + "<start_of_turn>model\n"


def test_multi_turn_chat_reuses_the_previous_turn_gemma3(gemma_engines, redis_url) -> None:
    """Turn 2 on the same worker computes only the new turn's tokens: from the local
    cache, and again from Redis after the worker's cache was reset."""
    engine = gemma_engines[0]
    engine.block_manager.reset_prefix_cache()
    params = SamplingParams(max_tokens=16, temperature=0.0)
    question = "Name three rivers in Europe and one fact about each of them, briefly. " * 6
    ids1 = engine.encode_prompt(prompt=gemma_turns([("user", question)]))

    async def main():
        async with Node(engine, redis_url) as node:
            first = await node.run(ids1, params, "turn1")
            answer = engine.tokenizer.decode(first.token_ids, skip_special_tokens=True)
            ids2 = engine.encode_prompt(prompt=gemma_turns([
                ("user", question), ("model", answer),
                ("user", "Which of them is the longest?")]))
            local = await node.run(ids2, params, "turn2")
            engine.block_manager.reset_prefix_cache()
            from_redis = await node.run(ids2, params, "turn2-again")
            return ids1 + first.token_ids, ids2, local, from_redis

    history, ids2, local, from_redis = asyncio.run(main())
    common = next((i for i, (x, y) in enumerate(zip(history, ids2, strict=False)) if x != y),
                  min(len(history), len(ids2)))
    new_turn = len(ids2) - common
    print(f"turn 2: {len(ids2)} tokens, {new_turn} new; computed {local.num_computed_tokens} "
          f"(local cache), {from_redis.num_computed_tokens} (Redis)")
    assert common > len(ids1)  # the answer is part of the reused prefix
    for run in (local, from_redis):
        assert new_turn <= run.num_computed_tokens < new_turn + 16  # 16: one block
    assert local.num_restored_tokens == 0 and from_redis.num_restored_tokens > len(ids1)
    assert from_redis.token_ids == local.token_ids


# -- mixing this worker's full-attention blocks with Redis' sliding window ---------------

def test_evicted_window_comes_from_redis_with_local_blocks(tiny_model_dir,
                                                           redis_url) -> None:
    """A small sliding pool: another request evicts the window of a finished prompt, the
    full-attention blocks stay; the window comes back from the checkpoint."""
    path = str(tiny_model_dir("gemma3"))  # window 48, sliding and full layers
    engine = make_engine(path, num_blocks=160)
    cold = make_engine(path, checkpoints=None, prefix_caching=False)
    prompt = tokens(192, 3)
    continued = prompt + tokens(20, 4)

    async def main():
        async with Node(engine, redis_url) as node, Node(cold, redis_url) as ref:
            await node.run(prompt, request_id="p")
            sliding = engine.block_manager.pools[1]
            for i in range(3):  # fillers cycle through the whole sliding pool
                await node.run(tokens(sliding.num_blocks * 16 // 3, 10 + i), request_id=f"f{i}")
            return await node.run(continued, request_id="c"), await ref.run(continued), node

    run, reference, node = asyncio.run(main())
    assert run.num_restored_tokens == run.num_cached_tokens == len(prompt)
    # only the checkpoint came from Redis: the full-attention blocks were still here
    checkpoint = keys.checkpoint(layout_id(engine.kv), chain_hashes(prompt, 16)[-1].hex())
    read = node.metrics.registry.get_sample_value("slotmesh_worker_checkpoint_read_bytes_total")
    assert read == redis.Redis.from_url(redis_url).strlen(checkpoint)
    assert_same_as_cold(run, reference)


# -- fallbacks ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma_tiny(tiny_model_dir):
    path = str(tiny_model_dir("gemma3"))
    return make_engine(path), make_engine(path), make_engine(path, checkpoints=None,
                                                            prefix_caching=False)


def _corrupt_checkpoint(r: redis.Redis, layout: str) -> None:
    key = next(r.scan_iter(f"{keys.prompt_cache(layout)}:ckpt:*"))
    r.setrange(key, r.strlen(key) // 2, b"\xff\x00")


def _corrupt_block(r: redis.Redis, layout: str) -> None:
    key = next(r.scan_iter(f"{keys.prompt_cache(layout)}:blk:*"))
    r.setrange(key, 40, b"\x01")


def _swap_blocks(r: redis.Redis, layout: str) -> None:
    """Two valid records under each other's keys (a forged or mixed-up store)."""
    k1, k2 = list(r.scan_iter(f"{keys.prompt_cache(layout)}:blk:*", count=1000))[:2]
    v1, v2 = r.get(k1), r.get(k2)
    r.set(k1, v2, keepttl=True)
    r.set(k2, v1, keepttl=True)


@pytest.mark.parametrize("damage", [_corrupt_checkpoint, _corrupt_block, _swap_blocks])
def test_damaged_entry_falls_back_to_computing(gemma_tiny, redis_url, damage,
                                               caplog) -> None:
    a_engine, b_engine, cold_engine = gemma_tiny
    for e in gemma_tiny:
        e.block_manager.reset_prefix_cache()
    prompt = tokens(160, 5)
    continued = prompt + tokens(16, 6)

    async def main():
        async with Node(a_engine, redis_url) as a, Node(b_engine, redis_url) as b, \
                Node(cold_engine, redis_url) as cold:
            await a.run(prompt, request_id="a")
            damage(redis.Redis.from_url(redis_url), layout_id(a_engine.kv))
            return await b.run(continued, request_id="b"), await cold.run(continued), b

    with caplog.at_level(logging.WARNING, logger="services.worker.prompt_cache"):
        run, reference, b = asyncio.run(main())
    assert b.count("slotmesh_worker_prompt_cache_fallbacks", "corrupt") == 1
    assert "damaged prompt cache entry; removing it" in caplog.text
    damaged = keys.checkpoint(layout_id(a_engine.kv), chain_hashes(prompt, 16)[-1].hex())
    assert not redis.Redis.from_url(redis_url).exists(damaged)  # a later capture rewrites it
    assert run.num_restored_tokens == 0 and run.num_computed_tokens == len(continued)
    assert_same_as_cold(run, reference)


def test_redis_down_falls_back_to_computing(gemma_tiny, caplog) -> None:
    a_engine, b_engine, cold_engine = gemma_tiny
    for e in gemma_tiny:
        e.block_manager.reset_prefix_cache()
    server = RedisServer(install=True).start()
    prompt = tokens(160, 7)
    continued = prompt + tokens(16, 8)

    async def main():
        async with Node(a_engine, server.url) as a, Node(b_engine, server.url) as b, \
                Node(cold_engine, server.url) as cold:
            await a.run(prompt, request_id="a")
            server.close()
            run = await b.run(continued, request_id="b")  # its checkpoint write fails too
            return run, await cold.run(continued), b

    with caplog.at_level(logging.WARNING, logger="services.worker.prompt_cache"):
        run, reference, b = asyncio.run(main())
    assert b.count("slotmesh_worker_prompt_cache_fallbacks", "unavailable") == 1
    assert b.count("slotmesh_worker_checkpoint_writes", "failed") >= 1
    assert "prompt cache unavailable" in caplog.text
    assert run.num_computed_tokens == len(continued)
    assert_same_as_cold(run, reference)


def test_entries_carry_the_cluster_key(gemma_tiny, redis_url) -> None:
    """With a cluster key, entries carry its MAC: a worker with the key restores them; an
    entry re-signed with a plain checksum (what a forger without the key could write into
    Redis), or a worker with another key, falls back to computing (and removes it)."""
    from worker.snapshot import decode, encode

    key, other_key = b"k" * 32, b"o" * 32
    a_engine, b_engine, _ = gemma_tiny
    prompt = tokens(160, 31)
    continued = prompt + tokens(16, 32)
    r = redis.Redis.from_url(redis_url)
    ckpt_key = keys.checkpoint(layout_id(a_engine.kv), chain_hashes(prompt, 16)[-1].hex())

    async def publish() -> None:
        a_engine.block_manager.reset_prefix_cache()
        async with Node(a_engine, redis_url, key=key) as a:
            await a.run(prompt, request_id="a")
        assert r.exists(ckpt_key)

    async def on_b(name: str, node_key: bytes):
        b_engine.block_manager.reset_prefix_cache()
        async with Node(b_engine, redis_url, key=node_key) as b:
            return await b.run(continued, request_id=name), b

    async def main():
        runs = {}
        await publish()
        runs["same key"] = await on_b("same key", key)
        r.set(ckpt_key, encode(decode(r.get(ckpt_key), key)), keepttl=True)  # plain
        runs["forged"] = await on_b("forged", key)
        await publish()
        runs["other key"] = await on_b("other key", other_key)
        return runs

    runs = asyncio.run(main())
    assert runs["same key"][0].num_restored_tokens == len(prompt)
    assert runs["forged"][1].count("slotmesh_worker_prompt_cache_fallbacks",
                                   "unauthenticated") == 1
    assert runs["other key"][1].count("slotmesh_worker_prompt_cache_fallbacks",
                                      "corrupt") == 1
    for name in ("other key", "forged"):
        assert runs[name][0].num_restored_tokens == 0
        assert runs[name][0].token_ids == runs["same key"][0].token_ids
    assert not r.exists(ckpt_key)


# -- limits ------------------------------------------------------------------------------

def test_byte_budget_holds_under_50_long_prompts(gemma_tiny, redis_url) -> None:
    a_engine, b_engine, _ = gemma_tiny
    for e in gemma_tiny:
        e.block_manager.reset_prefix_cache()
    budget = 1 << 20  # about 4 prompts' worth of checkpoints and blocks
    prompts = [tokens(240, 100 + i) for i in range(50)]

    async def main():
        async with Node(a_engine, redis_url, max_bytes=budget) as a:
            for i, prompt in enumerate(prompts):
                await a.run(prompt, request_id=f"p{i}")
                _, stored, booked = entry_bytes(redis_url, a_engine)
                assert stored == booked <= budget, (i, stored, booked)
        async with Node(b_engine, redis_url, max_bytes=budget) as b:
            return await b.run(prompts[-1] + tokens(16, 9), request_id="b"), a

    last, a = asyncio.run(main())
    num_checkpoints, stored, _ = entry_bytes(redis_url, a_engine)
    print(f"50 prompts under a {budget} B budget: {stored} B stored, {num_checkpoints} "
          f"checkpoints kept, {a.count('slotmesh_worker_checkpoint_writes', 'written'):.0f} "
          "written")
    assert a.count("slotmesh_worker_checkpoint_writes", "written") == 50
    assert 0 < num_checkpoints < 50  # the oldest were evicted
    assert last.num_restored_tokens == 240  # the newest survived, whole


def test_checkpoint_larger_than_the_budget_is_skipped(gemma_tiny, redis_url) -> None:
    engine = gemma_tiny[0]
    engine.block_manager.reset_prefix_cache()

    async def main():
        async with Node(engine, redis_url, max_bytes=32 << 10) as node:
            await node.run(tokens(240, 11))
            return node

    node = asyncio.run(main())
    assert node.count("slotmesh_worker_checkpoint_writes", "too_big") >= 1
    assert node.count("slotmesh_worker_checkpoint_writes", "written") == 0
    assert entry_bytes(redis_url, engine) == (0, 0, 0)  # nothing half-written


def test_at_most_k_checkpoints_per_sequence(tiny_model_dir, redis_url) -> None:
    engine = make_engine(str(tiny_model_dir("gemma3")), checkpoints=CheckpointConfig(
        max_per_sequence=2, every_tokens=32, min_step_tokens=32))
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        async with Node(engine, redis_url) as node:
            await node.run(tokens(64, 12), params)
            return node

    node = asyncio.run(main())
    assert node.count("slotmesh_worker_checkpoint_writes", "written") > 2
    assert entry_bytes(redis_url, engine)[0] == 2


def test_swa_full_keeps_every_prefix_without_checkpoints(tiny_model_dir, redis_url) -> None:
    engine = make_engine(str(tiny_model_dir("gemma3")), swa_full=True)
    prompt = tokens(256, 13)

    async def main():
        async with Node(engine, redis_url) as node:
            await node.run(prompt, request_id="whole")
            # an earlier prefix, far behind the window, with a new ending
            return await node.run(prompt[:96] + tokens(8, 14), request_id="edit")

    edit = asyncio.run(main())
    assert edit.num_cached_tokens == 96 and edit.num_restored_tokens == 0
    assert entry_bytes(redis_url, engine) == (0, 0, 0)
