"""What the cluster shares through Redis: the worker registry, per-sequence slot metadata
and the prefix-affinity index. `keys.py` names every key, `records.py` holds the typed
values (JSON on the wire, validated on read, never pickled), `signing.py` the MACs of
registry records under the cluster key (checked on every read), `store.py` is the only module
that imports `redis`, and `writer.py` writes behind so a Redis outage never blocks a
stream.
"""
