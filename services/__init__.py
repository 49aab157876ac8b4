"""Everything around the engine, by job: `router/` (client-facing gRPC), `worker/` (the worker
process's gRPC edge), `metadata/` (the Redis store), `rpc/` (shared gRPC plumbing and
protobuf conversion), `security/`, `client/` (the Python SDK), `cli/` (the `slotmesh`
command), `local/` (`slotmesh up`) and `tools/` (benchmarks, chaos). Protobuf is converted to
the engine's dataclasses here, at the edge. Imports `worker`; `worker` never imports this.
"""
