"""The gRPC gateway: expertmesh.v1.Generation over grpc.aio, plus health and reflection.

Each Generate call becomes one request of the serving engine; its chunks come back through an
asyncio queue and stream out as they are produced. A client that goes away (cancel, deadline) has
its request cancelled at once, which frees its KV blocks at the next step boundary.

Hostile input: CPU work per request (tokenising, chat rendering) runs on a small thread pool, never
on the event loop; undecodable bytes answer INVALID_ARGUMENT; every status detail is cut to fit the
trailer; a call can only ever cancel its own request (the engine keys requests, not the client).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from expertmesh.api.front_door import SHUTTING_DOWN, STATUS, Drain, bearer_matches, chat_role
from expertmesh.api.prompts import PromptBuilder
from expertmesh.api.request_builder import (
    CHAT,
    NO_TOOL_FORMAT,
    TEXT,
    TOKEN_IDS,
    ClientRequest,
    Prompt,
    RequestBuilder,
    ToolRequest,
    tool_request,
    with_tools,
)
from expertmesh.core.tokenizer import TextTokenizer
from expertmesh.core.tool_format import AnswerCalls, ToolFormat
from expertmesh.router.requests import (
    MAX_REQUEST_ID_CHARS,
    InvalidRequest,
    ValidRequest,
)
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import EngineUnavailable, QueueFull, RequestOutput, ServingEngine
from expertmesh.router.structured import StructureSpec
from expertmesh.v1 import generation_pb2 as pb
from expertmesh.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger("expertmesh.gateway")

SERVICE = "expertmesh.v1.Generation"
ADMIN_SERVICE = "expertmesh.v1.Admin"
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS,
          "cancelled": pb.FINISH_REASON_CANCELLED}


def _decimal(value: float) -> float:
    """A proto float (float32) as the decimal the client wrote: 0.01 arrives as 0.00999999977..., which
    would fail a check of >= 0.01; the shortest repr that round-trips float32 gives 0.01 back."""
    return float(str(np.float32(value)))


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    """Proto fields -> SamplingParams; unset optional fields take the defaults."""
    defaults = SamplingParams()
    pick = lambda name: getattr(s, name) if s.HasField(name) else getattr(defaults, name)  # noqa: E731
    return SamplingParams(
        temperature=_decimal(pick("temperature")), top_p=_decimal(pick("top_p")), top_k=s.top_k,
        min_p=_decimal(s.min_p), repetition_penalty=_decimal(pick("repetition_penalty")),
        presence_penalty=_decimal(s.presence_penalty), frequency_penalty=_decimal(s.frequency_penalty),
        seed=s.seed if s.HasField("seed") else None,
        max_new_tokens=pick("max_new_tokens"), stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos, logprobs=s.logprobs if s.HasField("logprobs") else None,
        prompt_logprobs=s.prompt_logprobs if s.HasField("prompt_logprobs") else None)


def request_from_proto(request: pb.GenerateRequest, tool_format: ToolFormat | None = None) -> ClientRequest:
    """A Generate call's fields -> the doors' common ClientRequest (api/request_builder.py)."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id has {len(request.request_id)} characters; at most "
                             f"{MAX_REQUEST_ID_CHARS}", "request_id")
    given = [name for name in ("prompt", "token_ids", "messages") if len(getattr(request, name))]
    if len(given) != 1:
        raise InvalidRequest("exactly one of prompt, token_ids, messages must be set"
                             + (f" (got {', '.join(given)})" if given else " (got none)"), "prompt")
    if request.prompt:
        prompt = Prompt(TEXT, request.prompt)
    elif request.token_ids:
        prompt = Prompt(TOKEN_IDS, list(request.token_ids))
    else:
        prompt = Prompt(CHAT, messages_from_proto(request.messages, tool_format))
    tools = tool_request(tools_from_proto(request.tools) if request.tools else None,
                         _tool_choice(request.tool_choice) if request.tool_choice else None,
                         request.parallel_tool_calls if request.HasField("parallel_tool_calls") else None,
                         tool_format)
    if tools is not None and prompt.kind != CHAT:
        raise InvalidRequest("tools need messages (a chat), not a prompt or token ids", "tools")
    return ClientRequest((prompt,), sampling_from_proto(request.sampling), request.cache_salt,
                         with_tools(structure_from_proto(request), tools), tools)


