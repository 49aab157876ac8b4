"""The worker process's gRPC edge: the Worker service in front of the engine library
(`worker/`), its heartbeat in the Redis registry, drain on SIGTERM, and the Redis side of
the cluster-wide prompt cache. `python -m services.worker` starts one."""
