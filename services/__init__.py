"""Cluster-facing services: the `slotmesh` command line, the router, the Redis metadata
store, the Python clients and the gRPC plumbing (error interceptor, health, reflection)
shared with the worker's server. Protobuf is converted to dataclasses here, at the edge.
"""
