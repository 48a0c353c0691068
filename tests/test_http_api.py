"""The OpenAI-compatible HTTP API with the official `openai` client against a real `expertmesh serve`
(HTTP beside gRPC, one engine); transformers is the oracle."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from urllib.parse import urlsplit

import grpc
import openai
import pytest
import torch

from expertmesh.core.chat import MIXTRAL_INSTRUCT_TEMPLATE
from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.v1 import generation_pb2 as pb
from expertmesh.v1 import generation_pb2_grpc as pb_grpc
from tests.gateway_server import ServerProcess
from tests.helpers import wait_until_idle

PROMPT = [1, 415, 2936, 9060, 285, 1142]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_tiny_checkpoint(tmp_path_factory.mktemp("http"), seed=71, init_std=0.1, num_experts=4)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = MIXTRAL_INSTRUCT_TEMPLATE  # so transformers renders chats the same way
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoTokenizer, MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(checkpoint).eval(), AutoTokenizer.from_pretrained(checkpoint)


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def continuation(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text the new tokens add after the prompt (a streamed text's exact form)."""
    before = tokenizer.decode(prompt, skip_special_tokens=True)
    return tokenizer.decode(prompt + new, skip_special_tokens=True)[len(before):]


def http_target(server: ServerProcess) -> str:
    """The server's HTTP base URL, http://host:port/v1, from the line it prints after the gRPC one."""
    deadline = time.monotonic() + 30
    while True:
        line = next((line for line in server.lines if "HTTP (OpenAI API) on" in line), None)
        if line is not None:
            return line.rsplit(" ", 1)[1].strip()
        assert time.monotonic() < deadline, "".join(server.lines[-20:])
        time.sleep(0.05)


