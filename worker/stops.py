"""Stop strings over incrementally detokenised text.

Text that might be the start of a stop string is held back until the next token decides
it, so a client never sees part of a stop string; the stop string itself is not emitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class StopStringMatcher:
    stops: tuple[str, ...]
    emitted: int = 0  # characters of the generated text handed out so far
    _max_len: int = field(init=False)

    def __post_init__(self) -> None:
        self._max_len = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        """text: all generated text so far. Returns (delta to emit, stopped)."""
        if self.stops:
            search_from = max(0, self.emitted - self._max_len)
            hits = [i for s in self.stops if (i := text.find(s, search_from)) >= 0]
            if hits:
                return self._emit(text, min(hits)), True
        return self._emit(text, len(text) - self._held_back(text)), False

    def flush(self, text: str) -> str:
        """Everything not yet emitted (the sequence ended for another reason)."""
        return self._emit(text, len(text))

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that begins some stop string."""
        for n in range(min(self._max_len - 1, len(text) - self.emitted), 0, -1):
            suffix = text[-n:]
            if any(s.startswith(suffix) for s in self.stops):
                return n
        return 0

    def _emit(self, text: str, end: int) -> str:
        end = max(end, self.emitted)
        delta = text[self.emitted : end]
        self.emitted = end
        return delta
