"""The OpenAI-compatible HTTP API, a second door to the same serving engine as the gRPC gateway.

POST /v1/completions and /v1/chat/completions (server-sent events with "stream": true), GET
/v1/models and /v1/models/{id}, POST /tokenize and /detokenize (vLLM's shapes), GET /health. A
Starlette app, served by uvicorn on the gateway's event loop. Fields are OpenAI's where the engine
supports them, plus the common extensions top_k, min_p, repetition_penalty, ignore_eos and
cache_salt; anything it cannot honour (n > 1, echo, suffix, logit_bias, tools, response_format
other than text, ...) is refused with 400 naming the field, never ignored. Errors, of every
status, come in the API's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from expertmesh.router.prompts import PromptBuilder
from expertmesh.router.requests import MAX_REQUEST_ID_CHARS, InvalidRequest, ValidRequest, validate_request
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import EngineUnavailable, QueueFull, RequestOutput, ServingEngine

FINISH = {"stop": "stop", "eos": "stop", "length": "length", "cancelled": "stop"}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # the completions API's own default
CHAT_DEFAULT_MAX_TOKENS = 256  # the chat API has none: this engine's usual one
# Our names where they differ from the API's: error messages name the field the client sent.
API_NAMES = {"max_new_tokens": "max_tokens", "stop_token_ids": "stop", "token": "prompt"}
UNSUPPORTED = {"echo": "echo is not supported", "suffix": "suffix is not supported",
               "logit_bias": "logit_bias is not supported", "tools": "tools are not supported",
               "functions": "functions are not supported", "tool_choice": "tools are not supported",
               "function_call": "functions are not supported",
               "reasoning_effort": "reasoning_effort is not supported: the model does not reason in steps",
               "audio": "audio output is not supported", "prediction": "predicted outputs are not supported",
               "store": "store is not supported: nothing is kept after the response",
               "metadata": "metadata is not supported (it goes with store)",
               "web_search_options": "web search is not supported",
               "parallel_tool_calls": "tools are not supported"}
# Known fields whose only honoured value is the default: anything else is refused by name.
DEFAULT_ONLY = {"modalities": (["text"], "only text output is supported"),
                "response_format": ({"type": "text"}, "structured output (json_object, json_schema) is not "
                                    "supported yet: only {\"type\": \"text\"}")}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message[:1000], param, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": None}}, status_code=self.status, headers=self.headers)


ERROR_KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (unknown path 404, wrong method 405, ...) in the API's shape."""
    error = ApiError(exc.status_code, str(exc.detail), kind=ERROR_KINDS.get(exc.status_code, "invalid_request_error"),
                     headers=getattr(exc, "headers", None))
    return error.response()


async def _server_error(request: Request, exc: Exception) -> Response:
    return ApiError(500, f"internal error ({type(exc).__name__})", kind="server_error").response()


def _number(body: dict, name: str, default, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(value)[:80]}",
                       name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false", name)
    return value