def post(url: str, body: bytes | dict, timeout: float = 30) -> tuple[int, dict]:
    """(status, JSON body) of a plain HTTP POST: what any client, not only `openai`, sends."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", parts.path, data, {"content-type": "application/json"})
    reply = conn.getresponse()
    status, payload = reply.status, reply.read()
    conn.close()
    return status, json.loads(payload) if payload else {}


def get_status(url: str) -> int:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", parts.path)
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.fixture(scope="module")
def server(checkpoint):
    proc = ServerProcess("--model", str(checkpoint), "--workers", "0", "--kv-cache-memory", "32MiB",
                         "--http-port", "0", "--served-model-name", "tiny-mixtral", "mixtral-alias")
    yield proc
    assert proc.stop() == 0, "".join(proc.lines[-30:])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=http_target(server), api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_name(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-mixtral", "mixtral-alias"]  # --served-model-name, in order
    return models[0].id


def test_greedy_completion_and_chat_equal_transformers(client, model_name, hf):
    model, tokenizer = hf
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=20, temperature=0,
                                    extra_body={"ignore_eos": True})
    expected = hf_greedy(model, PROMPT, 20)
    assert out.choices[0].text == continuation(tokenizer, PROMPT, expected)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (6, 20, 26)

    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Tell me a story."}]
    chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    answer = client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0,
                                            extra_body={"ignore_eos": True})
    expected = hf_greedy(model, list(chat_ids), 16)
    assert answer.choices[0].message.content == continuation(tokenizer, list(chat_ids), expected)
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage.prompt_tokens == len(chat_ids) and answer.usage.completion_tokens == 16


def test_echo_scores_a_batch_of_prompts_as_transformers_does(client, model_name, hf):
    """What lm-eval's multiple-choice and perplexity tasks send: a prompt list, echo, logprobs 1,
    max_tokens 0. Each choice (in order) gives its prompt's token logprobs equal to transformers'
    log-softmax within 1e-4, the first token's null; the top alternative is the argmax; the token
    strings join into the text and text_offset points at each."""
    model, _ = hf
    prompts = [[1, 415, 2936, 9060, 285, 1142, 461, 10575], [1, 22557, 28725, 910, 460, 368]]
    reply = client.completions.create(model=model_name, prompt=prompts, echo=True, logprobs=1, max_tokens=0,
                                      temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.usage.prompt_tokens == sum(map(len, prompts)) and reply.usage.completion_tokens == 0
    for prompt, choice in zip(prompts, reply.choices):
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)  # (T, V)
        lp = choice.logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        want = expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-4), (lp.token_logprobs, want)
        for top, row in zip(lp.top_logprobs[1:], expected[:-1]):
            assert len(top) == 1 and abs(next(iter(top.values())) - float(row.max())) < 1e-4
        assert "".join(lp.tokens) == choice.text and len(lp.tokens) == len(prompt)
        assert lp.text_offset == [len("".join(lp.tokens[:k])) for k in range(len(prompt))]
        assert choice.finish_reason == "length"


def test_a_prompt_list_returns_each_prompts_answer_in_order(client, model_name):
    prompts = ["Once upon a time", "The capital of", "1, 2, 3,"]
    alone = [client.completions.create(model=model_name, prompt=p, max_tokens=5, temperature=0).choices[0].text
             for p in prompts]
    together = client.completions.create(model=model_name, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert [c.text for c in together.choices] == alone
    echoed = client.completions.create(model=model_name, prompt=prompts[0], max_tokens=3, temperature=0,
                                       echo=True, logprobs=0)
    assert echoed.choices[0].text == prompts[0] + alone[0][:len(echoed.choices[0].text) - len(prompts[0])]
    assert "".join(echoed.choices[0].logprobs.tokens) == echoed.choices[0].text
    streamed = client.completions.create(model=model_name, prompt=prompts, max_tokens=5, temperature=0,
                                         stream=True)
    texts = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == alone


def test_streams_arrive_in_several_chunks_and_add_up(client, model_name):
    whole = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    chunks = list(client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=24,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) >= 5 and "".join(texts) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and not chunks[-1].choices

    parts = list(client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=12, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert len(parts) >= 5 and parts[-1].choices[0].finish_reason == "length"


def test_logprobs_and_seeds(client, model_name):
    out = client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(top) >= 1 for top in lp.top_logprobs)
    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    assert len(chat.choices[0].logprobs.content) == 3
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    assert "refusal" in chat.choices[0].logprobs.model_dump() and chat.choices[0].logprobs.refusal is None
    seeded = [client.completions.create(model=model_name, prompt="Bonjour", max_tokens=8, temperature=0.9,
                                        seed=5).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


BAD_FIELDS = [
    ({"temperature": -1}, "temperature"), ({"top_p": 2}, "top_p"), ({"n": 2}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100000}, "max_tokens"), ({"logprobs": 30}, "logprobs"), ({"presence_penalty": 5},
                                                                            "presence_penalty"),
    ({"frequency_penalty": -5}, "frequency_penalty"), ({"stop": ["x"] * 20}, "stop"), ({"stop": 5}, "stop"),
    ({"seed": "x"}, "seed"), ({"top_k": -1}, "top_k"), ({"min_p": 2}, "min_p"), ({"repetition_penalty": 0},
                                                                                    "repetition_penalty"),
    ({"prompt": [1, 99999]}, "prompt"), ({"prompt": [[1, 2], 5]}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2]] * 257}, "prompt"),
    ({"best_of": 3}, "best_of"), ({"stream": "yes"}, "stream"), ({"cache_salt": 5}, "cache_salt"),
    ({"cache_salt": "x" * 257}, "cache_salt"), ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"guided_regex": "("}, "guided_regex"), ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a"], "ignore_eos": True}, "ignore_eos"),
    ({"reasoning_effort": "low"}, "reasoning_effort"), ({"modalities": ["text", "audio"]}, "modalities"),
    ({"store": True}, "store"), ({"metadata": {"k": "v"}}, "metadata"),
]


@pytest.mark.parametrize("fields, param", BAD_FIELDS, ids=[p for _, p in BAD_FIELDS])
def test_every_bad_field_gets_400_with_its_name(server, model_name, fields, param):
    body = {"model": model_name, "prompt": [1, 2, 3], "max_tokens": 4, **fields}
    status, reply = post(f"{http_target(server)}/completions", body)
    assert status == 400, reply
    error = reply["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_cache_salt_keeps_tenants_prefix_caches_apart(client, model_name):
    """The openai client passes cache_salt as an extra field; usage reports the cached prompt tokens."""
    prompt = [1] + [9000 + i for i in range(40)]  # two full 16-token blocks and more

    def cached(salt: str | None) -> int:
        extra = {"cache_salt": salt} if salt is not None else {}
        reply = client.completions.create(model=model_name, prompt=prompt, max_tokens=1, extra_body=extra)
        return reply.usage.prompt_tokens_details.cached_tokens

    assert [cached("a"), cached("a"), cached("b"), cached(None), cached("b")] == [0, 32, 0, 0, 32]


def test_bad_chat_requests_and_a_wrong_model(server, client, model_name):
    for body, param in (({"messages": []}, "messages"), ({"messages": [{"role": "wizard", "content": "x"}]},
                                                          "messages"),
                        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2, "logprobs": True,
                          "tools": [{"type": "function"}]}, "tools"),
                        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_tokens")):
        status, reply = post(f"{http_target(server)}/chat/completions", {"model": model_name, **body})
        assert status == 400 and reply["error"]["param"] == param, reply
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert post(f"{http_target(server)}/completions", b"{not json")[0] == 400
    status, reply = post(f"{http_target(server)}/completions", b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested too deeply" in reply["error"]["message"], (status, reply)  # not a 500


def request(method: str, url: str, body: dict | None = None, headers: dict | None = None):
    """(status, headers, JSON body) of a plain HTTP call."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request(method, parts.path, None if body is None else json.dumps(body).encode(),
                 {"content-type": "application/json", **(headers or {})})
    reply = conn.getresponse()
    status, head, payload = reply.status, dict(reply.getheaders()), reply.read()
    conn.close()
    return status, head, json.loads(payload)


