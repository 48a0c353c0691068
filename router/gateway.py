"""The gRPC gateway: expertmesh.v1.Generation over grpc.aio, plus health and reflection.

Each Generate call becomes one request of the serving engine; its chunks come back through an
asyncio queue and stream out as they are produced. A client that goes away (cancel, deadline) has
its request cancelled at once, which frees its KV blocks at the next step boundary.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from expertmesh.core.chat import ChatError, render_chat
from expertmesh.core.tokenizer import TextTokenizer
from expertmesh.router.requests import InvalidRequest, ValidRequest, validate_request
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import EngineUnavailable, QueueFull, RequestOutput, ServingEngine
from expertmesh.v1 import generation_pb2 as pb
from expertmesh.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger("expertmesh.gateway")

SERVICE = "expertmesh.v1.Generation"
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS,
          "cancelled": pb.FINISH_REASON_CANCELLED}


def sampling_from_proto(s: pb.SamplingParams) -> SamplingParams:
    """Proto fields -> SamplingParams; unset optional fields take the defaults."""
    defaults = SamplingParams()
    pick = lambda name: getattr(s, name) if s.HasField(name) else getattr(defaults, name)  # noqa: E731
    return SamplingParams(
        temperature=pick("temperature"), top_p=pick("top_p"), top_k=s.top_k, min_p=s.min_p,
        repetition_penalty=pick("repetition_penalty"), presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty, seed=s.seed if s.HasField("seed") else None,
        max_new_tokens=pick("max_new_tokens"), stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos, logprobs=s.logprobs if s.HasField("logprobs") else None)


def response_from_output(out: RequestOutput) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=out.request_id, token_ids=out.token_ids, text=out.text)
    for lp in out.logprobs:
        msg.logprobs.append(pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]))
    if out.finish_reason is not None:
        msg.finish_reason = FINISH.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=out.usage.prompt_tokens,
                                    completion_tokens=out.usage.completion_tokens,
                                    cached_prompt_tokens=out.usage.cached_prompt_tokens))
    return msg


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, engine: ServingEngine, tokenizer: TextTokenizer, chat_template: str,
                 model_info: pb.ModelInfo):
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.model_info = model_info

    def _valid(self, request: pb.GenerateRequest) -> ValidRequest:
        """The one check of a Generate call: prompt and sampling against the model and the pool."""
        return validate_request(self._prompt_ids(request), sampling_from_proto(request.sampling), self.engine.limits)

    def _prompt_ids(self, request) -> list[int]:
        given = [name for name in ("prompt", "token_ids", "messages") if len(getattr(request, name))]
        if len(given) != 1:
            raise InvalidRequest("exactly one of prompt, token_ids, messages must be set"
                                 + (f" (got {', '.join(given)})" if given else " (got none)"))
        if request.prompt:
            return self.tokenizer.encode(request.prompt)
        if request.token_ids:
            return list(request.token_ids)
        return self._chat_ids(request.messages)

    def _chat_ids(self, messages) -> list[int]:
        try:
            text = render_chat(self.chat_template, [{"role": m.role, "content": m.content} for m in messages])
        except ChatError as exc:
            raise InvalidRequest(str(exc)) from None
        return self.tokenizer.encode_rendered(text)

    async def Generate(self, request, context):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            key = self.engine.submit(self._valid(request), lambda out: loop.call_soon_threadsafe(
                queue.put_nowait, out), client_id=request.request_id)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        finished = False
        try:
            while True:
                out: RequestOutput = await queue.get()
                if out.error:
                    finished = True
                    await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {out.error}")
                yield response_from_output(out)
                if out.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:  # the client went away or the server is stopping: free the sequence
                self.engine.cancel(key)

    async def GetModelInfo(self, request, context):
        return self.model_info

    async def Tokenize(self, request, context):
        if request.text and request.messages:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "set text or messages, not both")
        try:
            ids = self._chat_ids(request.messages) if request.messages else self.tokenizer.encode(request.text)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.TokenizeResponse(token_ids=ids)

    async def GetServerStats(self, request, context):
        e = self.engine
        cache = e.engine.cache
        return pb.ServerStats(running=len(e.scheduler.running), waiting=len(e.scheduler.waiting),
                              kv_blocks_total=cache.num_blocks, kv_blocks_free=cache.free_blocks,
                              kv_block_size=cache.block_size, preemptions=e.scheduler.preemptions,
                              steps=e.steps, healthy=e.healthy)


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call except health checks."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        if metadata.get("authorization") == self.expected:
            return await continuation(details)
        return self._deny_stream if details.method.endswith("/Generate") else self._deny_unary


async def start_gateway(service: GenerationService, host: str, port: int, *, auth_token: str | None = None,
                        tls: tuple[bytes, bytes] | None = None, max_message_bytes: int = 4 << 20):
    """Start the server; returns (server, bound port, health servicer)."""
    interceptors = [BearerTokenAuth(auth_token)] if auth_token else []
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ])
    pb_grpc.add_GenerationServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
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
