"""Every Redis key slotmesh uses, in one place.

    slotmesh:workers              SET of worker ids that have registered
    slotmesh:worker:{worker_id}   STRING, JSON WorkerRecord; expires unless heartbeats renew it
    slotmesh:seq:{request_id}     STRING, JSON SequenceRecord while the sequence runs
    slotmesh:prefix:{hash}        STRING, worker id that last served a prompt with this prefix
    slotmesh:routers              SET of router ids that have registered
    slotmesh:router:{router_id}   STRING, JSON RouterRecord (its address); expires unless
                                  the router's heartbeat renews it

A worker (or router) whose key has expired is dead even if its id is still in the set; readers prune
such ids. Sequence and prefix keys carry a TTL too, so a crashed router leaks nothing for
long.
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