def sampling_from_body(body: dict, chat: bool) -> SamplingParams:
    """The API's sampling fields -> SamplingParams (types here; ranges in validate_request)."""
    for name, why in UNSUPPORTED.items():
        if body.get(name) not in (None, False, {}, [], ""):
            raise ApiError(400, why, name)
    for name, (default, why) in DEFAULT_ONLY.items():
        if body.get(name) not in (None, default):
            raise ApiError(400, why, name)
    for name in ("n", "best_of"):
        if _number(body, name, 1, integer=True) != 1:
            raise ApiError(400, f"{name} must be 1: one completion per request", name)
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise ApiError(400, "stop must be a string or a list of strings", "stop")
    if chat:
        max_tokens = _number(body, "max_completion_tokens", None, integer=True)
        max_tokens = _number(body, "max_tokens", max_tokens if max_tokens is not None else CHAT_DEFAULT_MAX_TOKENS,
                             integer=True)
        logprobs = _number(body, "top_logprobs", 0, integer=True) if _flag(body, "logprobs") else None
    else:
        max_tokens = _number(body, "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS, integer=True)
        logprobs = _number(body, "logprobs", None, integer=True)
    seed = _number(body, "seed", None, integer=True)
    return SamplingParams(
        temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
        top_k=_number(body, "top_k", 0, integer=True), min_p=_number(body, "min_p", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0), seed=seed, max_new_tokens=max_tokens,
        stop=stop, ignore_eos=_flag(body, "ignore_eos"), logprobs=logprobs)


def _param_of(message: str) -> str | None:
    """The field an InvalidRequest names (its first word), by the API's name."""
    first = message.split(" ", 1)[0].split("[", 1)[0]
    return API_NAMES.get(first, first) if first.isidentifier() else None


class OpenAIApi:
    def __init__(self, engine: ServingEngine, prompts: PromptBuilder, model_names: list[str] | str,
                 healthy: Callable[[], bool], prepare: ThreadPoolExecutor, auth_token: str | None = None,
                 max_body_bytes: int = 4 << 20):
        """model_names: what requests may call the model (the first is the default); prepare: the
        pool tokenising runs on, shared with the gRPC gateway (one bound for both)."""
        self.engine = engine
        self.prompts = prompts
        self.model_names = [model_names] if isinstance(model_names, str) else list(model_names)
        self.model_name = self.model_names[0]
        self.healthy = healthy
        self.expected = auth_token.encode() if auth_token else None
        self.max_body_bytes = max_body_bytes
        self._prepare = prepare

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ], exception_handlers={HTTPException: _http_error, Exception: _server_error})

    # ---- endpoints ----------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        ok = self.healthy()
        return JSONResponse({"status": "serving" if ok else "not serving"}, status_code=200 if ok else 503)

    def _card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "expertmesh",
                "max_model_len": self.engine.limits.max_context}

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as exc:
            return exc.response()
        return JSONResponse({"object": "list", "data": [self._card(name) for name in self.model_names]})

    async def model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            name = request.path_params["model_id"]
            if name not in self.model_names:
                raise self._not_served(name)
        except ApiError as exc:
            return exc.response()
        return JSONResponse(self._card(name))

    def _not_served(self, name) -> ApiError:
        return ApiError(404, f"model {json.dumps(name)[:80]} is not served here; this server serves "
                        f"{', '.join(map(repr, self.model_names))}", "model", kind="not_found_error")

    async def tokenize(self, request: Request) -> Response:
        """vLLM's shape: {"prompt": text} or {"messages": [...]} -> {"count", "max_model_len", "tokens"}."""
        loop = asyncio.get_running_loop()
        try:
            self._authorize(request)
            body = await self._body(request)
            self._check_model(body)
            if ("prompt" in body) == ("messages" in body):
                raise ApiError(400, "set prompt or messages, not both", "prompt")
            if "prompt" in body and not isinstance(body["prompt"], str):
                raise ApiError(400, "prompt must be a string", "prompt")
            ids = await loop.run_in_executor(self._prepare, self._tokenize, body)
        except ApiError as exc:
            return exc.response()
        return JSONResponse({"count": len(ids), "max_model_len": self.engine.limits.max_context, "tokens": ids})

    def _tokenize(self, body: dict) -> list[int]:
        try:
            return self._chat_ids(body) if "messages" in body else self.prompts.text(body["prompt"])
        except InvalidRequest as exc:
            raise ApiError(400, str(exc), _param_of(str(exc))) from None

    async def detokenize(self, request: Request) -> Response:
        """vLLM's shape: {"tokens": [ids]} -> {"prompt": text}."""
        try:
            self._authorize(request)
            body = await self._body(request)
            self._check_model(body)
            tokens = body.get("tokens")
            vocab = self.engine.limits.vocab_size
            if not isinstance(tokens, list) or not all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens):
                raise ApiError(400, f"tokens must be a list of token ids in [0, {vocab})", "tokens")
            if len(tokens) > self.engine.limits.max_context:
                raise ApiError(400, f"tokens has {len(tokens)} ids; at most {self.engine.limits.max_context}",
                               "tokens")
        except ApiError as exc:
            return exc.response()
        return JSONResponse({"prompt": self.engine.tokenizer.decode(tokens)})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, chat=True)

    # ---- the common path ----------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 9110); the token compared in constant time
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.expected)):
            raise ApiError(401, "missing or wrong bearer token", kind="authentication_error",
                           headers={"WWW-Authenticate": 'Bearer realm="expertmesh"'})

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model not in self.model_names:
            raise self._not_served(model)

    async def _body(self, request: Request) -> dict:
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body_bytes:
                raise ApiError(413, f"the request body is larger than {self.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"the body is not valid JSON ({str(exc)[:100]})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _valid(self, body: dict, chat: bool) -> ValidRequest:
        """Prompt and sampling of one API request, checked (runs off the event loop)."""
        self._check_model(body)
        params = sampling_from_body(body, chat)
        salt = body.get("cache_salt", "")
        if not isinstance(salt, str):
            raise ApiError(400, "cache_salt must be a string", "cache_salt")
        try:
            ids = self._chat_ids(body) if chat else self._prompt_ids(body)
            return validate_request(ids, params, self.engine.limits, salt)
        except InvalidRequest as exc:
            raise ApiError(400, str(exc), _param_of(str(exc))) from None

    def _prompt_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return self.prompts.text(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")

    def _chat_ids(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", "messages")
        plain = []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            content = m.get("content") if isinstance(m, dict) else None
            if role == "tool" or (role == "assistant" and m.get("tool_calls")):
                raise ApiError(400, f"messages[{i}]: tool calls and results are not supported (this model's "
                               "tokenizer and chat template have no tool format)", "messages")
            if role == "developer":  # OpenAI's newer name for the system message
                role = "system"
            if role == "assistant" and content is None:
                content = ""  # an assistant turn with no text (as clients send after a refusal)
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
                content = "".join(p["text"] for p in content)
            if not isinstance(role, str) or not isinstance(content, str):
                raise ApiError(400, f"messages[{i}] must have a string role and content", "messages")
            plain.append({"role": role, "content": content})
        return self.prompts.chat(plain)

    async def _serve(self, request: Request, chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        try:
            self._authorize(request)
            body = await self._body(request)
            stream = _flag(body, "stream")
            options = body.get("stream_options") or {}
            include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
            user = body.get("user")
            if user is not None and (not isinstance(user, str) or len(user) > MAX_REQUEST_ID_CHARS):
                raise ApiError(400, f"user must be a string of at most {MAX_REQUEST_ID_CHARS} characters", "user")
            valid = await loop.run_in_executor(self._prepare, self._valid, body, chat)
            queue: asyncio.Queue = asyncio.Queue()
            key = self.engine.submit(valid, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        except ApiError as exc:
            return exc.response()
        except QueueFull as exc:
            return ApiError(429, str(exc), kind="rate_limit_error").response()
        except EngineUnavailable as exc:
            return ApiError(503, str(exc), kind="service_unavailable").response()
        reply = _Reply(chat, body.get("model") or self.model_name, len(valid.prompt_ids), self.engine.tokenizer)
        if stream:
            return StreamingResponse(self._events(queue, key, reply, include_usage), media_type="text/event-stream")
        return await self._collect(request, queue, key, reply)

    async def _events(self, queue: asyncio.Queue, key: str, reply: "_Reply", include_usage: bool):
        """Server-sent events: a chunk per output, the usage (if asked), then [DONE]. A client that
        goes away cancels the request (Starlette cancels this generator)."""
        finished = False
        try:
            while True:
                out: RequestOutput = await queue.get()
                if out.error:
                    finished = True
                    yield _event({"error": {"message": f"generation failed: {out.error}", "type": "server_error",
                                            "param": None, "code": None}})
                    return
                yield _event(reply.chunk(out))
                if out.finish_reason is not None:
                    finished = True
                    if include_usage:
                        yield _event(reply.usage_chunk())
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not finished:
                self.engine.cancel(key)

    async def _collect(self, request: Request, queue: asyncio.Queue, key: str, reply: "_Reply") -> Response:
        """The whole answer in one response; a client that disconnects meanwhile cancels it."""
        outs: list[RequestOutput] = []
        try:
            while not outs or outs[-1].finish_reason is None:
                try:
                    outs.append(await asyncio.wait_for(queue.get(), timeout=0.5))
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.engine.cancel(key)
                        return Response(status_code=499)
        except asyncio.CancelledError:
            self.engine.cancel(key)
            raise
        if outs[-1].error:
            kind = "service_unavailable" if outs[-1].retryable else "server_error"
            return ApiError(503 if outs[-1].retryable else 500, f"generation failed: {outs[-1].error}",
                            kind=kind).response()
        return JSONResponse(reply.whole(outs))


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Reply:
    """The API's response objects for one request."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int, tokenizer):
        self.chat, self.model, self.prompt_tokens, self.tokenizer = chat, model, prompt_tokens, tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens found in the prefix cache (the last output says)
        self.first = True

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, outs: list[RequestOutput]):
        lps = [lp for out in outs for lp in out.logprobs]
        if not lps:
            return None
        piece = lambda t: self.tokenizer.decode([t])  # noqa: E731
        if self.chat:
            return {"content": [{"token": piece(lp.token_id), "logprob": lp.logprob,
                                 "bytes": list(piece(lp.token_id).encode()),
                                 "top_logprobs": [{"token": piece(t), "logprob": v, "bytes": list(piece(t).encode())}
                                                  for t, v in lp.top]} for lp in lps]}
        return {"tokens": [piece(lp.token_id) for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{piece(t): v for t, v in lp.top} for lp in lps], "text_offset": []}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def _count(self, out: RequestOutput) -> None:
        self.completion_tokens += len(out.token_ids)
        if out.usage is not None:
            self.cached_tokens = out.usage.cached_prompt_tokens

    def chunk(self, out: RequestOutput) -> dict:
        self._count(out)
        finish = FINISH.get(out.finish_reason) if out.finish_reason else None
        if self.chat:
            delta = {"role": "assistant", "content": out.text} if self.first else {"content": out.text}
            self.first = False
            choice = {"index": 0, "delta": delta, "logprobs": self._logprobs([out]), "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": out.text, "logprobs": self._logprobs([out]), "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self.usage()}

    def whole(self, outs: list[RequestOutput]) -> dict:
        for out in outs:
            self._count(out)
        text = "".join(out.text for out in outs)
        finish = FINISH.get(outs[-1].finish_reason)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": self._logprobs(outs), "finish_reason": finish}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage()}
        choice = {"index": 0, "text": text, "logprobs": self._logprobs(outs), "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage()}
