"""Peak memory of a stretch of work, on the device that trains.

CUDA: the caching allocator's peak (`max_memory_allocated`), reset at `reset()`.
CPU: the process's peak resident set (VmHWM). Linux resets it when "5" is written to
/proc/self/clear_refs, so each stretch gets its own peak; where that is not possible the
figure is the peak since the process started (`ru_maxrss`), and `kind` says so. RSS
counts everything the process holds (weights, gradients, optimizer state, activations,
the Python runtime), which is what a memory cap sees.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"

    def reset(self) -> None:
        release_freed_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.kind = "rss_since_start"

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _vm_hwm() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_freed_memory() -> None:
    """Hand memory freed to glibc back to the OS (malloc_trim), so RSS shows live data."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _vm_hwm() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
