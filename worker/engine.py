"""The engine: requests in, token chunks out. One object owns every sequence and the KV.

`LLMEngine.step()` is `schedule → execute → update → postprocess`. Nothing else mutates
engine state; the async wrapper (worker/async_engine.py) applies adds and aborts between
steps. A step that raises is redone one sequence at a time: only the sequences that fail
alone too end with an error.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field

import torch

from worker import kv_transfer
from worker.block_manager import BlockManager
from worker.checkpoints import Checkpointer, PrefixRestore
from worker.config import EngineConfig
from worker.decode_step import static_decode_mode
from worker.kv_cache import KVView, plan_kv_layout
from worker.loaders import load_model_files
from worker.loaders.model_files import ModelFiles
from worker.model_runner import ModelRunner
from worker.models.packing import describe_weights, multiplies_blocks
from worker.models.registry import build_model
from worker.process_memory import trim_heap
from worker.progress import Progress, stderr_progress
from worker.sampler import SampleResult
from worker.scheduler import Scheduler, SchedulerOutput
from worker.sequence import Sequence, SequenceStatus
from worker.snapshot import Snapshot, SnapshotKind
from worker.stops import StopStringMatcher
from worker.tokenizer import IncrementalDetokenizer
from worker.vocab.errors import InvalidRequestError, NotFoundError, PreconditionError
from worker.vocab.sampling_params import SamplingParams
from worker.vocab.streams import Resume, TokenChunk
from worker.warmup import check_attention_backend, warmup, warmup_shapes

log = logging.getLogger(__name__)

# Text longer than this many characters per context token cannot fit and is refused
# before tokenizing. English runs ~4.5 characters a token, 'a' * n about 8; only runs of
# whitespace pack more (one token can be 100+ spaces).
MAX_PROMPT_CHARS_PER_TOKEN = 32
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class _Output:
    """Per-request detokenisation and stop-string state."""

    detok: IncrementalDetokenizer
    stops: StopStringMatcher
    text: str = ""
    is_first: bool = True  # no chunk handed out yet


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineLoad:
    """What a worker reports with its heartbeat; KV blocks summed over the KV groups."""

    num_running: int
    num_waiting: int
    kv_blocks_free: int
    kv_blocks_total: int
    num_prefix_query_tokens: int
    num_prefix_hit_tokens: int
    num_restored_tokens: int  # of the hits: installed from the cluster-wide prompt cache
    num_prompt_tokens: int  # of every request queued (cached ones included)
    num_generation_tokens: int  # sampled
    num_preemptions: int


@dataclass(slots=True)
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


class LLMEngine:
    def __init__(self, config: EngineConfig, model_files: ModelFiles | None = None,
                 progress: Progress | None = None) -> None:
        """Load the model, lay out the KV cache, warm up. `progress` hears each stage of
        that wait (default: lines on stderr when it is a terminal, worker/progress.py)."""
        started = time.perf_counter()
        progress = stderr_progress() if progress is None else progress
        self.config = config
        progress(f"loading {config.model.model} ...")
        files = model_files or load_model_files(config.model.model, config.model.cache_dir,
                                                config.model.weights)
        # packed weights compute other KV than dense ones: a snapshot or prompt-cache entry
        # moves only between workers with the same weights policy
        weights = config.model.weights
        self.model_name = files.name
        self.fingerprint = files.fingerprint + (f"+weights={weights}" if weights else "")
        self.tokenizer = files.tokenizer
        self.eos_token_ids = files.eos_token_ids
        self.device = torch.device(config.model.device)
        self.dtype = _DTYPES[config.model.dtype]
        self.model = build_model(files.config, files.tensors, self.dtype, self.device,
                                 config.model.weights)
        if model_files is None:  # the loader's tensors die here: hand their heap back
            del files
            trim_heap()
        self.weights_summary = describe_weights(self.model)  # e.g. "int4 x210 (activations …)"
        args = self.model.args
        self.max_model_len = min(config.model.max_model_len or args.max_position_embeddings,
                                 args.max_position_embeddings)
        layout = plan_kv_layout(args, config.cache, config.scheduler, self.max_model_len,
                                self.dtype)
        self.block_manager = BlockManager(layout.block_size, layout.pool_sizes, layout.windows,
                                          config.cache.enable_prefix_caching,
                                          keep_all=config.cache.swa_full)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len,
                                   self.eos_token_ids)
        self.runner = ModelRunner(self.model, layout, self.block_manager.pools,
                                  self.max_model_len, config.scheduler.max_num_seqs,
                                  self.device, self.dtype,
                                  static_decode=static_decode_mode(
                                      config.model.compile, self.device, self.dtype,
                                      config.model.weights, multiplies_blocks(self.model)))
        self.attention_backend = check_attention_backend(args, self.device, self.dtype)
        self.kv = KVView(block_manager=self.block_manager,
                         kv_caches=tuple(self.runner.kv_caches),
                         layers_per_group=tuple(layout.layers_per_group),
                         fingerprint=self.fingerprint, model_name=self.model_name,
                         dtype=config.model.dtype, device=self.device,
                         num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
                         max_model_len=self.max_model_len)
        checkpoints = None if config.cache.swa_full else config.checkpoints
        self.checkpoints = Checkpointer(self.kv, checkpoints)
        self._outputs: dict[str, _Output] = {}
        self._arrivals = 0
        self._num_prompt_tokens = self._num_generation_tokens = 0  # monotonic, for metrics
        self.warmup_s = 0.0  # what the warmup took (0 when config.warmup is off)
        if config.warmup:
            shapes = warmup_shapes(config.scheduler, self.max_model_len, layout.block_size,
                                   self.device)
            progress(f"loaded in {time.perf_counter() - started:.1f}s; warming up "
                     f"({len(shapes)} step shapes) ...")
            self.warmup_s = warmup(self.runner, shapes)
        progress(f"ready in {time.perf_counter() - started:.1f}s "
                 f"(warmup {self.warmup_s:.1f}s{'' if config.warmup else ', skipped'})")

    # -- requests ----------------------------------------------------------------------

    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None,
                      prompt_token_ids: list[int] | None = None) -> list[int]:
        """Exactly one of text, chat messages or token ids → validated token ids."""
        given = [x is not None for x in (prompt, messages, prompt_token_ids)]
        if sum(given) != 1:
            raise InvalidRequestError("prompt", "give exactly one of prompt, messages, token ids")
        if messages is not None:
            if not messages:
                raise InvalidRequestError("messages", "must not be empty")
            self._check_prompt_chars("messages", sum(len(m["content"]) + 1 for m in messages))
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            # templates that write BOS themselves get no second one (llama.cpp does the same)
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            bos = self.tokenizer.bos_token_id
            if self.tokenizer.add_bos and bos is not None and ids[:1] != [bos]:
                ids = [bos, *ids]
        elif prompt is not None:
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            self._check_prompt_chars("prompt", len(prompt))
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt_token_ids)
            vocab = self.model.args.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError("prompt_token_ids",
                                          f"token id {bad[0]} out of vocabulary [0, {vocab})")
        if not ids:
            raise InvalidRequestError("prompt", "must not be empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"{len(ids)} tokens; the context holds {self.max_model_len} "
                          f"(prompt must be at most {self.max_model_len - 1})")
        return ids

    def _check_prompt_chars(self, field: str, chars: int) -> None:
        """Refuse text that cannot fit the context before paying to tokenize it (about
        2.5 s per MB on one core, so a 16 MiB message would tie up a worker for 40 s)."""
        limit = self.max_model_len * MAX_PROMPT_CHARS_PER_TOKEN
        if chars > limit:
            raise InvalidRequestError(
                field, f"{chars} characters; at most {limit} are tokenized "
                       f"({MAX_PROMPT_CHARS_PER_TOKEN} per token of the {self.max_model_len}"
                       "-token context)")

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, *, resume: Resume | None = None,
                    restore: PrefixRestore | None = None) -> Sequence:
        """Queue a request. resume (output tokens, and the characters of their text already
        handed out) continues one whose earlier tokens were produced elsewhere: a failover
        replay. Its KV is recomputed (or found in the prefix cache).
        restore, a prefix fetched from the cluster cache, is installed unless the local
        cache has as much or the pools lack room (then it is computed as usual)."""
        output_ids = list(resume.output_token_ids) if resume is not None else []
        seq = self._new_sequence(request_id, prompt_token_ids, output_ids, params)
        state = self._output_state(seq, resume.emitted_chars if resume is not None else 0)
        self._queue(seq, restore)
        self._arrivals += 1
        self._num_prompt_tokens += len(prompt_token_ids)
        self._outputs[request_id] = state
        return seq

    def _new_sequence(self, request_id: str, prompt_ids: list[int], output_ids: list[int],
                      params: SamplingParams, seed: int | None = None) -> Sequence:
        if request_id in self._outputs:
            raise InvalidRequestError("request_id", f"{request_id!r} is already running")
        params.validate(self.model.args.vocab_size)
        if params.max_tokens > self.max_model_len:
            raise InvalidRequestError("max_tokens", f"{params.max_tokens} is beyond the "
                                      f"{self.max_model_len}-token context (--ctx)")
        vocab = self.model.args.vocab_size
        if any(not 0 <= t < vocab for t in output_ids):
            raise InvalidRequestError("resume.output_token_ids", f"out of vocabulary [0, {vocab})")
        if output_ids and len(output_ids) >= params.max_tokens:
            raise InvalidRequestError("resume.output_token_ids",
                                      f"{len(output_ids)} tokens already reach max_tokens")
        if len(prompt_ids) + len(output_ids) >= self.max_model_len:
            raise InvalidRequestError("resume.output_token_ids", "the context is already full")
        if seed is None:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
        return Sequence(seq_id=request_id, token_ids=[*prompt_ids, *output_ids],
                        num_prompt_tokens=len(prompt_ids), params=params, seed=seed,
                        arrival=self._arrivals)

    def _output_state(self, seq: Sequence, emitted_chars: int) -> _Output:
        """Detokenizer and stop matcher positioned after the tokens already generated."""
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids)
        for token_id in seq.output_token_ids:
            detok.push(token_id)
        if not 0 <= emitted_chars <= len(detok.text):
            raise InvalidRequestError("resume.emitted_chars", f"{emitted_chars} is beyond the "
                                      f"{len(detok.text)} characters of the output so far")
        stops = StopStringMatcher(seq.params.stop, emitted=emitted_chars)
        return _Output(detok, stops, detok.text[:emitted_chars])

    # -- per-sequence state: export / import (snapshots) -----------------------------------

    def export(self, request_id: str, kind: SnapshotKind, pause: bool) -> Snapshot:
        """Snapshot a sequence at a step boundary. pause=True (migration) takes it out of
        scheduling, keeping its blocks, until commit_export decides its fate."""
        seq = self.scheduler.get(request_id)
        if seq is None:
            raise NotFoundError(f"request_id: no running request {request_id!r}")
        if seq.status == SequenceStatus.MIGRATING:
            raise PreconditionError(f"{request_id!r} is already being exported")
        snap = kv_transfer.export_snapshot(self.kv, seq, self._outputs[request_id].stops.emitted,
                                           kind)
        if pause:
            self.scheduler.pause(seq)
        return snap

    def commit_export(self, request_id: str, committed: bool) -> bool:
        """After a paused export: committed frees the sequence (FINISHED_MIGRATED), else it
        resumes here with the KV it kept. False when no export of that id is pending."""
        seq = self.scheduler.paused.get(request_id)
        if seq is None:
            return False
        if committed:
            self.scheduler.finish(seq, SequenceStatus.FINISHED_MIGRATED)
            self._forget(request_id)
        else:
            self.scheduler.resume(seq)
        return True

    def import_(self, snap: Snapshot, request_id: str | None = None,
                restore: PrefixRestore | None = None) -> Sequence:
        """Continue a snapshot's sequence here. Everything is checked before a block is
        taken; with KV for every group the sequence resumes exactly where it was, else
        its KV is recomputed after the prefix `restore` (from the cluster cache)."""
        kv_transfer.check_compatible(self.kv, snap)
        params = SamplingParams.from_dict(snap.params)
        rid = request_id or snap.request_id
        prompt = snap.token_ids[:snap.num_prompt_tokens]
        vocab = self.model.args.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise InvalidRequestError("snapshot", f"token id out of vocabulary [0, {vocab})")
        seq = self._new_sequence(rid, prompt, snap.token_ids[snap.num_prompt_tokens:], params,
                                 seed=snap.seed)
        state = self._output_state(seq, snap.emitted_chars)
        if kv_transfer.is_complete(snap):
            self.scheduler.check_capacity(seq)
            kv_transfer.install(self.kv, seq, snap)
            self.scheduler.add_with_kv(seq)
        else:
            self._queue(seq, restore)
        self._arrivals += 1
        self._outputs[rid] = state
        return seq

    def _queue(self, seq: Sequence, restore: PrefixRestore | None) -> None:
        if restore is None:
            self.scheduler.add(seq)
            return
        self.scheduler.check_capacity(seq)
        if self.checkpoints.install(seq, restore):
            self.scheduler.add_with_kv(seq)
        else:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self.scheduler.get(request_id)
        if seq is None:
            return False
        self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
        self._forget(request_id)
        return True

    def _forget(self, request_id: str) -> None:
        """Between steps (abort, migration): drop what the engine keeps for a request."""
        self._outputs.pop(request_id, None)
        self.checkpoints.forget(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # -- the step ----------------------------------------------------------------------

    def step(self) -> list[TokenChunk]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        now = time.monotonic()
        for item in out.scheduled:
            if item.seq.queue_time_s is None:
                item.seq.queue_time_s = now - item.seq.arrival_time
        failed: list[TokenChunk] = []
        try:
            results = self.runner.execute(out)
        except Exception as e:
            if len(out.scheduled) == 1:
                log.exception("engine step failed; failing its sequence")
                return self._fail(out, e)
            log.exception("engine step of %d sequences failed; redoing each alone",
                          len(out.scheduled))
            out, results, failed = self._redo_alone(out)
        events = self.scheduler.update(out, [r.token_id for r in results])
        self._num_generation_tokens += len(events)
        chunks = [self._postprocess(ev.seq, ev.token_id, r) for ev, r in zip(events, results,
                                                                              strict=True)]
        self.checkpoints.after_step(out)
        return chunks + failed

    def _redo_alone(self, out: SchedulerOutput
                    ) -> tuple[SchedulerOutput, list[SampleResult], list[TokenChunk]]:
        """A failed step, redone one sequence at a time, so a fault one row causes (an input
        the device math cannot take, a bug on one path) fails that sequence only. Rewriting
        a row's KV slots with the same values is harmless, and the sampler's counts change
        only when a step succeeds. -> the step of the sequences that went through, their
        results in order, and an error chunk per sequence that failed again alone."""
        done, results, failed = [], [], []
        for item in out.scheduled:
            alone = SchedulerOutput(scheduled=[item],
                                    admitted=[s for s in out.admitted if s is item.seq])
            try:
                results += self.runner.execute(alone)
            except Exception as e:
                log.exception("sequence %s fails alone too; failing it", item.seq.seq_id)
                failed += self._fail(alone, e)
            else:
                done.append(item)
        redone = SchedulerOutput(scheduled=done, preempted=out.preempted,
                                 admitted=[s for s in out.admitted if not s.status.is_finished])
        return redone, results, failed

    def _fail(self, out: SchedulerOutput, error: Exception) -> list[TokenChunk]:
        chunks = []
        for item in out.scheduled:
            seq = item.seq
            self.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)
            self._forget(seq.seq_id)
            chunks.append(TokenChunk(seq.seq_id, (), "", "error",
                                     error=f"{type(error).__name__}: {error}"))
        return chunks

    def _postprocess(self, seq: Sequence, token_id: int, result) -> TokenChunk:
        state = self._outputs[seq.seq_id]
        # an EOS or stop token ends the sequence but is not part of its text
        if seq.status != SequenceStatus.FINISHED_STOPPED:
            state.detok.push(token_id)
        if seq.status.is_finished:
            state.detok.flush()
        delta, stopped = state.stops.feed(state.detok.text)
        if stopped and not seq.status.is_finished:
            self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
        elif seq.status.is_finished:
            delta += state.stops.flush(state.detok.text)
        state.text += delta
        if seq.status.is_finished:
            self._outputs.pop(seq.seq_id, None)  # checkpoints see it at the step's end
        want_lp = seq.params.logprobs > 0
        first = state.is_first
        state.is_first = False
        return TokenChunk(
            seq.seq_id, (token_id,), delta, seq.status.finish_reason,
            logprobs=(result.logprob,) if want_lp else (),
            top_logprobs=(tuple(result.top_logprobs),) if want_lp else (),
            seed=seq.seed if first else None,
            num_cached_tokens=seq.num_cached_tokens if first else None,
            queue_time_s=seq.queue_time_s if first else None,
        )

    # -- conveniences ----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[GenerationResult]:
        """Run prompts to completion together (tests, CLI, benchmarks)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        results = {}
        for i, (ids, p) in enumerate(zip(prompts, params_list, strict=True)):
            rid = f"gen-{self._arrivals}-{i}"
            self.add_request(rid, ids, p)
            results[rid] = GenerationResult(rid, list(ids))
        while self.has_unfinished:
            for chunk in self.step():
                r = results[chunk.request_id]
                r.token_ids.extend(chunk.token_ids)
                r.text += chunk.text
                r.finish_reason = chunk.finish_reason or r.finish_reason
        return list(results.values())

    def load(self) -> EngineLoad:
        """Safe to call from another thread while a step runs: it only reads counters."""
        sched, bm = self.scheduler, self.block_manager
        return EngineLoad(
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            kv_blocks_free=sum(bm.num_free_blocks), kv_blocks_total=sum(bm.num_total_blocks),
            num_prefix_query_tokens=sched.num_prefix_query_tokens,
            num_prefix_hit_tokens=sched.num_prefix_hit_tokens,
            num_restored_tokens=self.checkpoints.num_restored_tokens,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
            num_preemptions=sched.num_preemptions,
        )

    def info(self) -> dict:
        bm = self.block_manager
        return {
            "model": self.model_name, "fingerprint": self.fingerprint,
            "architecture": self.model.args.architecture, "dtype": self.config.model.dtype,
            "device": str(self.device), "max_model_len": self.max_model_len,
            "slots": self.config.scheduler.max_num_seqs, "block_size": bm.block_size,
            "kv_blocks_total": bm.num_total_blocks, "kv_blocks_free": bm.num_free_blocks,
            "attention_backend": self.attention_backend,
            "weights": self.weights_summary,
        }
