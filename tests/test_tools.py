"""Tool calling through the OpenAI API (the `openai` client against a real `expertmesh serve`) on a
model whose tokenizer has a tool format: a tiny Mixtral with Mistral's v3 tokenizer
(core/tool_format.py). The random model never chooses a call by itself, so the calls here are forced
(tool_choice required or named), which the server enforces as the calls' JSON schema; the prompt
side, tool definitions, calls and results, is checked token for token against mistral-common, the
format's reference. The v1 model's refusals are in test_http_api.py."""

from __future__ import annotations

import json

import grpc
import jsonschema
import openai
import pytest

from expertmesh.core.tiny_checkpoint import write_tiny_checkpoint
from expertmesh.v1 import generation_pb2 as pb
from expertmesh.v1 import generation_pb2_grpc as pb_grpc
from tests.gateway_server import ServerProcess
from tests.test_http_api import http_target, post

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": [-1, 0, 1, 2]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tools"), seed=13, tokenizer="v3", num_experts=4)


@pytest.fixture(scope="module")
def server(checkpoint):
    proc = ServerProcess("--model", str(checkpoint), "--workers", "0", "--kv-cache-memory", "32MiB",
                         "--http-port", "0", "--served-model-name", "tiny-v3")
    yield proc
    assert proc.stop() == 0, "".join(proc.lines[-30:])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=http_target(server), api_key="unused", max_retries=0)


def valid_call(call, tool: dict) -> dict:
    """A returned call of `tool`: its arguments, parsed and valid against the tool's schema."""
    assert call.type == "function" and call.function.name == tool["function"]["name"]
    assert call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


@pytest.mark.parametrize("parallel", [True, False])
def test_a_required_call_comes_back_as_tool_calls_that_fit_the_schema(client, parallel):
    reply = client.chat.completions.create(model="tiny-v3", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=parallel, max_tokens=200, temperature=0.8, seed=3)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    assert choice.message.tool_calls and (parallel or len(choice.message.tool_calls) == 1)
    for call in choice.message.tool_calls:
        valid_call(call, WEATHER)
    assert reply.usage.completion_tokens > 0


def test_a_named_call_calls_that_tool_and_streams_whole_in_the_last_chunk(client):
    kwargs = dict(model="tiny-v3", messages=ASK, tools=[WEATHER, TIME], max_tokens=200, temperature=0.7, seed=5,
                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = client.chat.completions.create(**kwargs)
    assert [c.function.name for c in whole.choices[0].message.tool_calls] == \
        ["get_time"] * len(whole.choices[0].message.tool_calls)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    calls = [call for chunk in chunks for choice in chunk.choices for call in choice.delta.tool_calls or []]
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and calls
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]  # same seed
    for call in calls:
        valid_call(call, TIME)