def messages_from_proto(messages, tool_format: ToolFormat | None) -> list[dict]:
    """ChatMessages -> OpenAI-shaped dicts; tool calls and results only where there is a tool format."""
    out = []
    for i, m in enumerate(messages):
        message = {"role": chat_role(m.role), "content": m.content}
        if m.tool_calls or m.tool_call_id or m.role == "tool":
            if tool_format is None:
                raise InvalidRequest(f"messages[{i}]: tool calls and results need a tool format: {NO_TOOL_FORMAT}",
                                     "messages")
            if m.role == "tool":
                message["tool_call_id"] = m.tool_call_id
            else:
                message["tool_calls"] = [{"id": c.id, "type": "function",
                                          "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
        out.append(message)
    return out


def tools_from_proto(tools) -> list[dict]:
    """Tools -> OpenAI's shape, their parameter schemas parsed."""
    out = []
    for i, t in enumerate(tools):
        try:
            parameters = json.loads(t.parameters) if t.parameters else {"type": "object"}
        except ValueError:
            raise InvalidRequest(f"tools[{i}].parameters is not JSON", "tools") from None
        out.append({"type": "function", "function": {"name": t.name, "description": t.description,
                                                     "parameters": parameters}})
    return out


def _tool_choice(choice: str):
    return choice if choice in ("", "auto", "none", "required") else {"type": "function", "function": {"name": choice}}


def structure_from_proto(request: pb.GenerateRequest) -> StructureSpec | None:
    if not request.HasField("structured"):
        return None
    s = request.structured
    kind = s.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not s.json_object):
        return None
    if kind == "json_object":
        return StructureSpec("json", "", "structured")
    if kind == "choice":
        return StructureSpec("choice", json.dumps(list(s.choice.values)), "structured")
    return StructureSpec(kind, getattr(s, kind), "structured")


def _logprob(lp) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def response_from_output(out: RequestOutput) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=out.request_id, token_ids=out.token_ids, text=out.text)
    msg.logprobs.extend(_logprob(lp) for lp in out.logprobs)
    if out.prompt_logprobs:
        msg.prompt_logprobs.extend(_logprob(lp) for lp in out.prompt_logprobs[1:])
    if out.finish_reason is not None:
        msg.finish_reason = FINISH.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=out.usage.prompt_tokens,
                                    completion_tokens=out.usage.completion_tokens,
                                    cached_prompt_tokens=out.usage.cached_prompt_tokens))
    return msg


MAX_DETAIL_CHARS = 1024  # status details stay far below gRPC's 16 KiB trailer limit


