"""Peak memory of a stretch of work, on the device that trains.

CUDA: the caching allocator's peak (`max_memory_allocated`), reset at `reset()`.
CPU: the process's peak resident set (VmHWM). Linux resets it when "5" is written to
/proc/self/clear_refs, so each stretch gets its own peak; where that is not possible the
figure is the peak since the process started (`ru_maxrss`), and `kind` says so. RSS
counts everything the process holds (weights, gradients, optimizer state, activations,
the Python runtime), which is what a memory cap sees.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

from worker.process_memory import peak_rss_bytes, release_freed_memory

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
        return peak_rss_bytes() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
