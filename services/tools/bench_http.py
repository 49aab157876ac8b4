"""A minimal streaming client of the HTTP gateway for the benchmarks: raw HTTP/1.1 over
asyncio streams, so the figures carry no client library's parsing cost (the gRPC side
uses slotmesh's own thin client). One connection per stream, `Connection: close`."""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
import time
from pathlib import Path


async def load_http(address: str, ca: Path | None, prompts: list[str], new_tokens: int
                    ) -> tuple[list[float], list[float], int, float]:
    """Greedy `ignore_eos` completions of every prompt at once through the gateway at
    address; (TTFTs, inter-chunk gaps, tokens, wall seconds). Tokens come from each
    stream's usage chunk; a chunk's time is when its text arrived."""
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    start = time.perf_counter()
    results = await asyncio.gather(*(_stream(address, context, p, new_tokens)
                                     for p in prompts))
    wall = time.perf_counter() - start
    return ([r[0] for r in results], [g for r in results for g in r[1]],
            sum(r[2] for r in results), wall)


async def _stream(address: str, context: ssl.SSLContext | None, prompt: str,
                  new_tokens: int) -> tuple[float, list[float], int]:
    host, port = address.rsplit(":", 1)
    body = json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
    try:
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {address}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"gateway answered {status.decode().strip()}: "
                               f"{(await reader.read()).decode()[:300]}")
        stamps, num_tokens = [], 0
        # chunked transfer: each SSE event is one chunk, its size line before it
        async for line in reader:
            if not line.startswith(b"data: "):
                continue
            payload = line[len(b"data: "):].strip()
            if payload == b"[DONE]":
                break
            event = json.loads(payload)
            if event.get("usage"):
                num_tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    finally:
        writer.close()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return stamps[0] - start, gaps, num_tokens
