"""Cluster-facing services: the `slotmesh` command line today; the router, the Redis
metadata store and shared gRPC plumbing arrive with the cluster issue.
"""
