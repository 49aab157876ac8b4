"""The engine library: one worker's model on one accelerator, with no network and no Redis.

Owns the engine (`engine`, `async_engine`: scheduler, block manager, model runner, sampler),
the unified paged KV cache (`kv_cache`, whose `KVView` snapshots and checkpoints take),
snapshots and prompt-cache checkpoints, the model loaders, the models and fine-tuning.
`vocab/` is the torch-free part the services share. Hands `TokenChunk`s to whoever drives
the engine: the CLI in-process, or the worker process's gRPC edge in `services/worker/`.
Imports `kernels`, never `services`.
"""