def test_model_cards_by_every_served_name_and_json_errors_for_every_status(server, client):
    assert client.models.retrieve("mixtral-alias").id == "mixtral-alias"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    reply = client.completions.create(model="mixtral-alias", prompt=[1, 2], max_tokens=2)
    assert reply.model == "mixtral-alias"  # the name the request used
    base = http_target(server)
    for method, url, status in (("GET", f"{base}/nothing-here", 404), ("GET", f"{base}/completions", 405),
                                ("DELETE", f"{base}/models", 405)):
        got, _, body = request(method, url)
        assert got == status and isinstance(body["error"]["message"], str), (url, got, body)


def test_chat_roles_clients_send(server, client, model_name):
    def answer(messages):
        reply = client.chat.completions.create(model=model_name, messages=messages, max_tokens=6, temperature=0)
        assert reply.choices[0].message.refusal is None
        return reply.choices[0].message.content

    user = {"role": "user", "content": "Name a colour."}
    assert answer([{"role": "developer", "content": "Be brief."}, user]) == \
        answer([{"role": "system", "content": "Be brief."}, user])  # developer is the system message
    assert isinstance(answer([user, {"role": "assistant", "content": None}, user]), str)
    status, reply = post(f"{http_target(server)}/chat/completions", {
        "model": model_name, "messages": [user, {"role": "tool", "content": "42", "tool_call_id": "x"}]})
    assert status == 400 and reply["error"]["param"] == "messages" and "tool" in reply["error"]["message"]


