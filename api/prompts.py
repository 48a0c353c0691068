"""Prompts from what clients send: text, or chat messages rendered with the model's template, into
token ids, within the limits of router/requests.py. Shared by the gRPC and HTTP gateways; both call
it off their event loops (tokenising a long prompt takes a while)."""

from __future__ import annotations

from expertmesh.core.chat import ChatError, render_chat
from expertmesh.core.tokenizer import TextTokenizer
from expertmesh.router.requests import MAX_CHAT_MESSAGES, InvalidRequest, RequestLimits


class PromptBuilder:
    def __init__(self, tokenizer: TextTokenizer, chat_template: str, limits: RequestLimits):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.limits = limits

    def text(self, text: str, field: str = "prompt") -> list[int]:
        """BOS + the text's ids."""
        limit = self.limits.max_prompt_chars
        if len(text) > limit:
            raise InvalidRequest(f"{field} has {len(text)} characters; at most {limit} can fit the context", field)
        return self.tokenizer.encode(text)

    def chat(self, messages: list[dict], field: str = "messages") -> list[int]:
        """[{role, content}] rendered with the chat template, ready for the answer."""
        if len(messages) > MAX_CHAT_MESSAGES:
            raise InvalidRequest(f"{field} has {len(messages)} messages; at most {MAX_CHAT_MESSAGES}", field)
        chars = sum(len(m["content"]) for m in messages)
        if chars > self.limits.max_prompt_chars:
            raise InvalidRequest(f"{field} have {chars} characters; at most {self.limits.max_prompt_chars} can "
                                 "fit the context", field)
        try:
            text = render_chat(self.chat_template, messages)
        except ChatError as exc:
            raise InvalidRequest(str(exc), field) from None
        return self.tokenizer.encode_rendered(text)