def _detail(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else f"{text[:MAX_DETAIL_CHARS - 20]}... (cut)"


class Undecodable:
    """A request whose bytes are not the method's message (what the guarded deserializer returns)."""

    def __init__(self, why: str):
        self.why = why


def _guarded(deserialize):
    def decode(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or anything else protobuf meets in junk
            return Undecodable(f"{type(exc).__name__}: {str(exc)[:200]}")
    return decode


class RefuseUndecodable(grpc.aio.ServerInterceptor):
    """Bytes that are not the method's message answer INVALID_ARGUMENT, on every service (health and
    reflection included); grpc itself would answer UNKNOWN with a Python class name."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method, decode, encode = details.method, _guarded(handler.request_deserializer), handler.response_serializer

        async def refuse(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the request is not a valid message for {method} ({request.why})")

        def checked(requests, context):
            async def each():
                async for request in requests:
                    await refuse(request, context)
                    yield request
            return each()

        if handler.unary_unary:
            async def unary_unary(request, context, behavior=handler.unary_unary):
                await refuse(request, context)
                return await behavior(request, context)
            return grpc.unary_unary_rpc_method_handler(unary_unary, decode, encode)
        # A streaming handler is an async generator (yields its responses) or a coroutine that
        # writes them with context.write (health's Watch): each is wrapped as what it is.
        if handler.unary_stream:
            behavior = handler.unary_stream
            if inspect.isasyncgenfunction(behavior):
                async def unary_stream(request, context):
                    await refuse(request, context)
                    async for response in behavior(request, context):
                        yield response
            else:
                async def unary_stream(request, context):
                    await refuse(request, context)
                    await behavior(request, context)
            return grpc.unary_stream_rpc_method_handler(unary_stream, decode, encode)
        if handler.stream_unary:
            async def stream_unary(requests, context, behavior=handler.stream_unary):
                return await behavior(checked(requests, context), context)
            return grpc.stream_unary_rpc_method_handler(stream_unary, decode, encode)
        behavior = handler.stream_stream
        if inspect.isasyncgenfunction(behavior):
            async def stream_stream(requests, context):
                async for response in behavior(checked(requests, context), context):
                    yield response
        else:
            async def stream_stream(requests, context):
                await behavior(checked(requests, context), context)
        return grpc.stream_stream_rpc_method_handler(stream_stream, decode, encode)


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, engine: ServingEngine, tokenizer: TextTokenizer, chat_template: str,
                 model_info: Callable[[], pb.ModelInfo], prepare_threads: int = 2, tool_format=None):
        self.engine = engine
        self.prompts = PromptBuilder(tokenizer, chat_template, engine.limits, tool_format)
        self.builder = RequestBuilder(self.prompts, engine.grammars, engine.limits)
        self.model_info = model_info  # built per call: the placement changes while serving
        # Tokenising and chat rendering run here, off the event loop, so a big prompt never holds up
        # other streams or the health check; a small pool bounds how much of it runs at once.
        self.prepare = ThreadPoolExecutor(prepare_threads, thread_name_prefix="expertmesh-prepare")
        self.drain = Drain()  # shared with the HTTP door (serve passes this one to it)

    def _valid(self, request: pb.GenerateRequest) -> tuple[ValidRequest, ToolRequest | None]:
        """The one check of a Generate call: prompt and sampling against the model and the pool;
        and the tools its answer may call."""
        client = request_from_proto(request, self.prompts.tool_format)
        return self.builder.build(client)[0], client.tools

    def _chat_ids(self, messages) -> list[int]:
        return self.prompts.chat(messages_from_proto(messages, self.prompts.tool_format))

    async def Generate(self, request, context):
        if not self.drain.enter():  # UNAVAILABLE, not CANCELLED: clients retry it on another replica
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        key, finished = None, False
        try:
            try:
                valid, tools = await loop.run_in_executor(self.prepare, self._valid, request)
                key = self.engine.submit(valid, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out),
                                         client_id=request.request_id)
            except (InvalidRequest, QueueFull, EngineUnavailable) as exc:
                await context.abort(STATUS[type(exc)][0], _detail(str(exc)))
            # an answer that may be tool calls streams as text; its last message carries the calls
            calls = None if tools is None else AnswerCalls(self.prompts.tool_format.tool_calls_token, tools.forced,
                                                           tools.parallel)
            while True:
                out: RequestOutput = await queue.get()
                if out.error:
                    finished = True
                    code = grpc.StatusCode.UNAVAILABLE if out.retryable else grpc.StatusCode.INTERNAL
                    await context.abort(code, _detail(f"generation failed: {out.error}"))
                response = response_from_output(out)
                if calls is not None:
                    calls.add(out.token_ids, out.text)
                    whole = calls.calls() if out.finish_reason is not None else None
                    if whole:
                        response.tool_calls.extend(pb.ToolCall(id=c["id"], name=c["function"]["name"],
                                                               arguments=c["function"]["arguments"]) for c in whole)
                        response.finish_reason = pb.FINISH_REASON_TOOL_CALLS
                yield response
                if out.finish_reason is not None:
                    finished = True
                    return
        finally:
            self.drain.leave()
            if key is not None and not finished:  # the client went away or the server is stopping
                self.engine.cancel(key)  # by the server's key: only this call's own request

    async def GetModelInfo(self, request, context):
        return self.model_info()

    async def Tokenize(self, request, context):
        if request.text and request.messages:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "set text or messages, not both")

        def tokenize() -> list[int]:
            return self._chat_ids(request.messages) if request.messages else self.prompts.text(request.text, "text")

        try:
            ids = await asyncio.get_running_loop().run_in_executor(self.prepare, tokenize)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _detail(str(exc)))
        return pb.TokenizeResponse(token_ids=ids)

    async def GetServerStats(self, request, context):
        return pb.ServerStats(**self.engine.server_stats())


class CountReplies(grpc.aio.ServerInterceptor):
    """Calls `count(method, code)` once each call ends, with its final status code's name: OK,
    what an abort named, CANCELLED when the client went, UNKNOWN for an exception. First in the chain,
    so refusals of bad tokens and undecodable bytes count too; an unknown method counts as
    'unknown' (a client picks method names, and labels must stay few)."""

    def __init__(self, count: Callable[[str, str], None]):
        self.count = count

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            self.count("unknown", grpc.StatusCode.UNIMPLEMENTED.name)
            return None
        method, count = details.method, self.count

        def finish(context, error: BaseException | None) -> None:
            if isinstance(error, asyncio.CancelledError):
                count(method, grpc.StatusCode.CANCELLED.name)
            else:
                code = context.code() or (grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN)
                count(method, code.name)

        def counted(behavior):
            if inspect.isasyncgenfunction(behavior):
                async def each(request, context):
                    error = None
                    try:
                        async for response in behavior(request, context):
                            yield response
                    except BaseException as exc:
                        error = exc
                        raise
                    finally:
                        finish(context, error)
                return each

            async def once(request, context):
                error = None
                try:
                    return await behavior(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, error)
            return once

        kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler),
                 ("unary_stream", grpc.unary_stream_rpc_method_handler),
                 ("stream_unary", grpc.stream_unary_rpc_method_handler),
                 ("stream_stream", grpc.stream_stream_rpc_method_handler))
        kind, make = next((k, m) for k, m in kinds if getattr(handler, k))
        return make(counted(getattr(handler, kind)), handler.request_deserializer, handler.response_serializer)


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call except health checks; the token is
    compared in constant time."""

    def __init__(self, token: str):
        self.expected = token.encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(given, str) and bearer_matches(given, self.expected):
            return await continuation(details)
        return self._deny_stream if details.method.endswith("/Generate") else self._deny_unary


async def start_gateway(service: GenerationService, host: str, port: int, *, admin=None,
                        auth_token: str | None = None,
                        tls: tuple[bytes, bytes] | None = None, max_message_bytes: int = 4 << 20,
                        count: Callable[[str, str], None] | None = None):
    """Start the server; returns (server, bound port, health servicer). count(method, code): called
    as each call ends (the metrics' requests by door and code)."""
    interceptors = [CountReplies(count)] if count else []
    interceptors += [RefuseUndecodable()] + ([BearerTokenAuth(auth_token)] if auth_token else [])
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ])
    pb_grpc.add_GenerationServicer_to_server(service, server)
    if admin is not None:
        pb_grpc.add_AdminServicer_to_server(admin, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    if tls:
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls[1], tls[0])]))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    await set_health(health_servicer, False)
    return server, bound, health_servicer


async def set_health(servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE):
        await servicer.set(name, status)