def test_tokenize_and_detokenize_in_vllms_shapes(server, client, model_name):
    root = http_target(server).removesuffix("/v1")
    status, reply = post(f"{root}/tokenize", {"model": model_name, "prompt": "Hello world"})
    assert status == 200 and reply["count"] == len(reply["tokens"]) and reply["max_model_len"] > 0
    completion = client.completions.create(model=model_name, prompt="Hello world", max_tokens=1)
    assert completion.usage.prompt_tokens == reply["count"]  # the same tokens the model sees
    status, text = post(f"{root}/detokenize", {"tokens": reply["tokens"]})
    assert status == 200 and text["prompt"].strip() == "Hello world"
    status, chat = post(f"{root}/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    assert status == 200 and chat["count"] > 2
    for path, body, param in (("tokenize", {"prompt": 5}, "prompt"), ("detokenize", {"tokens": [-1]}, "tokens"),
                              ("tokenize", {"prompt": "x", "model": "gpt-4"}, "model")):
        status, reply = post(f"{root}/{path}", body)
        assert status in (400, 404) and reply["error"]["param"] == param, reply


# Every property of the request schemas CreateCompletionRequest and CreateChatCompletionRequest in
# OpenAI's OpenAPI spec (openai/openai-openapi, openapi.yaml, as of 2026-11), with a value that is not
# the default: each is honoured (200) or refused by name (400), never ignored.
HONOURED = {
    "model": None, "prompt": None, "messages": None,  # set by the test itself
    "frequency_penalty": 0.5, "presence_penalty": 0.5, "logprobs": 2, "max_tokens": 3, "n": 1, "seed": 7,
    "stop": ["zzz"], "stream": False, "stream_options": {"include_usage": True}, "temperature": 0.7,
    "top_p": 0.9, "user": "alice", "echo": True, "max_completion_tokens": 3, "top_logprobs": 2,
    "modalities": ["text"], "response_format": {"type": "text"}, "service_tier": "auto",
    "safety_identifier": "alice-1",
}
REFUSED = {
    "best_of": 2, "logit_bias": {"50256": -100}, "suffix": "end", "audio": {"voice": "alloy", "format": "mp3"},
    "function_call": "auto", "functions": [{"name": "f"}], "metadata": {"k": "v"}, "moderation": True,
    "parallel_tool_calls": True, "prediction": {"type": "content", "content": "x"},
    "prompt_cache_key": "k", "prompt_cache_options": {"x": 1}, "prompt_cache_retention": "24h",
    "reasoning_effort": "low", "store": True, "tool_choice": "auto",
    "tools": [{"type": "function", "function": {"name": "f"}}], "verbosity": "low",
    "web_search_options": {"search_context_size": "low"},
}
COMPLETION_FIELDS = {"best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "model", "n",
                     "presence_penalty", "prompt", "seed", "stop", "stream", "stream_options", "suffix",
                     "temperature", "top_p", "user"}
CHAT_FIELDS = {"audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
               "max_completion_tokens", "max_tokens", "messages", "metadata", "modalities", "model", "moderation",
               "n", "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key",
               "prompt_cache_options", "prompt_cache_retention", "reasoning_effort", "response_format",
               "safety_identifier", "seed", "service_tier", "stop", "store", "stream", "stream_options",
               "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
               "web_search_options"}


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_every_field_of_the_spec_is_honoured_or_refused_by_name(server, model_name, chat):
    fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
    assert fields <= set(HONOURED) | set(REFUSED), sorted(fields - set(HONOURED) - set(REFUSED))
    base = {"model": model_name, "max_tokens": 3, "temperature": 0}
    base |= {"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": [1, 2, 3]}
    path = f"{http_target(server)}/{'chat/completions' if chat else 'completions'}"
    for field in sorted(fields - {"model", "prompt", "messages"}):
        value = HONOURED.get(field, REFUSED.get(field))
        if chat and field == "logprobs":
            value = True  # chat's logprobs is a flag; top_logprobs sets how many
        status, reply = post(path, {**base, field: value})
        if field in REFUSED:
            assert status == 400 and reply["error"]["param"] == field, (field, status, reply)
        else:
            assert status == 200, (field, reply)


def test_langchain_chat_model_talks_to_the_server(server, model_name, client):
    """langchain-openai's ChatOpenAI, as agents use it: invoke and stream give the server's greedy
    answer; binding tools is refused by name (the v1 tokenizer has no tool format), not ignored."""
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is a test dependency")
    import openai as openai_sdk

    chat = langchain_openai.ChatOpenAI(base_url=http_target(server), api_key="unused", model=model_name,
                                       temperature=0, max_tokens=8, max_retries=0, timeout=60)
    expected = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8, temperature=0).choices[0].message.content
    assert chat.invoke("Hi").content == expected
    assert "".join(chunk.content for chunk in chat.stream("Hi")) == expected
    with pytest.raises(openai_sdk.BadRequestError, match="tools"):
        chat.bind_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
                        ).invoke("Hi")


SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "string", "enum": ["yes", "no", "maybe"]}, "confident": {"type": "boolean"},
    "colour": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["answer", "confident", "colour"], "additionalProperties": False}


