"""One request builder for both doors. Each door reads its wire format (protobuf in api/gateway.py,
JSON in api/http_api.py) into a ClientRequest; here that becomes the engine's checked requests, one
per prompt: prompts tokenised or chat-rendered, the structure compiled, everything validated
against the model and the pool. Any problem raises InvalidRequest(field=...), which each door
reports by its own name for the field. Runs on the doors' preparation threads, never the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from expertmesh.api.prompts import PromptBuilder
from expertmesh.router.requests import RequestLimits, ValidRequest, validate_request
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.structured import Grammars, StructureSpec

TEXT, TOKEN_IDS, CHAT = "text", "token_ids", "chat"


@dataclass(frozen=True)
class Prompt:
    kind: str  # TEXT (value: str, BOS added), TOKEN_IDS (value: ids as given), CHAT (value: [{role, content}])
    value: object


@dataclass(frozen=True)
class ToolRequest:
    """Tools a chat's answer may call (a model with a tool format only: core/tool_format.py)."""
    tools: tuple[dict, ...]  # OpenAI's tool definitions, checked
    choice: str  # "auto" (the model decides), "required" (some call), or the one tool's name to call
    parallel: bool = True  # several calls in one answer

    @property
    def forced(self) -> bool:
        return self.choice != "auto"


@dataclass(frozen=True)
class ClientRequest:
    """What a client asked for, whichever door it came through (one choice per prompt)."""
    prompts: tuple[Prompt, ...]
    params: SamplingParams
    cache_salt: str = ""
    structure: StructureSpec | None = None  # a forced tool call's is the calls' schema
    tools: ToolRequest | None = None


class RequestBuilder:
    def __init__(self, prompts: PromptBuilder, grammars: Grammars, limits: RequestLimits):
        self.prompts, self.grammars, self.limits = prompts, grammars, limits

    def _ids(self, prompt: Prompt, tools: ToolRequest | None) -> list[int]:
        if prompt.kind == TEXT:
            return self.prompts.text(prompt.value)
        if prompt.kind == CHAT:
            return self.prompts.chat(prompt.value, list(tools.tools) if tools else None,
                                     force_call=tools is not None and tools.forced)
        return list(prompt.value)

    def build(self, request: ClientRequest) -> list[ValidRequest]:
        grammar = None if request.structure is None else self.grammars.compile(request.structure)
        return [validate_request(self._ids(p, request.tools), request.params, self.limits, request.cache_salt,
                                 grammar) for p in request.prompts]
