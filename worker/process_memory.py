"""What this process holds in memory (Linux /proc/self/status), and handing the heap that
the loaders freed back to the OS.

glibc keeps freed blocks in its arenas: after a model load, the loader's temporaries
(dequantized fp32 tensors, numpy buffers) would still count in RSS until `malloc_trim`
returns them. Elsewhere (not glibc, not Linux) these are no-ops that report 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path

_STATUS = Path("/proc/self/status")


def trim_heap() -> None:
    """Hand the heap glibc holds free back to the OS (malloc_trim; well under 1 ms after
    a small load). Objects that only a reference cycle keeps alive are not freed first."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def release_freed_memory() -> None:
    """Collect garbage cycles, then `trim_heap`, so RSS shows live data (gc.collect takes
    ~80 ms in a process that imported the worker)."""
    gc.collect()
    trim_heap()


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """VmHWM: the resident set's peak (since the start, or the last clear_refs reset)."""
    return _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
