"""The OpenAI-compatible HTTP API, a second door to the same serving engine as the gRPC gateway.

POST /v1/completions and /v1/chat/completions (server-sent events with "stream": true), GET
/v1/models and /v1/models/{id}, POST /tokenize and /detokenize (vLLM's shapes), GET /health. A
Starlette app, served by uvicorn on the gateway's event loop. Fields are OpenAI's where the engine
supports them, plus the common extensions top_k, min_p, repetition_penalty, ignore_eos, cache_salt
and vLLM's guided_regex / guided_choice; response_format json_object and json_schema are enforced
while sampling (router/structured.py); tools, tool_choice and tool turns where the model's tokenizer
has a tool format (core/tool_format.py: Mistral's v3 and later; a forced call is enforced as the
calls' JSON schema); anything it cannot honour (n > 1, suffix, logit_bias, tools on Mixtral 8x7B's v1
tokenizer, ...) is refused with 400 naming the field, never ignored. Errors, of every
status, come in the API's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from expertmesh.api.front_door import SHUTTING_DOWN, STATUS, Drain, bearer_matches, chat_role
from expertmesh.api.openai_reply import Reply
from expertmesh.api.prompts import PromptBuilder
from expertmesh.api.request_builder import (
    CHAT,
    TEXT,
    TOKEN_IDS,
    TOOL_FIELDS,
    ClientRequest,
    Prompt,
    RequestBuilder,
    ToolRequest,
    tool_request,
    with_tools,
)
from expertmesh.core.tool_format import ToolFormat
from expertmesh.router.requests import MAX_REQUEST_ID_CHARS, InvalidRequest, ValidRequest
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.serving import EngineUnavailable, QueueFull, RequestOutput, ServingEngine
from expertmesh.router.structured import StructureSpec

MAX_PROMPTS = 256  # prompts in one completions request (evaluation harnesses batch them)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # the completions API's own default
CHAT_DEFAULT_MAX_TOKENS = 256  # the chat API has none: this engine's usual one
# Our names where they differ from the API's: error messages name the field the client sent.
API_NAMES = {"max_new_tokens": "max_tokens", "stop_token_ids": "stop", "prompt_logprobs": "logprobs"}
UNSUPPORTED = {"suffix": "suffix is not supported",
               "logit_bias": "logit_bias is not supported",
               "functions": "functions are not supported (the deprecated form of tools)",
               "function_call": "functions are not supported (the deprecated form of tool_choice)",
               "reasoning_effort": "reasoning_effort is not supported: the model does not reason in steps",
               "audio": "audio output is not supported", "prediction": "predicted outputs are not supported",
               "store": "store is not supported: nothing is kept after the response",
               "metadata": "metadata is not supported (it goes with store)",
               "web_search_options": "web search is not supported",
               "moderation": "moderation is not supported",
               "verbosity": "verbosity is not supported",
               "prompt_cache_key": "prompt_cache_key is not supported: the prefix cache is automatic (cache_salt keeps "
                                   "tenants apart)",
               "prompt_cache_options": "prompt cache options are not supported: the prefix cache is automatic",
               "prompt_cache_retention": "prompt cache retention is not supported: the prefix cache is automatic"}
# Known fields whose only honoured values are these (the defaults): anything else is refused by name.
DEFAULT_ONLY = {"modalities": ((["text"],), "only text output is supported"),
                "service_tier": (("auto", "default"), "one service tier: auto or default")}


def structure_from_body(body: dict) -> StructureSpec | None:
    """response_format (json_object, json_schema; text is no structure), or vLLM's guided_regex /
    guided_choice extensions: at most one."""
    given = [name for name in ("response_format", "guided_regex", "guided_choice") if body.get(name) is not None]
    if len(given) > 1:
        raise ApiError(400, f"set one of {', '.join(given)}", given[1])
    if not given:
        return None
    name, value = given[0], body[given[0]]
    if name == "guided_regex":
        if not isinstance(value, str) or not value:
            raise ApiError(400, "guided_regex must be a non-empty string", name)
        return StructureSpec("regex", value, name)
    if name == "guided_choice":
        return StructureSpec("choice", json.dumps(value), name)
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructureSpec("json", "", name)
    if kind == "json_schema":
        schema = value.get("json_schema")
        schema = schema.get("schema") if isinstance(schema, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object", name)
        return StructureSpec("json_schema", json.dumps(schema), name)
    raise ApiError(400, "response_format.type must be text, json_object or json_schema", name)


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
    for name, (honoured, why) in DEFAULT_ONLY.items():
        if body.get(name) is not None and body[name] not in honoured:
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
    prompt_logprobs = None
    if chat:
        if "echo" in body:
            raise ApiError(400, "echo is a completions field; chat has none", "echo")
        max_tokens = _number(body, "max_completion_tokens", None, integer=True)
        max_tokens = _number(body, "max_tokens", max_tokens if max_tokens is not None else CHAT_DEFAULT_MAX_TOKENS,
                             integer=True)
        logprobs = _number(body, "top_logprobs", 0, integer=True) if _flag(body, "logprobs") else None
    else:
        max_tokens = _number(body, "max_tokens", COMPLETION_DEFAULT_MAX_TOKENS, integer=True)
        logprobs = _number(body, "logprobs", None, integer=True)
        if _flag(body, "echo") and (logprobs is not None or max_tokens == 0):
            # echo with logprobs (what evaluation harnesses send): the prompt's logprobs too; with
            # max_tokens 0 and no logprobs, computed and not shown (the engine needs the request
            # to ask for something)
            prompt_logprobs = logprobs if logprobs is not None else 0
    seed = _number(body, "seed", None, integer=True)
    d = SamplingParams()  # the engine's defaults, the same for gRPC (only max_tokens is the API's own)
    return SamplingParams(
        temperature=_number(body, "temperature", d.temperature), top_p=_number(body, "top_p", d.top_p),
        top_k=_number(body, "top_k", d.top_k, integer=True), min_p=_number(body, "min_p", d.min_p),
        repetition_penalty=_number(body, "repetition_penalty", d.repetition_penalty),
        presence_penalty=_number(body, "presence_penalty", d.presence_penalty),
        frequency_penalty=_number(body, "frequency_penalty", d.frequency_penalty), seed=seed, max_new_tokens=max_tokens,
        stop=stop, ignore_eos=_flag(body, "ignore_eos"), logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def request_from_body(body: dict, chat: bool, tool_format: ToolFormat | None = None) -> ClientRequest:
    """A completions or chat body -> the doors' common ClientRequest (api/request_builder.py)."""
    params = sampling_from_body(body, chat)
    salt = body.get("cache_salt", "")
    if not isinstance(salt, str):
        raise ApiError(400, "cache_salt must be a string", "cache_salt")
    if not chat:
        for name in TOOL_FIELDS:
            if body.get(name) is not None:
                raise ApiError(400, f"{name} is a chat field: the completions API has no tools", name)
    try:
        tools = tool_request(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"),
                             tool_format) if chat else None
        prompts = (Prompt(CHAT, chat_messages(body, tool_format)),) if chat else tuple(map(_prompt, _prompt_list(body)))
        return ClientRequest(prompts, params, salt, with_tools(structure_from_body(body), tools), tools)
    except InvalidRequest as exc:
        raise _api_error(exc) from None


