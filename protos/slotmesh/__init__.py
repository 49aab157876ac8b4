"""Generated code lives in slotmesh/v1; see protos/generate.py."""
