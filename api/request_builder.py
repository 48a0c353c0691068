"""One request builder for both doors. Each door reads its wire format (protobuf in api/gateway.py,
JSON in api/http_api.py) into a ClientRequest; here that becomes the engine's checked requests, one
per prompt: prompts tokenised or chat-rendered, the structure compiled, everything validated
against the model and the pool. Any problem raises InvalidRequest(field=...), which each door
reports by its own name for the field. Runs on the doors' preparation threads, never the event loop.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from expertmesh.api.prompts import PromptBuilder
from expertmesh.core.tool_format import ToolFormat
from expertmesh.router.requests import InvalidRequest, RequestLimits, ValidRequest, validate_request
from expertmesh.router.sampling import SamplingParams
from expertmesh.router.structured import Grammars, StructureSpec

TEXT, TOKEN_IDS, CHAT = "text", "token_ids", "chat"
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
NO_TOOL_FORMAT = ("tools need a tool format, and this model's tokenizer has none (Mixtral 8x7B's v1 tokenizer has no "
                  "tool tokens; a checkpoint with Mistral's tokenizer.model.v3 or later has)")
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_TOOLS = 128


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


def tool_request(tools, choice, parallel, tool_format: ToolFormat | None) -> ToolRequest | None:
    """Tools in OpenAI's shape ([{"type": "function", "function": {"name", "description",
    "parameters"}}]), tool_choice ("auto", "none", "required", or {"type": "function", "function":
    {"name"}}) and parallel_tool_calls, from either door, checked -> what the answer may call (None:
    no tools given, or tool_choice "none"). Refused by name on a model without a tool format."""
    if tool_format is None:
        for name, value in zip(TOOL_FIELDS, (tools, choice, parallel)):
            if value is not None:
                raise InvalidRequest(NO_TOOL_FORMAT, name)
        return None
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise InvalidRequest("parallel_tool_calls must be true or false", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice names a tool, but tools is empty", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"tools must be a list of at most {MAX_TOOLS} tools", "tools")
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise InvalidRequest(f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}} with a name '
                                 "of 1-64 letters, digits, _ or -", "tools")
        if not isinstance(function.get("description") or "", str) or not isinstance(
                function.get("parameters") or {}, dict):
            raise InvalidRequest(f"tools[{i}].function: description must be a string, parameters a JSON schema "
                                 "object", "tools")
        if name in names:
            raise InvalidRequest(f"tools[{i}]: a second tool named {name}", "tools")
        names.append(name)
    if choice is None or choice == "auto":
        chosen = "auto"
    elif choice == "none":
        return None
    elif choice == "required":
        chosen = "required"
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and choice["function"].get("name") in names:
        chosen = choice["function"]["name"]
    else:
        raise InvalidRequest('tool_choice must be none, auto, required, or {"type": "function", "function": '
                             '{"name": ...}} naming one of tools', "tool_choice")
    return ToolRequest(tuple(tools), chosen, parallel)


def with_tools(structure: StructureSpec | None, tools: ToolRequest | None) -> StructureSpec | None:
    """The structure the answer follows: a forced call's is the calls' JSON schema (the tools'
    parameters; one call without parallel_tool_calls), which no other structure may join."""
    if tools is None or not tools.forced:
        return structure
    if structure is not None:
        raise InvalidRequest("a forced tool call and a structured output cannot both shape the answer", "tool_choice")
    schema = ToolFormat.calls_schema(list(tools.tools), None if tools.choice == "required" else tools.choice)
    if not tools.parallel:
        schema["maxItems"] = 1
    return StructureSpec("json_schema", json.dumps(schema), "tool_choice")


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