def _prompt_list(body: dict) -> list:
    """`prompt`: a string, token ids, or a list of either (one choice each, in order)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise ApiError(400, f"prompt has {len(prompt)} prompts; at most {MAX_PROMPTS}", "prompt")
        return prompt
    return [prompt]


def _prompt(prompt) -> Prompt:
    if isinstance(prompt, str):
        return Prompt(TEXT, prompt)
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return Prompt(TOKEN_IDS, prompt)
    raise ApiError(400, "prompt must be a string, a list of token ids, or a list of those", "prompt")


def chat_messages(body: dict, tool_format: ToolFormat | None = None) -> list[dict]:
    """`messages` -> [{role, content}] for the chat template: developer is system, an assistant turn
    may have null content, text content parts are joined; with a tool format, assistant turns keep
    their tool_calls and tool turns their tool_call_id (else both are refused)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    plain = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if (role == "tool" or (role == "assistant" and m.get("tool_calls"))) and tool_format is None:
            raise ApiError(400, f"messages[{i}]: tool calls and results are not supported (this model's "
                           "tokenizer and chat template have no tool format)", "messages")
        if isinstance(role, str):
            role = chat_role(role)
        if role == "assistant" and content is None:
            content = ""  # an assistant turn with no text (as clients send after a refusal)
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(role, str) or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must have a string role and content", "messages")
        message = {"role": role, "content": content}
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise ApiError(400, f"messages[{i}]: a tool message needs the tool_call_id it answers", "messages")
            message["tool_call_id"] = m["tool_call_id"]
        elif role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = _tool_calls(m["tool_calls"], i)
        plain.append(message)
    return plain


