"""Every Redis key slotmesh uses, in one place.

    slotmesh:workers              SET of worker ids that have registered
    slotmesh:worker:{worker_id}   STRING, JSON WorkerRecord; expires unless heartbeats renew it
    slotmesh:seq:{request_id}     STRING, JSON SequenceRecord while the sequence runs
    slotmesh:prefix:{hash}        STRING, worker id that last served a prompt with this prefix
    slotmesh:routers              SET of router ids that have registered
    slotmesh:router:{router_id}   STRING, JSON RouterRecord (its address); expires unless
                                  the router's heartbeat renews it

The cluster-wide prompt cache, per KV layout (model fingerprint, dtype, block size); the
hash tag keeps one layout's keys in one Redis Cluster slot, as its scripts need:

    slotmesh:{pc:LAYOUT}:ckpt:{hash}  STRING, checkpoint record (SWA_ONLY snapshot) of
                                      the prefix whose last block has this chained hash
    slotmesh:{pc:LAYOUT}:blk:{hash}   STRING, block record: one full-attention block
    slotmesh:{pc:LAYOUT}:index        ZSET, every entry above, scored by its expiry (ms)
    slotmesh:{pc:LAYOUT}:sizes        HASH, entry key → payload bytes
    slotmesh:{pc:LAYOUT}:bytes        STRING, sum of the sizes: what the budget limits

With a cluster key, worker and router records also carry `expires_ms` and an HMAC
(services/metadata/signing.py); readers ignore records that do not verify.

A worker (or router) whose key has expired is dead even if its id is still in the set;
readers prune such ids. Sequence and prefix keys carry a TTL too, so a crashed router
leaks nothing for long.
"""

from __future__ import annotations

NAMESPACE = "slotmesh"
WORKERS = f"{NAMESPACE}:workers"


def worker(worker_id: str) -> str:
    return f"{NAMESPACE}:worker:{worker_id}"


def sequence(request_id: str) -> str:
    return f"{NAMESPACE}:seq:{request_id}"


def prefix(prefix_hash: str) -> str:
    return f"{NAMESPACE}:prefix:{prefix_hash}"


ROUTERS = f"{NAMESPACE}:routers"


def router(router_id: str) -> str:
    return f"{NAMESPACE}:router:{router_id}"


def prompt_cache(layout_id: str) -> str:
    """Prefix of one KV layout's prompt-cache keys."""
    return f"{NAMESPACE}:{{pc:{layout_id}}}"


def checkpoint(layout_id: str, chain_hash: str) -> str:
    return f"{prompt_cache(layout_id)}:ckpt:{chain_hash}"


def block(layout_id: str, chain_hash: str) -> str:
    return f"{prompt_cache(layout_id)}:blk:{chain_hash}"


def prompt_cache_books(layout_id: str) -> tuple[str, str, str]:
    """(index, sizes, bytes): the keys the budget is kept in."""
    base = prompt_cache(layout_id)
    return f"{base}:index", f"{base}:sizes", f"{base}:bytes"
