"""The slotmesh worker: one process, one accelerator.

Owns the engine (scheduler, block manager, model runner, sampler), the unified paged KV
cache and the model loaders. Hands token chunks to whoever drives the engine (the CLI
today, the gRPC worker service later).
"""
