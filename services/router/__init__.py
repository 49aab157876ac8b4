"""The router: the cluster's client-facing gRPC service.

It owns no sequence state beyond the streams it relays: the worker registry is a cached
copy of Redis (registry.py), the choice of worker is a small policy (policy.py) fed with
prefix hashes of the prompt (prefix.py), and per-sequence metadata goes to Redis through
the write-behind writer. Importing it never imports torch.
"""
