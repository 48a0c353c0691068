"""Prompts from what clients send: text, or chat messages rendered with the model's template, into
token ids, within the limits of router/requests.py. Shared by the gRPC and HTTP gateways; both call
it off their event loops (tokenising a long prompt takes a while)."""

from __future__ import annotations

import json

from expertmesh.core.chat import ChatError, render_chat
from expertmesh.core.tokenizer import TextTokenizer
from expertmesh.core.tool_format import ToolFormat, ToolFormatError
from expertmesh.router.requests import MAX_CHAT_MESSAGES, InvalidRequest, RequestLimits


class PromptBuilder:
    def __init__(self, tokenizer: TextTokenizer, chat_template: str, limits: RequestLimits,
                 tool_format: ToolFormat | None = None):
        """tool_format: the checkpoint's (core/tool_format.py), which then encodes every chat; None:
        the chat template renders them, and there are no tools."""
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.limits = limits
        self.tool_format = tool_format

    def text(self, text: str, field: str = "prompt") -> list[int]:
        """BOS + the text's ids."""
        limit = self.limits.max_prompt_chars
        if len(text) > limit:
            raise InvalidRequest(f"{field} has {len(text)} characters; at most {limit} can fit the context", field)
        return self.tokenizer.encode(text)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, force_call: bool = False,
             field: str = "messages") -> list[int]:
        """[{role, content}] (and, with a tool format, tool calls and results) rendered for the answer;
        tools: definitions the model may call; force_call: the answer starts with a call (the
        format's [TOOL_CALLS] token ends the prompt)."""
        if len(messages) > MAX_CHAT_MESSAGES:
            raise InvalidRequest(f"{field} has {len(messages)} messages; at most {MAX_CHAT_MESSAGES}", field)
        chars = sum(len(m.get("content") or "") + len(json.dumps(m.get("tool_calls") or [])) for m in messages)
        chars += len(json.dumps(tools or []))
        if chars > self.limits.max_prompt_chars:
            raise InvalidRequest(f"{field} have {chars} characters; at most {self.limits.max_prompt_chars} can "
                                 "fit the context", field)
        if self.tool_format is not None:
            try:
                ids = self.tool_format.encode(messages, tools)
            except ToolFormatError as exc:
                raise InvalidRequest(str(exc), field) from None
            return ids + [self.tool_format.tool_calls_token] if force_call else ids
        assert not tools and not force_call, "no tool format: the doors refuse tools"
        try:
            text = render_chat(self.chat_template, messages)
        except ChatError as exc:
            raise InvalidRequest(str(exc), field) from None
        return self.tokenizer.encode_rendered(text)
