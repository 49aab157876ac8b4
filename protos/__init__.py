"""The gRPC contract (slotmesh.v1) and its generated, committed Python code."""
