"""Stateless device ops, one op per file.

Each module exposes `<op>()` and a plain-torch `<op>_reference()`; fast variants (Triton,
CUDA) load lazily and only where they can run. Callers are the model code and the sampler.
"""
