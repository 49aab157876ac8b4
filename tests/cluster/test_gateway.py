"""The OpenAI-compatible gateway with the official `openai` client, against a real cluster:
redis-server, a router with a tokens file, one worker on a tiny random Llama, and
`slotmesh gateway`, each a process. One cluster serves the module; every test leaves the
worker idle (checked), so the tests pass alone and in any order.

The gateway's answers are compared with the gRPC API's for the same request: greedy
text, seeded text, logprobs and prompt token counts must be the same numbers.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse

import openai
import pytest

from services.client.clients import Client
from services.security.auth import entry_for, write_tokens_file
from tests.cluster_harness import (
    is_idle,
    metric_value,
    scrape,
    sequence_keys,
    tiny_cluster,
    wait_metadata_flushed,
    wait_until,
)

pytestmark = pytest.mark.cluster

USER_TOKEN = "smk_user-token-for-the-gateway-tests"
ADMIN_TOKEN = "smk_admin-token-the-gateway-lists-workers-with"
PROMPT = "The quick brown fox jumps over"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say something about foxes."}]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, redis_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    tokens = tmp / "tokens.json"
    write_tokens_file(tokens, [entry_for("user", USER_TOKEN),
                               entry_for("admin", ADMIN_TOKEN, admin=True)])
    # the gateway (and the workers' drain) call the router with $SLOTMESH_TOKEN; the
    # tests' gRPC clients pass the user's token explicitly
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLOTMESH_TOKEN", ADMIN_TOKEN)
        # paced steps: a 400-token stream is still running when the disconnect test drops it
        with tiny_cluster(tiny_model_dir("llama"), redis_server.url, tmp / "logs",
                          num_workers=1, http_port=0, min_step_ms=5,
                          router_args=("--auth-tokens-file", str(tokens))) as c:
            yield c


@pytest.fixture(autouse=True)
def leaves_cluster_idle(cluster):
    yield
    for w in cluster.workers:
        wait_until(lambda w=w: is_idle(w.address), 10, f"{w.name} idle with all blocks free")


@pytest.fixture
def api(cluster):
    with openai.OpenAI(base_url=cluster.gateway_url, api_key=USER_TOKEN, max_retries=0,
                       timeout=60) as client:
        yield client


@pytest.fixture
def grpc_client(cluster):
    with Client(cluster.router_address, timeout=60, token=USER_TOKEN) as client:
        yield client


def model_name(api) -> str:
    return api.models.list().data[0].id


# -- models, health, metrics ---------------------------------------------------------------

def test_models_health_and_metrics(cluster, api) -> None:
    [model] = api.models.list().data
    assert model.id and model.owned_by == "slotmesh"
    assert model.model_extra["max_model_len"] == 512  # the tiny model's context
    status, body = raw_request(cluster, "GET", "/health", token=None)
    assert status == 200 and json.loads(body)["workers"] == 1
    api.completions.create(model=model.id, prompt=PROMPT, max_tokens=2)
    metrics = scrape(cluster.gateway.metrics_address)
    assert metric_value(metrics, "slotmesh_gateway_requests_total") >= 1


# -- the same answers as the gRPC API ------------------------------------------------------

def test_greedy_completion_and_chat_equal_the_grpc_api(api, grpc_client) -> None:
    model = model_name(api)
    grpc_text = grpc_client.generate(text=PROMPT, max_tokens=12, temperature=0)
    out = api.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == grpc_text.text
    assert out.choices[0].finish_reason == grpc_text.finish_reason
    assert out.usage.prompt_tokens == grpc_text.num_prompt_tokens
    assert out.usage.completion_tokens == len(grpc_text.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    grpc_chat = grpc_client.generate(messages=MESSAGES, max_tokens=12, temperature=0)
    chat = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12,
                                       temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == grpc_chat.text
    assert chat.usage.prompt_tokens == grpc_chat.num_prompt_tokens
    assert chat.usage.completion_tokens == len(grpc_chat.token_ids)


def test_streams_equal_the_whole_answers(api) -> None:
    model = model_name(api)
    whole = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10,
                                        temperature=0, extra_body={"ignore_eos": True})
    chunks = list(api.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    whole = api.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0)
    streamed = list(api.completions.create(model=model, prompt=PROMPT, max_tokens=10,
                                           temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert all(c.usage is None for c in streamed)  # no usage chunk unless asked


def test_token_id_prompts(api, grpc_client) -> None:
    model = model_name(api)
    ids = grpc_client.generate(text=PROMPT, max_tokens=6, temperature=0).token_ids
    grpc_out = grpc_client.generate(token_ids=ids, max_tokens=6, temperature=0)
    out = api.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
    assert out.choices[0].text == grpc_out.text
    assert out.usage.prompt_tokens == len(ids)
    two = api.completions.create(model=model, prompt=[ids, ids[:3]], max_tokens=6,
                                 temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == grpc_out.text
    assert two.usage.prompt_tokens == len(ids) + 3


def test_n_choices_and_seeds(cluster, api, grpc_client) -> None:
    model = model_name(api)
    grpc_seeded = grpc_client.generate(text=PROMPT, max_tokens=8, temperature=1.0, seed=7,
                                       ignore_eos=True)
    out = api.completions.create(model=model, prompt=[PROMPT, "Once upon a time"], n=2,
                                 max_tokens=8, temperature=1.0, seed=7,
                                 extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == grpc_seeded.text  # choice 0 samples with the seed itself
    assert out.usage.completion_tokens == 4 * 8
    again = api.completions.create(model=model, prompt=[PROMPT, "Once upon a time"], n=2,
                                   max_tokens=8, temperature=1.0, seed=7,
                                   extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in out.choices]

    cluster.restart_gateway()  # a new process: nothing of the first one's state is left
    with openai.OpenAI(base_url=cluster.gateway_url, api_key=USER_TOKEN,
                       max_retries=0, timeout=60) as fresh:
        after = fresh.completions.create(model=model, prompt=[PROMPT, "Once upon a time"],
                                         n=2, max_tokens=8, temperature=1.0, seed=7,
                                         extra_body={"ignore_eos": True})
    assert [c.text for c in after.choices] == [c.text for c in out.choices]


def test_stop_strings(api) -> None:
    model = model_name(api)
    full = api.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), f"the greedy text {full!r} has no stop string to cut at"
    cut = api.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                 stop=[stop, "never-seen"], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_logprobs_equal_the_grpc_api(api, grpc_client) -> None:
    model = model_name(api)
    grpc_out = grpc_client.generate(text=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    out = api.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0,
                                 logprobs=3)
    lp = out.choices[0].logprobs
    assert lp.tokens == [f"token_id:{t}" for t in grpc_out.token_ids]
    assert lp.token_logprobs == pytest.approx(grpc_out.logprobs, abs=1e-6)
    assert all(len(top) == 3 for top in lp.top_logprobs)

    chat_grpc = grpc_client.generate(messages=MESSAGES, max_tokens=5, temperature=0,
                                     logprobs=2)
    chat = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx(chat_grpc.logprobs, abs=1e-6)
    assert all(len(e.top_logprobs) == 2 for e in content)


# -- errors ----------------------------------------------------------------------------------

def test_errors_in_openai_shape(cluster, api) -> None:
    model = model_name(api)
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=-1)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=0)
    assert bad.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as bad:
        api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert bad.value.body["param"] == "tools" and "not supported" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:  # the worker's check: the context
        api.completions.create(model=model, prompt=[1] * 600, max_tokens=4)
    assert bad.value.body["param"] == "prompt"
    with pytest.raises(openai.NotFoundError) as missing:
        api.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=4)
    assert missing.value.body["param"] == "model"
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        api.embeddings.create(model=model, input="hi")
    with openai.OpenAI(base_url=cluster.gateway_url, api_key="smk_wrong", max_retries=0,
                       timeout=60) as stranger, pytest.raises(openai.AuthenticationError):
        stranger.completions.create(model=model, prompt=PROMPT, max_tokens=4)
    status, body = raw_request(cluster, "POST", "/v1/completions",
                               {"model": model, "prompt": PROMPT, "max_tokens": 4}, token=None)
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    status, body = raw_request(cluster, "POST", "/v1/completions", b"{not json")
    assert status == 400 and json.loads(body)["error"]["param"] == "body"


# -- raw HTTP: SSE framing and a client that hangs up -----------------------------------------

def raw_request(cluster, method: str, path: str, body: dict | bytes | None = None,
                token: str | None = USER_TOKEN) -> tuple[int, bytes]:
    conn = _connection(cluster)
    try:
        conn.request(method, path, **_body_and_headers(body, token))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _connection(cluster) -> http.client.HTTPConnection:
    url = urllib.parse.urlsplit(cluster.gateway_url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=60)


def _body_and_headers(body, token) -> dict:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return {"body": data, "headers": headers}


def test_raw_sse_framing(cluster, api) -> None:
    conn = _connection(cluster)
    conn.request("POST", "/v1/chat/completions", **_body_and_headers(
        {"model": model_name(api), "messages": MESSAGES, "max_tokens": 6, "stream": True,
         "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}},
        USER_TOKEN))
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    raw = response.read().decode()
    conn.close()
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw
    assert events[-1] == "data: [DONE]"
    objects = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert objects[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {o["object"] for o in objects} == {"chat.completion.chunk"}
    assert len({o["id"] for o in objects}) == 1
    usage = objects[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6


def test_disconnect_aborts_the_sequence(cluster, api) -> None:
    worker = cluster.workers[0]
    cancelled_before = num_cancelled(worker)
    conn = _connection(cluster)
    conn.request("POST", "/v1/completions", **_body_and_headers(
        {"model": model_name(api), "prompt": PROMPT, "max_tokens": 480, "stream": True,
         "ignore_eos": True}, USER_TOKEN))
    response = conn.getresponse()
    assert response.status == 200
    first = json.loads(response.readline().decode().removeprefix("data: "))
    assert first["object"] == "text_completion"
    # paced at >= 5 ms a step, the 480-token sequence is still running now
    assert not is_idle(worker.address)
    response.close()  # the client hangs up mid-stream
    conn.close()
    wait_until(lambda: is_idle(worker.address), 30, "the worker's blocks freed")
    assert num_cancelled(worker) == cancelled_before + 1
    wait_metadata_flushed(cluster)
    assert sequence_keys(cluster.redis_url) == []  # {first['id']}-0's record among them


def num_cancelled(worker) -> float:
    return metric_value(scrape(worker.metrics_address),
                        'slotmesh_worker_requests_total{finish_reason="cancelled"}')


def test_disconnect_of_a_whole_answer_aborts_too(cluster, api) -> None:
    worker = cluster.workers[0]
    cancelled_before = num_cancelled(worker)
    conn = _connection(cluster)
    conn.request("POST", "/v1/completions", **_body_and_headers(
        {"model": model_name(api), "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True},
        USER_TOKEN))
    # paced at >= 5 ms a step, the sequence runs for 2.4 s once it is admitted
    wait_until(lambda: not is_idle(worker.address), 30, "the sequence admitted")
    conn.close()  # the client hangs up before the answer
    wait_until(lambda: is_idle(worker.address), 30, "the worker's blocks freed")
    assert num_cancelled(worker) == cancelled_before + 1
