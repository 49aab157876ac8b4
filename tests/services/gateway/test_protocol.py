"""OpenAI bodies → gateway requests, errors → OpenAI's error JSON, chunks → responses;
in-process, no cluster (tests/cluster/test_gateway.py runs the real thing)."""

from __future__ import annotations

import argparse

import grpc
import pytest

from services.cli.main import build_parser
from services.client.clients import RpcError
from services.gateway.errors import ModelNotFoundError, http_error
from services.gateway.protocol import parse_chat, parse_completion
from services.gateway.responses import Choice, ResponseHead, usage
from services.rpc.convert import Prompt
from worker.vocab.errors import InvalidRequestError, UnavailableError
from worker.vocab.streams import TokenChunk

CHAT = [{"role": "user", "content": "Hi"}]


def param_of(body: dict, chat: bool = False) -> str:
    parse = parse_chat if chat else parse_completion
    with pytest.raises(InvalidRequestError) as e:
        parse(body, 1024)
    field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return http_error(e.value, is_chat=chat,
                      max_tokens_field=field)[1]["error"]["param"]


def test_prompt_forms() -> None:
    assert parse_completion({"prompt": "a"}, 1024).prompts == (Prompt(text="a"),)
    assert parse_completion({"prompt": [1, 2]}, 1024).prompts == (Prompt(token_ids=(1, 2)),)
    two = parse_completion({"prompt": ["a", [3]]}, 1024).prompts
    assert two == (Prompt(text="a"), Prompt(token_ids=(3,)))
    chat = parse_chat({"messages": [{"role": "developer", "content": [
        {"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]}]}, 1024)
    assert chat.prompts == (Prompt(messages=(("system", "be brief"),)),)


def test_defaults_and_vllm_fields() -> None:
    req = parse_completion({"prompt": "a", "top_k": -1, "min_p": 0.1, "stop": "x",
                            "ignore_eos": True, "stop_token_ids": [5],
                            "logit_bias": {"7": -100}, "logprobs": 0}, 1024)
    p = req.params
    assert p.max_tokens == 16 and p.top_k == 0 and p.min_p == 0.1 and p.stop == ("x",)
    assert p.ignore_eos and p.stop_token_ids == (5,) and p.logit_bias == ((7, -100.0),)
    assert req.num_logprobs == 0 and p.logprobs == 1  # the sampled token's logprob
    chat = parse_chat({"messages": CHAT, "max_completion_tokens": 9, "logprobs": True,
                       "top_logprobs": 3, "stream": True,
                       "stream_options": {"include_usage": True}}, 200)
    assert chat.params.max_tokens == 9 and chat.num_logprobs == 3 and chat.include_usage
    assert parse_chat({"messages": CHAT}, 200).params.max_tokens == 200


def test_choice_seeds() -> None:
    req = parse_completion({"prompt": "a", "seed": 7, "n": 3}, 1024)
    seeds = [req.choice_params(j).seed for j in range(3)]
    assert seeds[0] == 7 and len(set(seeds)) == 3 and all(0 <= s < 2**63 for s in seeds)
    assert [req.choice_params(j).seed for j in range(3)] == seeds  # a pure function
    assert parse_completion({"prompt": "a", "n": 2}, 1024).choice_params(1).seed is None


@pytest.mark.parametrize(("body", "chat", "param"), [
    ({"prompt": ""}, False, "prompt"),
    ({"prompt": [[]]}, False, "prompt"),
    ({"prompt": "a", "temperature": "hot"}, False, "temperature"),
    ({"prompt": "a", "temperature": -1}, False, "temperature"),
    ({"prompt": "a", "max_tokens": 0}, False, "max_tokens"),
    ({"messages": CHAT, "max_completion_tokens": 0}, True, "max_completion_tokens"),
    ({"messages": CHAT, "top_logprobs": 2}, True, "top_logprobs"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, True, "top_logprobs"),
    ({"prompt": "a", "logprobs": 21}, False, "logprobs"),
    ({"prompt": "a", "n": 0}, False, "n"),
    ({"prompt": "a", "stop": [1]}, False, "stop"),
    ({"prompt": "a", "logit_bias": {"x": 1}}, False, "logit_bias"),
    ({"prompt": "a", "echo": True}, False, "echo"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, False, "stream_options"),
    ({"messages": []}, True, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, True, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, True,
     "messages[0].content"),
    ({"messages": CHAT, "tools": [{"type": "function"}]}, True, "tools"),
    ({"messages": CHAT, "response_format": {"type": "json_object"}}, True,
     "response_format"),
])
def test_bad_fields_name_their_param(body, chat, param) -> None:
    assert param_of(body, chat) == param


def test_status_table_is_the_grpc_one() -> None:
    assert http_error(InvalidRequestError("top_p", "must be in (0, 1]"))[0] == 400
    assert http_error(UnavailableError("no worker available"))[0] == 503
    status, body = http_error(ModelNotFoundError("x", ["tiny"]))
    assert status == 404 and body["error"]["param"] == "model"
    assert body["error"]["code"] == "model_not_found"
    for code, status in ((grpc.StatusCode.UNAUTHENTICATED, 401),
                         (grpc.StatusCode.PERMISSION_DENIED, 403),
                         (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
                         (grpc.StatusCode.INTERNAL, 500)):
        assert http_error(RpcError(code, "no"))[0] == status
    # the worker names its own fields; OpenAI's names come back
    status, body = http_error(RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                                       "prompt: 600 tokens; the context holds 512"),
                              is_chat=True)
    assert status == 400 and body["error"]["param"] == "messages"


def test_responses_and_usage() -> None:
    head = ResponseHead(id="cmpl-1", created=1, model="m", is_chat=False, num_logprobs=1)
    choices = [Choice(index=i) for i in range(4)]  # 2 prompts x n=2
    for i, c in enumerate(choices):
        c.add(TokenChunk(request_id="r", token_ids=(5, 6), text="hi", finish_reason="length",
                         logprobs=(-0.5, -1.0), top_logprobs=(((5, -0.5), (9, -2.0)),
                                                              ((6, -1.0),)),
                         num_prompt_tokens=3 + i // 2, num_cached_tokens=1))
    assert usage(choices, 2) == {"prompt_tokens": 7, "completion_tokens": 8,
                                 "total_tokens": 15,
                                 "prompt_tokens_details": {"cached_tokens": 2}}
    out = head.response(choices, 2)
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == "hi"
    assert out["choices"][0]["logprobs"] == {
        "tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{"token_id:5": -0.5}, {"token_id:6": -1.0}], "text_offset": None}
    chat = ResponseHead(id="c", created=1, model="m", is_chat=True, num_logprobs=None)
    assert chat.role_chunk(0)["choices"][0]["delta"]["role"] == "assistant"
    last = chat.chunk(1, TokenChunk(request_id="r", token_ids=(), text="",
                                    finish_reason="stop"))
    assert last["choices"][0] == {"index": 1, "delta": {}, "logprobs": None,
                                  "finish_reason": "stop"}


def test_serve_and_up_wire_a_gateway() -> None:
    args: argparse.Namespace = build_parser().parse_args(["serve", "--model", "m",
                                                          "--port", "0"])
    assert args.func.__name__ == "cmd_up" and args.workers == 1 and args.http_port == 0
    assert args.port == 0  # the router's gRPC port: any free one
    up = build_parser().parse_args(["up", "--http-port", "8000"])
    assert up.http_port == 8000
    assert build_parser().parse_args(["up"]).http_port is None
    gateway = build_parser().parse_args(["gateway", "--router", "h:1", "--port", "0"])
    assert gateway.func.__name__ == "cmd_gateway" and gateway.router == "h:1"