def _tool_calls(calls, i: int) -> list[dict]:
    """An assistant turn's tool_calls, checked: [{id, type: function, function: {name, arguments}}]."""
    if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("id", ""), str) and isinstance(c.get("function"), dict)
            and isinstance(c["function"].get("name"), str) and isinstance(c["function"].get("arguments"), str)
            for c in calls):
        raise ApiError(400, f"messages[{i}].tool_calls must be a list of {{\"id\", \"type\": \"function\", "
                       "\"function\": {\"name\", \"arguments\"}}", "messages")
    return [{"id": c.get("id", ""), "type": "function",
             "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}} for c in calls]


def _api_error(exc: InvalidRequest) -> ApiError:
    """400 naming the field by the API's name."""
    return ApiError(400, str(exc), API_NAMES.get(exc.field, exc.field))


class CountResponses:
    """ASGI middleware: count(path, status) as each HTTP response starts (a stream's status is its
    first line's). Paths outside `paths` count as 'unknown' (a client picks them)."""

    def __init__(self, app, count: Callable[[str, str], None], paths: set[str]):
        self.app, self.count, self.paths = app, count, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.paths else (
            "/v1/models/{model_id}" if scope["path"].startswith("/v1/models/") else "unknown")

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.count(path, str(message["status"]))
            await send(message)

        await self.app(scope, receive, counted_send)


class OpenAIApi:
    def __init__(self, engine: ServingEngine, prompts: PromptBuilder, model_names: list[str] | str,
                 healthy: Callable[[], bool], prepare: ThreadPoolExecutor, auth_token: str | None = None,
                 max_body_bytes: int = 4 << 20, count: Callable[[str, str], None] | None = None,
                 drain: Drain | None = None):
        """model_names: what requests may call the model (the first is the default); prepare: the
        pool tokenising runs on, shared with the gRPC gateway (one bound for both); count(path,
        status): called as each response starts (the metrics' requests by door and code); drain: the
        shutdown's accounting, shared with the gRPC door."""
        self.engine = engine
        self.prompts = prompts
        self.model_names = [model_names] if isinstance(model_names, str) else list(model_names)
        self.model_name = self.model_names[0]
        self.builder = RequestBuilder(prompts, engine.grammars, engine.limits)
        self.healthy = healthy
        self.expected = auth_token.encode() if auth_token else None
        self.max_body_bytes = max_body_bytes
        self._prepare = prepare
        self.count = count
        self.drain = drain or Drain()

    def app(self):
        app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ], exception_handlers={HTTPException: _http_error, Exception: _server_error})
        return app if self.count is None else CountResponses(app, self.count, {r.path for r in app.routes})

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
            raise _api_error(exc) from None

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
        if not bearer_matches(request.headers.get("authorization"), self.expected):
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
        except RecursionError:  # brackets nested past the parser's depth: the client's error, not ours
            raise ApiError(400, "the body is nested too deeply to parse") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _valid(self, body: dict, chat: bool) -> tuple[list[ValidRequest], ToolRequest | None]:
        """Prompts and sampling of one API request, checked (runs off the event loop): one request
        per prompt (chat: one), and the tools its answer may call."""
        self._check_model(body)
        try:
            client = request_from_body(body, chat, self.prompts.tool_format)
            return self.builder.build(client), client.tools
        except InvalidRequest as exc:
            raise _api_error(exc) from None

    def _chat_ids(self, body: dict) -> list[int]:
        return self.prompts.chat(chat_messages(body, self.prompts.tool_format))

    async def _serve(self, request: Request, chat: bool) -> Response:
        if not self.drain.enter():  # 503: clients retry it on another replica
            return ApiError(503, SHUTTING_DOWN, kind="service_unavailable").response()
        response = None
        try:
            response = await self._generate(request, chat)
            return response
        finally:
            if not isinstance(response, StreamingResponse):  # a stream leaves when its events end (_events)
                self.drain.leave()

    async def _generate(self, request: Request, chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        try:
            self._authorize(request)
            body = await self._body(request)
            stream = _flag(body, "stream")
            options = body.get("stream_options") or {}
            include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
            for name in ("user", "safety_identifier"):  # the client's end-user ids: checked, for its records
                given = body.get(name)
                if given is not None and (not isinstance(given, str) or len(given) > MAX_REQUEST_ID_CHARS):
                    raise ApiError(400, f"{name} must be a string of at most {MAX_REQUEST_ID_CHARS} characters", name)
            valid, tools = await loop.run_in_executor(self._prepare, self._valid, body, chat)
            queue: asyncio.Queue = asyncio.Queue()
            keys = self._submit(valid, loop, queue)
        except ApiError as exc:
            return exc.response()
        except QueueFull as exc:
            return ApiError(STATUS[QueueFull][1], str(exc), kind="rate_limit_error").response()
        except EngineUnavailable as exc:
            return ApiError(STATUS[EngineUnavailable][1], str(exc), kind="service_unavailable").response()
        tool_format = self.prompts.tool_format
        reply = Reply(chat, body.get("model") or self.model_name, [list(v.prompt_ids) for v in valid],
                      self.engine.tokenizer, echo=not chat and _flag(body, "echo"),
                      logprobs=valid[0].params.logprobs is not None, tools=tools,
                      tool_calls_token=tool_format.tool_calls_token if tool_format else None)
        if stream:
            return StreamingResponse(self._events(queue, keys, reply, include_usage), media_type="text/event-stream")
        return await self._collect(request, queue, keys, reply)

    def _submit(self, valid: list[ValidRequest], loop, queue: asyncio.Queue) -> list[str]:
        """Submit one engine request per prompt; their outputs reach `queue` as (choice, output).
        All or none: a refusal cancels those already in."""
        keys: list[str] = []
        try:
            for i, request in enumerate(valid):
                keys.append(self.engine.submit(
                    request, lambda out, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, out))))
        except (QueueFull, EngineUnavailable):
            self._cancel(keys)
            raise
        return keys

    def _cancel(self, keys: list[str]) -> None:
        for key in keys:
            self.engine.cancel(key)

    async def _events(self, queue: asyncio.Queue, keys: list[str], reply: Reply, include_usage: bool):
        """Server-sent events: a chunk per output, the usage (if asked), then [DONE]. A client that
        goes away cancels its requests (Starlette cancels this generator)."""
        finished = False
        try:
            while True:
                index, out = await queue.get()
                if out.error:
                    finished = True
                    self._cancel(keys)
                    yield _event({"error": {"message": f"generation failed: {out.error}", "type": "server_error",
                                            "param": None, "code": None}})
                    return
                if out.prompt_logprobs is not None:  # a whole prompt's entries: decoded off the event loop
                    chunk = await asyncio.get_running_loop().run_in_executor(self._prepare, reply.chunk, index, out)
                else:
                    chunk = reply.chunk(index, out)
                if chunk is not None:  # (None: a tool call's text, held until it is whole)
                    yield _event(chunk)
                if reply.finished:
                    finished = True
                    if include_usage:
                        yield _event(reply.usage_chunk())
                    yield "data: [DONE]\n\n"
                    return
        finally:
            self.drain.leave()
            if not finished:
                self._cancel(keys)

    async def _collect(self, request: Request, queue: asyncio.Queue, keys: list[str], reply: Reply) -> Response:
        """The whole answer in one response; a client that disconnects meanwhile cancels it."""
        outs: list[list[RequestOutput]] = [[] for _ in keys]
        done = 0
        try:
            while done < len(keys):
                try:
                    index, out = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self._cancel(keys)
                        return Response(status_code=499)
                    continue
                outs[index].append(out)
                if out.error:
                    self._cancel(keys)
                    kind = "service_unavailable" if out.retryable else "server_error"
                    return ApiError(503 if out.retryable else 500, f"generation failed: {out.error}",
                                    kind=kind).response()
                done += out.finish_reason is not None
        except asyncio.CancelledError:
            self._cancel(keys)
            raise
        # echoed prompts' logprob entries decode every token: off the event loop, like tokenising
        return JSONResponse(await asyncio.get_running_loop().run_in_executor(self._prepare, reply.whole, outs))


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
