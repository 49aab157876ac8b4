"""The torch-free vocabulary the engine and the services share: domain errors, sampling
parameters, snapshot kinds, the chained block hash, the checksum/MAC scheme of slotmesh's
binary formats, the stream types (`Resume` in, `TokenChunk` out) and the one asyncio
task-lifecycle helper.

Imports only the standard library (and its own modules), so the torch-less router image can
name everything the engine speaks. Nothing here imports the rest of `worker` (tested).
"""