def test_the_prompt_of_a_tool_conversation_is_mistral_commons_own(server, checkpoint):
    """Tool definitions, an assistant's call and the tool's result: the ids /tokenize gives for the
    conversation equal mistral-common's encoding of it (ids mapped to Mistral's 9 characters)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    call = {"id": "abcDEF123", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temperature": 21}'},
                {"role": "user", "content": "And in Rome?"}]
    status, reply = post(f"{http_target(server).removesuffix('/v1')}/tokenize", {"messages": messages})
    assert status == 200, reply
    reference = MistralTokenizer.from_file(str(checkpoint / "tokenizer.model.v3"))
    expected = reference.encode_chat_completion(ChatCompletionRequest(messages=[
        UserMessage(content=ASK[0]["content"]),
        AssistantMessage(tool_calls=[ToolCall(id="abcDEF123", function=FunctionCall(
            name="get_weather", arguments=call["function"]["arguments"]))]),
        ToolMessage(tool_call_id="abcDEF123", content='{"temperature": 21}'),
        UserMessage(content="And in Rome?")])).tokens
    assert reply["tokens"] == expected
    # and the same conversation with tools to call, through the chat endpoint
    answer = post(f"{http_target(server)}/chat/completions", {
        "model": "tiny-v3", "messages": messages, "tools": [WEATHER], "max_tokens": 4})
    assert answer[0] == 200 and answer[1]["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


def test_tool_choice_none_renders_no_tools_and_auto_answers(server):
    url = f"{http_target(server)}/chat/completions"
    none = post(url, {"model": "tiny-v3", "messages": ASK, "tools": [WEATHER], "tool_choice": "none",
                      "max_tokens": 3, "temperature": 0})
    plain = post(url, {"model": "tiny-v3", "messages": ASK, "max_tokens": 3, "temperature": 0})
    assert none[0] == plain[0] == 200 and none[1]["usage"]["prompt_tokens"] == plain[1]["usage"]["prompt_tokens"]
    auto = post(url, {"model": "tiny-v3", "messages": ASK, "tools": [WEATHER], "max_tokens": 3, "temperature": 0})
    assert auto[0] == 200 and auto[1]["usage"]["prompt_tokens"] > plain[1]["usage"]["prompt_tokens"]  # tools shown


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "function": {}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [*ASK, {"role": "tool", "content": "42"}]}, "messages"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}]}, "messages"),
])
def test_bad_tool_requests_are_refused_by_name(server, body, param):
    status, reply = post(f"{http_target(server)}/chat/completions",
                         {"model": "tiny-v3", "messages": ASK, "max_tokens": 2, **body})
    assert status == 400 and reply["error"]["param"] == param, reply


def test_completions_refuse_tools_as_a_chat_field(server):
    for field, value in (("tools", [WEATHER]), ("tool_choice", "required"), ("parallel_tool_calls", False)):
        status, reply = post(f"{http_target(server)}/completions",
                             {"model": "tiny-v3", "prompt": "x", "max_tokens": 2, field: value})
        assert status == 400 and reply["error"]["param"] == field and "chat field" in reply["error"]["message"]


def grpc_tool(tool: dict) -> pb.Tool:
    f = tool["function"]
    return pb.Tool(name=f["name"], description=f.get("description", ""), parameters=json.dumps(f["parameters"]))


def test_grpc_streams_a_forced_call_as_text_and_gives_it_whole_at_the_end(server):
    """Over gRPC the call's JSON streams as text; the last message has the parsed calls and finish
    reason TOOL_CALLS; the conversation goes on with the call and its result."""
    ask = pb.ChatMessage(role="user", content=ASK[0]["content"])
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        out = list(stub.Generate(pb.GenerateRequest(
            messages=[ask], tools=[grpc_tool(WEATHER), grpc_tool(TIME)], tool_choice="get_weather",
            parallel_tool_calls=False, sampling=pb.SamplingParams(max_new_tokens=200, temperature=0.7, seed=5)),
            timeout=120))
        last = out[-1]
        assert last.finish_reason == pb.FINISH_REASON_TOOL_CALLS and len(last.tool_calls) == 1, last
        call = last.tool_calls[0]
        assert call.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
        streamed = json.loads("".join(r.text for r in out))  # the text is the calls' JSON
        assert [c["name"] for c in streamed] == ["get_weather"]
        follow = list(stub.Generate(pb.GenerateRequest(
            messages=[ask, pb.ChatMessage(role="assistant", tool_calls=[call]),
                      pb.ChatMessage(role="tool", tool_call_id=call.id, content='{"temperature": 21}'),
                      pb.ChatMessage(role="user", content="And in Rome?")],
            tools=[grpc_tool(WEATHER)], sampling=pb.SamplingParams(max_new_tokens=3, temperature=0)), timeout=60))
        assert follow[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        for bad in (pb.GenerateRequest(messages=[ask], tools=[pb.Tool(name="f", parameters="{not json")]),
                    pb.GenerateRequest(prompt="hi", tools=[grpc_tool(WEATHER)]),
                    pb.GenerateRequest(messages=[ask], tools=[grpc_tool(WEATHER)], tool_choice="nope")):
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(bad, timeout=30))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
