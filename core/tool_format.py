"""Tool calling for models whose tokenizer has a tool format: Mistral's tokenizers v3 and later.

Such a checkpoint carries Mistral's tokenizer file beside its weights (`tokenizer.model.v3`, as
Mistral's own repositories do; `tiny-checkpoint --tokenizer v3` writes one). Its chats are encoded by
mistral-common, Mistral's reference: tool definitions in [AVAILABLE_TOOLS], the assistant's calls
after [TOOL_CALLS] as a JSON list of {"name", "arguments", "id"}, results in [TOOL_RESULTS]. Mixtral
8x7B's v1 tokenizer has none of these tokens: there `load` is None and the API refuses tools.

Messages and tools come in OpenAI's shapes (api/http_api.py checks their types); the ids of tool calls
must be 9 letters or digits in Mistral's format, so others are mapped to such ids, the same one for
an assistant's call and the tool result that answers it.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.model.v3", "tokenizer.model.v7")  # Mistral's SentencePiece with tool tokens
_ID = re.compile(r"[a-zA-Z0-9]{9}")
_ALPHABET = string.ascii_letters + string.digits


class ToolFormatError(ValueError):
    """Messages or tools the format cannot encode; the message says why."""


def mistral_id(call_id: str) -> str:
    """A client's tool call id as Mistral's 9 letters or digits (kept when it already is)."""
    if _ID.fullmatch(call_id):
        return call_id
    digest = hashlib.sha256(call_id.encode()).digest()
    return "".join(_ALPHABET[b % len(_ALPHABET)] for b in digest[:9])


def new_call_id() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(9))


class ToolFormat:
    def __init__(self, tokenizer_file: Path):
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self.tokenizer = MistralTokenizer.from_file(str(tokenizer_file))
        inner = self.tokenizer.instruct_tokenizer.tokenizer
        self.tool_calls_token = inner.get_special_token("[TOOL_CALLS]")

    @classmethod
    def load(cls, model_dir: str | Path) -> "ToolFormat | None":
        """The checkpoint's tool format, or None when its tokenizer has none."""
        for name in TOKENIZER_FILES:
            path = Path(model_dir) / name
            if path.exists():
                return cls(path)
        return None

    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """OpenAI-shaped messages (system, user, assistant with optional tool_calls, tool with
        tool_call_id) and tool definitions -> prompt ids, ready for the answer."""
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from pydantic import ValidationError

        try:
            request = ChatCompletionRequest(messages=[_message(m) for m in messages],
                                            tools=[_tool(t) for t in tools] if tools else None)
            return self.tokenizer.encode_chat_completion(request).tokens
        except (MistralCommonException, ValidationError, ValueError) as exc:
            raise ToolFormatError(f"the messages do not fit the model's chat format: {str(exc)[:300]}") from None

    @staticmethod
    def calls_schema(tools: list[dict], name: str | None = None) -> dict:
        """The JSON schema of what follows [TOOL_CALLS]: a non-empty list of calls of these tools
        (of `name` only, when given), each {"name", "arguments"} with the tool's parameters."""
        chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
        calls = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                   "arguments": f.get("parameters") or {"type": "object"}},
                  "required": ["name", "arguments"], "additionalProperties": False} for f in chosen]
        return {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}

    @staticmethod
    def parse(text: str) -> list[dict] | None:
        """The text after [TOOL_CALLS] -> OpenAI tool_calls, or None when it is not a list of calls."""
        try:
            calls = json.loads(text)
        except ValueError:
            return None
        if isinstance(calls, dict):
            calls = [calls]
        if not isinstance(calls, list) or not calls or not all(
                isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
            return None
        return [{"id": "call_" + new_call_id(), "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}))}} for c in calls]


class AnswerCalls:
    """Follows one answer that may be tool calls: forced (the prompt ended with [TOOL_CALLS]) or
    starting with that token. Its text is the calls' JSON."""

    def __init__(self, tool_calls_token: int, forced: bool, parallel: bool = True):
        self.tool_calls_token, self.parallel = tool_calls_token, parallel
        self.calling: bool | None = True if forced else None  # None: not known before the first token
        self.text = ""

    def add(self, token_ids: list[int], text: str) -> None:
        if self.calling is None and token_ids:
            self.calling = token_ids[0] == self.tool_calls_token
        if self.calling:
            self.text += text

    def calls(self) -> list[dict] | None:
        """The whole answer's calls (OpenAI's shape; one without parallel), or None when it is not
        calls or does not parse as them."""
        calls = ToolFormat.parse(self.text) if self.calling else None
        return calls if calls is None or self.parallel else calls[:1]


def _message(m: dict):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, ToolCall

    role, content = m["role"], m.get("content")
    if role not in ("system", "user", "assistant", "tool"):
        raise ToolFormatError(f"role {role[:40]!r} is not one of system, user, assistant, tool")
    if role == "system":
        return SystemMessage(content=content)
    if role == "user":
        return UserMessage(content=content)
    if role == "tool":
        return ToolMessage(content=content, tool_call_id=mistral_id(m.get("tool_call_id") or ""), name=m.get("name"))
    calls = [ToolCall(id=mistral_id(c.get("id") or new_call_id()),
                      function=FunctionCall(name=c["function"]["name"], arguments=c["function"]["arguments"]))
             for c in m.get("tool_calls") or []]
    return AssistantMessage(content=content or None, tool_calls=calls or None)


def _tool(t: dict):
    from mistral_common.protocol.instruct.tool_calls import Function, Tool

    f = t["function"]
    return Tool(function=Function(name=f["name"], description=f.get("description") or "",
                                  parameters=f.get("parameters") or {}))
