"""Progress lines for the waits a person sits through: model load and warmup.

Whoever builds an engine hands it a `Progress` (a callable taking one line); the engine
reports each stage once. `stderr_progress` prints the lines as `slotmesh: …` on stderr
when stderr is a terminal, and nothing with `quiet` or when stderr is a pipe or a file,
so logs, JSON on stdout and supervised processes never see them. Whole lines, not a
redrawn one: a worker's log lines share the same stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

Progress = Callable[[str], None]


def silent(line: str) -> None:
    """A Progress that shows nothing."""


def stderr_progress(quiet: bool = False, stream: TextIO | None = None) -> Progress:
    """Lines on stderr (or `stream`) when it is a terminal and not `quiet`."""
    out = sys.stderr if stream is None else stream
    if quiet or not out.isatty():
        return silent
    return lambda line: print(f"slotmesh: {line}", file=out, flush=True)
