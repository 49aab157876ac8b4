"""Per-request sampling and stop parameters, validated once where a request enters."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from worker.vocab.errors import InvalidRequestError

# Limits on what one request may carry (each refused with INVALID_ARGUMENT naming the
# field). OpenAI allows 4 stop strings and 300 logit-bias entries; these are looser.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # per stop string
MAX_STOP_TOKEN_IDS = 256
MAX_LOGIT_BIAS = 1024  # entries
MAX_ABS_LOGIT_BIAS = 100.0
# Below this a temperature is greedy (vLLM's threshold too): x / T would overflow float32
# or tie every positive logit at +inf, and the draw is argmax anyway.
MIN_SAMPLING_TEMPERATURE = 1e-5
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty")


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """What to sample and when to stop. Defaults follow llama.cpp's server where it has one.

    temperature 0 (or below MIN_SAMPLING_TEMPERATURE) means greedy. top_k 0, top_p 1,
    min_p 0 and typical_p 1 switch a filter off. `seed` None draws a fresh seed per request
    (the engine fills it in, so the draw stays a pure function of (seed, position) and
    replays identically).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    logprobs: int = 0  # top-n logprobs per sampled token; 0 = off
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    num_candidates: int = 0  # hybrid mode: >0 hands this many filtered candidates to the host

    def to_dict(self) -> dict:
        """JSON-friendly fields (Redis metadata, snapshot headers)."""
        d = asdict(self)
        d["logit_bias"] = [list(x) for x in self.logit_bias]
        d["stop"], d["stop_token_ids"] = list(self.stop), list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SamplingParams:
        """Inverse of to_dict for data that crossed a process boundary: unknown or
        missing keys and wrong types raise InvalidRequestError (ranges: validate())."""
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) != names:
            raise InvalidRequestError("params", "sampling parameters have the wrong fields")
        try:
            values = {**d, "logit_bias": tuple((int(t), float(b)) for t, b in d["logit_bias"]),
                      "stop": tuple(str(x) for x in d["stop"]),
                      "stop_token_ids": tuple(int(x) for x in d["stop_token_ids"])}
            for name in ("max_tokens", "top_k", "logprobs", "num_candidates"):
                values[name] = _strict(int, d[name])
            for name in _FLOAT_FIELDS:
                values[name] = float(_strict((int, float), d[name]))
            values["ignore_eos"] = _strict(bool, d["ignore_eos"])
            values["seed"] = None if d["seed"] is None else _strict(int, d["seed"])
        except (TypeError, ValueError) as e:
            raise InvalidRequestError("params", f"malformed sampling parameters: {e}") from e
        return cls(**values)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < MIN_SAMPLING_TEMPERATURE

    def check_finite(self) -> None:
        """InvalidRequestError naming the first float field that is NaN or infinite."""
        for name in _FLOAT_FIELDS:
            _check(math.isfinite(getattr(self, name)), name, "must be a finite number")
        _check(all(math.isfinite(b) for _t, b in self.logit_bias), "logit_bias",
               "biases must be finite numbers")

    def validate(self, vocab_size: int | None) -> None:
        """Raise InvalidRequestError naming the first field out of range.

        vocab_size None skips the vocabulary checks (the router knows no model)."""
        self.check_finite()
        _check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _check(self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(0.0 < self.typical_p <= 1.0, "typical_p", f"must be in (0, 1], got {self.typical_p}")
        _check(self.repetition_penalty > 0.0, "repetition_penalty",
               f"must be > 0, got {self.repetition_penalty}")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
               f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               f"must be in [-2, 2], got {self.frequency_penalty}")
        _check(0 <= self.logprobs <= 20, "logprobs", f"must be in [0, 20], got {self.logprobs}")
        _check(0 <= self.num_candidates <= 1024, "num_candidates",
               f"must be in [0, 1024], got {self.num_candidates}")
        if self.seed is not None:
            _check(0 <= self.seed < 2**63, "seed", f"must be in [0, 2^63), got {self.seed}")
        self._check_sizes()
        _check_token_ids((t for t, _bias in self.logit_bias), vocab_size, "logit_bias")
        _check_token_ids(self.stop_token_ids, vocab_size, "stop_token_ids")
        _check(all(self.stop), "stop", "stop strings must be non-empty")

    def _check_sizes(self) -> None:
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop",
               f"{len(self.stop)} stop strings; at most {MAX_STOP_STRINGS}")
        _check(all(len(s) <= MAX_STOP_CHARS for s in self.stop), "stop",
               f"a stop string is longer than {MAX_STOP_CHARS} characters")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
               f"{len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS}")
        _check(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias",
               f"{len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        _check(all(-MAX_ABS_LOGIT_BIAS <= b <= MAX_ABS_LOGIT_BIAS for _t, b in self.logit_bias),
               "logit_bias", f"biases must be in [-{MAX_ABS_LOGIT_BIAS:g}, "
                             f"{MAX_ABS_LOGIT_BIAS:g}] (NaN is refused)")


def _strict(typ, value):
    ok = isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
    if not ok:
        raise TypeError(f"{value!r} is not {typ}")
    return value


def _check_token_ids(token_ids, vocab_size: int | None, name: str) -> None:
    upper = vocab_size if vocab_size is not None else 2**31
    for token_id in token_ids:
        _check(0 <= token_id < upper, name, f"token id {token_id} out of vocabulary "
                                            f"[0, {vocab_size or 'vocab size'})")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(name, message)
