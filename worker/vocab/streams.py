"""What goes into a generation stream besides the prompt, and what comes out of it.

`Resume` is the typed state a failover replay carries (the output another worker already
streamed). It is torch-free, so the router and the clients build it too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Resume:
    """Output already streamed by another worker (failover replay): the sequence goes on
    after these tokens, and its text after the first `emitted_chars` characters."""

    output_token_ids: tuple[int, ...]
    emitted_chars: int = 0
