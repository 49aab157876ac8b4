"""Benchmarks and chaos runs (`slotmesh bench …`, `slotmesh chaos`): they drive an engine or
a local cluster through the public paths and report numbers; nothing serves from here."""
