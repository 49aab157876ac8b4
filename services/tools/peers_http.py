"""The HTTP peers of `bench peers`: one OpenAI-compatible streaming client and the servers
it drives (llama.cpp's `llama-server`, vLLM's OpenAI server), started and stopped here.

Every peer gets the same request: POST /v1/completions with the prompt as token ids (so
no peer tokenizes differently), `max_tokens` new tokens, temperature 0 (greedy),
`ignore_eos`, `stream` with `stream_options.include_usage`, plus what that server needs
on top (llama-server: `n_predict`, and `cache_prompt: false` so a slot never reuses the
previous prompt's KV). The client reads the server-sent events, times the first token,
and takes the token count from the final `usage` (counting token events only when a
server sends none). A peer that cannot start is reported as not run, with why.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from services.tools.peers_workload import PromptFeed, RequestRecord, RunResult, summarize

_LOG_TAIL_CHARS = 1500


class PeerUnavailable(Exception):
    """A peer that cannot be run here; str() says why (shown as 'not run (why)')."""


class PeerRequestError(RuntimeError):
    """A running peer answered a request with an error."""


# -- the client ------------------------------------------------------------------------


def parse_sse(lines: Iterable[bytes | str]) -> Iterator[dict]:
    """The JSON payloads of an OpenAI-style event stream, up to `data: [DONE]`.

    Comment lines (`: ping`), `event:`/`id:` lines and blank separators are skipped; a
    payload is one `data:` line (OpenAI, vLLM and llama-server never split one).
    """
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        if data:
            yield json.loads(data)


@dataclass(slots=True)
class StreamTally:
    """What one completion stream delivered: the first token's time and the token count."""

    first_token_s: float | None = None
    num_token_events: int = 0
    usage_tokens: int | None = None  # usage.completion_tokens, when the server sent it

    def add(self, event: dict, now_s: float) -> None:
        if "error" in event:
            raise PeerRequestError(f"error event: {event['error']}")
        for choice in event.get("choices") or ():
            # a token's chunk has text (possibly "" for a partial UTF-8 character) and no
            # finish_reason, or the last token with it; llama-server's closing chunk has
            # an empty text and the finish_reason: not a token
            if choice.get("text") or choice.get("finish_reason") is None:
                self.num_token_events += 1
                if self.first_token_s is None:
                    self.first_token_s = now_s
        usage = event.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            self.usage_tokens = int(usage["completion_tokens"])

    @property
    def num_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.num_token_events


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenAIClient:
    """POSTs streaming /v1/completions to one server."""

    host: str
    port: int
    model: str  # the "model" field the server expects
    extra_body: dict = field(default_factory=dict)  # server-specific fields
    sends_n_predict: bool = False  # llama-server: n_predict too (it wins over max_tokens)
    timeout_s: float = 600.0

    def body(self, prompt_ids: list[int], new_tokens: int) -> dict:
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": new_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}, **self.extra_body}
        if self.sends_n_predict:
            body["n_predict"] = new_tokens
        return body

    def complete(self, prompt_ids: list[int], new_tokens: int, t0: float) -> RequestRecord:
        """One request; times in seconds since t0 (a time.perf_counter())."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            start = time.perf_counter() - t0
            conn.request("POST", "/v1/completions",
                         body=json.dumps(self.body(prompt_ids, new_tokens)),
                         headers={"Content-Type": "application/json",
                                  "Accept": "text/event-stream"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise PeerRequestError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
            tally = StreamTally()
            for event in parse_sse(iter(resp.readline, b"")):
                tally.add(event, time.perf_counter() - t0)
            end = time.perf_counter() - t0
        finally:
            conn.close()
        if tally.first_token_s is None:
            raise PeerRequestError("the stream ended without a token")
        return RequestRecord(start_s=start, first_token_s=tally.first_token_s, end_s=end,
                             num_tokens=tally.num_tokens)


def run_http(client: OpenAIClient, feed: PromptFeed, concurrency: int, rounds: int,
             new_tokens: int) -> RunResult:
    """Closed loop: `concurrency` threads, each sending `rounds` requests back to back."""
    records: list[RequestRecord] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    t0 = time.perf_counter()

    def client_loop() -> None:
        try:
            for _ in range(rounds):
                record = client.complete(feed.take()[0], new_tokens, t0)
                with lock:
                    records.append(record)
        except Exception as e:  # noqa: BLE001 - re-raised in the caller's thread below
            errors.append(e)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise PeerRequestError(f"{len(errors)} of {concurrency} clients failed: {errors[0]}")
    return summarize(records, time.perf_counter() - t0)


# -- the servers -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerSpec:
    """How to start one peer server and what its requests need."""

    name: str  # the report's row label
    argv: tuple[str, ...]
    port: int
    model: str  # the "model" field of requests
    extra_body: dict = field(default_factory=dict)
    sends_n_predict: bool = False
    env: dict = field(default_factory=dict)  # added to this process's environment
    start_timeout_s: float = 900.0  # vLLM compiles its step at startup: minutes on 2 cores


class PeerServer:
    """A started peer server process (its own session, so its children stop with it)."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            prefix=f"bench-peers-{spec.name.split()[0]}-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)
        self._proc = subprocess.Popen(spec.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **spec.env}, start_new_session=True)
        self.client = OpenAIClient(host="127.0.0.1", port=spec.port, model=spec.model,
                                   extra_body=spec.extra_body,
                                   sends_n_predict=spec.sends_n_predict)

    def wait_ready(self) -> float:
        """Poll GET /health until 200; returns the seconds it took. Raises PeerUnavailable
        (with the log's tail) when the process exits or the timeout passes first."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < self.spec.start_timeout_s:
            if self._proc.poll() is not None:
                raise PeerUnavailable(f"exited with {self._proc.returncode} while starting: "
                                      f"{self.log_tail()}")
            if self._healthy():
                return time.perf_counter() - t0
            time.sleep(1.0)  # polling a child process's readiness, not synchronising tests
        raise PeerUnavailable(f"not ready after {self.spec.start_timeout_s:.0f} s: "
                              f"{self.log_tail()}")

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.spec.port, timeout=5)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def log_tail(self) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        return " ".join(text[-_LOG_TAIL_CHARS:].split())

    def stop(self) -> None:
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)  # the session this Popen started
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._log.close()


def llama_server_spec(binary: str, gguf: Path, port: int, parallel: int, threads: int,
                      ctx_per_slot: int) -> ServerSpec:
    """llama-server on the model's GGUF as it is, `--parallel` slots of `ctx_per_slot`
    tokens each (its -c is the total, split over the slots), `threads` threads."""
    argv = (binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(parallel), "-t", str(threads), "-tb", str(threads),
            "-c", str(parallel * ctx_per_slot))
    return ServerSpec(name=f"llama-server ({gguf.name})", argv=argv, port=port,
                      model=gguf.name, extra_body={"cache_prompt": False},
                      sends_n_predict=True, start_timeout_s=300.0)


def vllm_spec(python: str, model_dir: Path, port: int, max_num_seqs: int, dtype: str,
              max_model_len: int, threads: int) -> ServerSpec:
    """vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`, MODELS.md) on
    an HF-format directory, prefix caching off, `max_num_seqs` sequences. Its OpenMP
    threads run on cores 0..threads-1 (VLLM_CPU_OMP_THREADS_BIND; left to vLLM's "auto",
    which keeps one core for its scheduler, only when the environment sets it: on 2 cores
    auto computes on one, the issue measured vLLM on both). KV cache: 2 GiB unless
    VLLM_CPU_KVCACHE_SPACE says otherwise."""
    argv = (python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
            "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(max_num_seqs), "--no-enable-prefix-caching")
    return ServerSpec(name=f"vLLM-cpu {dtype}", argv=argv, port=port, model="bench",
                      env={"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
                           "VLLM_CPU_OMP_THREADS_BIND":
                               os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")})


def python_has_vllm(python: str) -> str:
    """vLLM's version in that interpreter; PeerUnavailable when it has none."""
    try:
        out = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"],
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PeerUnavailable(f"{python}: {e}") from e
    if out.returncode != 0:
        raise PeerUnavailable(f"{python} cannot import vllm: "
                              f"{' '.join(out.stderr.split()[-30:])}")
    return out.stdout.strip()


def export_hf_dir(ckpt, hf_model, out_dir: Path) -> Path:
    """Write a loaded model as an HF directory vLLM can read: config + safetensors from the
    transformers model built over our dense checkpoint (GGUF blocks dequantized to fp32),
    the tokenizer as tokenizer.json. Skipped when out_dir already has a config.json."""
    if (out_dir / "config.json").exists():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(tmp)
    tok = ckpt.tokenizer
    tok.backend.save(str(tmp / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "bos_token": tok.token_text(tok.bos_token_id) if tok.bos_token_id is not None
              else None,
              "eos_token": tok.token_text(tok.eos_token_id) if tok.eos_token_id is not None
              else None,
              "add_bos_token": tok.add_bos, "model_max_length": 1 << 30}
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    tmp.rename(out_dir)
    return out_dir
