"""slotmesh's native CPU ops (`kernels/csrc/*.cpp`), built on first use and cached on disk.

The library registers its ops under `torch.ops.slotmesh_native` (TORCH_LIBRARY, no Python
module) and is compiled with torch's own C++ extension builder against the installed
torch, so it needs a C++ compiler — the same one torch.compile's inductor uses on the
CPU. Where none works (or `SLOTMESH_NATIVE=0`) `native_ops()` answers None and callers
keep their plain-torch path; nothing here is required for correctness.

The build goes to `<root>/<key>`, root `$SLOTMESH_NATIVE_DIR` or
`~/.cache/slotmesh/native`, where the key hashes the sources, the torch version, the
flags and the CPU's features: a second process (or a second start) loads the cached
library in milliseconds. Processes that start together (the workers of `slotmesh up`,
the test suite) build once: the build runs under an exclusive `flock`, which the kernel
releases if its holder dies mid-build.

    .venv/bin/python -m kernels.native      # build now (setup does this), print the path
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).parent / "csrc" / name
                for name in ("fp16_gemm.cpp", "paged_attention.cpp", "block_gemm.cpp",
                             "layer_elementwise.cpp", "prepacked_linear.cpp"))
HEADERS = tuple(Path(__file__).parent / "csrc" / name for name in ("exp_poly.h",))
NAME = "slotmesh_native"
# -fopenmp: at::parallel_for is a header template, serial unless compiled with OpenMP; the
# library then uses the process's libgomp (torch's, already loaded), whose pool it shares.
# -march=native: the library is built on the machine that runs it (the build key holds
# the CPU's feature flags, so a cache shared with another kind of CPU builds anew).
CFLAGS = ("-O3", "-march=native", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def _build_dir() -> Path:
    key = hashlib.sha256()
    for src in SOURCES + HEADERS:
        key.update(src.read_bytes())
    key.update(f"{torch.__version__} {sys.version_info[:2]} {CFLAGS} {LDFLAGS}".encode())
    key.update(_cpu_flags().encode())
    root = os.environ.get("SLOTMESH_NATIVE_DIR") or Path.home() / ".cache" / "slotmesh" / "native"
    return Path(root) / key.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(directory: Path) -> Path:
    """Compile the library into `directory` (the caller holds the lock); its path."""
    from torch.utils import cpp_extension

    stale = directory / "lock"  # torch's own build baton, left behind by a killed build
    stale.unlink(missing_ok=True)
    cpp_extension.load(name=NAME, sources=[str(s) for s in SOURCES],
                       extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                       build_directory=str(directory), is_python_module=False,
                       verbose=False)
    return directory / f"{NAME}.so"


def build_and_load() -> Path:
    """Load the library, building it first when this key has none; its path. Raises
    what the compiler or loader raises."""
    directory = _build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    library, done = directory / f"{NAME}.so", directory / "built"
    with open(directory / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (done.exists() and library.exists()):
            library = _build(directory)
            done.write_text(str(library))
        else:
            torch.ops.load_library(str(library))
    _register_fakes()
    return library


@cache
def _register_fakes() -> None:
    """Output shapes for tracing (torch.compile), in Python so that a batch dimension
    stays symbolic (a C++ Meta kernel reading sizes() would pin it). Once a process."""
    @torch.library.register_fake(f"{NAME}::fp16_gemm")
    def _(x, packed, n, bias):
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake(f"{NAME}::block_gemm")
    def _(x, blocks, n, kind, bias):
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake(f"{NAME}::write_kv")
    def _(k_cache, v_cache, k, v, slot_mapping):
        return None

    @torch.library.register_fake(f"{NAME}::paged_decode_attention")
    def _(q, k_cache, v_cache, block_tables, mask, scale):
        return q.new_empty(q.shape)  # the kernel returns a contiguous tensor

    @torch.library.register_fake(f"{NAME}::prepacked_linear")
    def _(x, packed, bias, n):
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake(f"{NAME}::rms_norm")
    def _(x, weight, eps, weight_offset):
        return x.new_empty(x.shape)

    @torch.library.register_fake(f"{NAME}::add_rms_norm")
    def _(x, residual, weight, eps, weight_offset):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake(f"{NAME}::rotary")
    def _(x, cos_sin):
        return x.new_empty(x.shape)

    @torch.library.register_fake(f"{NAME}::gated_act")
    def _(gate_up, kind):
        return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


_EAGER_DTYPES = (torch.float32, torch.bfloat16)


def eager_ops(x: torch.Tensor):
    """`torch.ops.slotmesh_native` where a fused elementwise kernel may take x (eager
    only): x on the CPU, fp32 or bf16, no autograd recording (serving runs under
    inference_mode; training keeps the differentiable reference) and no torch.compile
    trace (inductor fuses those ops itself). None otherwise, or where the library is not
    here."""
    if (x.device.type != "cpu" or x.dtype not in _EAGER_DTYPES or torch.is_grad_enabled()
            or torch.compiler.is_compiling()):
        return None
    return native_ops()


@cache
def native_ops():
    """`torch.ops.slotmesh_native` once the library is loaded; None where it cannot be
    built or loaded here, or `SLOTMESH_NATIVE=0` (said once in the log)."""
    if os.environ.get("SLOTMESH_NATIVE", "1") == "0":
        return None
    if sys.platform != "linux":
        return None
    try:
        build_and_load()
    except (RuntimeError, OSError, ImportError) as e:  # no compiler or ninja, a loader error
        log.warning("slotmesh native ops unavailable (%s: %s); using plain torch ops",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    return torch.ops.slotmesh_native


if __name__ == "__main__":
    print(build_and_load())