@pytest.mark.parametrize("schema,enforced", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, False),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, False),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, False),
    ({"type": "object", "$defs": {"x": {"if": {"type": "integer"}, "then": {"minimum": 3}}}}, False),
    # keywords' names as property names and enum values are no keywords
    ({"type": "object", "properties": {"not": {"type": "integer"}, "if": {"enum": ["uniqueItems"]}},
      "required": ["not"]}, True),
])
def test_schema_keywords_the_grammar_cannot_enforce_are_refused_by_name(server, model_name, schema, enforced):
    """Never half-honoured: a keyword xgrammar accepts without enforcing is refused, naming it."""
    pytest.importorskip("xgrammar", reason="structured output needs xgrammar (expertmesh[structured])")
    status, reply = post(f"{http_target(server)}/chat/completions", {
        "model": model_name, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    if enforced:
        assert status == 200, reply
    else:
        assert status == 400 and reply["error"]["param"] == "response_format", reply
        assert "cannot enforce" in reply["error"]["message"], reply


def test_structured_output_follows_its_schema_on_every_sample(client, model_name):
    """The random model left to itself writes no JSON; constrained, every one of 8 sampled answers
    (temperature 1, different seeds) parses and validates against its schema. json_object gives a
    JSON object; vLLM's guided_choice and guided_regex extensions hold too."""
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar", reason="structured output needs xgrammar (expertmesh[structured])")
    messages = [{"role": "user", "content": "Answer in JSON."}]
    free = client.chat.completions.create(model=model_name, messages=messages, max_tokens=40, temperature=0)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    for seed in range(8):
        reply = client.chat.completions.create(model=model_name, messages=messages, max_tokens=60, temperature=1.0,
                                               seed=seed, response_format=fmt)
        assert reply.choices[0].finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    # any JSON object: one may run past max_tokens (a string the model never closes); every one that
    # ends is an object, and the grammar let some end
    ended = 0
    for seed in range(32):
        obj = client.completions.create(model=model_name, prompt="JSON:", max_tokens=30, temperature=1.0, seed=seed,
                                        extra_body={"response_format": {"type": "json_object"}})
        if obj.choices[0].finish_reason == "stop":
            ended += 1
            assert isinstance(json.loads(obj.choices[0].text), dict), obj.choices[0].text
    assert ended > 0
    for seed in range(4):
        pick = client.completions.create(model=model_name, prompt="Colour:", max_tokens=10, temperature=1.0,
                                         seed=seed, extra_body={"guided_choice": ["red", "green", "blue"]})
        assert pick.choices[0].text in ("red", "green", "blue")
        code = client.completions.create(model=model_name, prompt="Code:", max_tokens=12, temperature=1.0,
                                         seed=seed, extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"})
        assert re.fullmatch("[A-Z]{3}-[0-9]{2}", code.choices[0].text), code.choices[0].text


def test_a_disconnected_stream_frees_its_blocks(server, model_name):
    body = {"model": model_name, "prompt": [1, 5, 6], "max_tokens": 2000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    parts = urlsplit(f"{http_target(server)}/completions")
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", parts.path, json.dumps(body).encode(), {"content-type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.getheader("content-type").startswith("text/event-stream")
    got = []
    while len(got) < 3:
        line = reply.readline().decode()
        if line.startswith("data: "):
            got.append(line)
    conn.close()  # the client goes away mid-stream
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        steps = wait_until_idle(stub, timeout=10).steps
        time.sleep(0.3)
        assert stub.GetServerStats(pb.GetServerStatsRequest(), timeout=10).steps == steps  # it stopped computing


def test_auth_and_a_full_queue(checkpoint):
    proc = ServerProcess("--model", str(checkpoint), "--workers", "0", "--kv-cache-memory", "16MiB",
                         "--http-port", "0", "--auth-token", "s3cret", "--max-seqs", "1", "--max-queue", "1")
    try:
        base = http_target(proc)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        status, head, _ = request("GET", f"{base}/models")
        assert status == 401 and head.get("www-authenticate", head.get("WWW-Authenticate", "")).startswith("Bearer")
        status, _, body = request("GET", f"{base}/models", headers={"authorization": "bearer s3cret"})
        assert status == 200 and body["data"], body  # the scheme is case-insensitive
        assert get_status(base.removesuffix("/v1") + "/health") == 200  # probes need no token
        good = openai.OpenAI(base_url=base, api_key="s3cret", max_retries=0, timeout=60)
        name = good.models.list().data[0].id
        assert good.completions.create(model=name, prompt=[1, 2], max_tokens=2).usage.completion_tokens == 2
        # one running, one waiting: the next is refused with 429 at once
        holding, started = [], threading.Semaphore(0)

        def hold():
            stream = good.completions.create(model=name, prompt=[1, 7], max_tokens=400, stream=True,
                                             extra_body={"ignore_eos": True})
            for i, _ in enumerate(stream):
                if i == 0:
                    started.release()
            holding.append(True)

        first = threading.Thread(target=hold)
        first.start()
        assert started.acquire(timeout=30)
        second = threading.Thread(target=hold)
        second.start()
        time.sleep(0.3)
        with pytest.raises(openai.RateLimitError):
            good.completions.create(model=name, prompt=[1, 9], max_tokens=2)
        first.join(timeout=120)
        second.join(timeout=120)
        assert holding == [True, True]  # nothing accepted was lost
    finally:
        assert proc.stop() == 0


def test_serve_opens_the_openai_api_by_default_and_no_http_turns_it_off(checkpoint):
    from expertmesh.cli import DEFAULT_HTTP_PORT, build_parser

    args = build_parser().parse_args(["serve"])
    assert args.http and args.http_port == DEFAULT_HTTP_PORT == 8000  # vLLM's and llama.cpp's port
    proc = ServerProcess("--model", str(checkpoint), "--workers", "0", "--kv-cache-memory", "32MiB", "--no-http")
    try:
        with grpc.insecure_channel(proc.target) as channel:  # gRPC serves
            pb_grpc.GenerationStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=60)
        assert not any("HTTP" in line for line in proc.lines), "".join(proc.lines)
    finally:
        assert proc.stop() == 0
