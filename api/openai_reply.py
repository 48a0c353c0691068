"""The OpenAI API's response objects for one request of api/http_api.py: one choice per prompt,
whole or as stream chunks, with logprobs in the API's exact shapes.

Logprob token strings are cut from the text itself (an incremental decode of prompt and answer), so
they join into the text, SentencePiece's leading spaces included; a token that ends inside a UTF-8
character gets "" and the character comes with the token that completes it. With echo the text
starts with the prompt's, and (when logprobs are asked for) the prompt's tokens lead the logprobs,
the first with null logprob and null top_logprobs, as in OpenAI's legacy completions.

A chat that may call tools (core/tool_format.py) is a call when its answer starts with the format's
[TOOL_CALLS] token (or the prompt ended with it: a forced call): its text, the calls' JSON, is held
until the answer is whole, then given as `tool_calls` with finish_reason "tool_calls" (streamed:
in the last chunk). Text that does not parse as calls is given as the content, as it came.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from expertmesh.api.request_builder import ToolRequest
from expertmesh.core.tokenizer import IncrementalDetokenizer, TextTokenizer
from expertmesh.core.tool_format import AnswerCalls
from expertmesh.router.sampling import TokenLogprobs
from expertmesh.router.serving import RequestOutput

FINISH = {"stop": "stop", "eos": "stop", "length": "length", "cancelled": "stop"}
# (token string, logprob or None, top alternatives [(string, logprob)] or None, text offset)
Entry = tuple[str, float | None, list[tuple[str, float]] | None, int]


@dataclass
class Choice:
    prompt_ids: list[int]
    pieces: IncrementalDetokenizer  # cuts each logprob entry's string from the text
    offset: int = 0  # characters of this choice's text given so far
    first: bool = True
    completion_tokens: int = 0
    cached_tokens: int = 0
    outs: list[RequestOutput] = field(default_factory=list)
    calls: AnswerCalls | None = None  # when the answer may be tool calls

    @property
    def finished(self) -> bool:
        return bool(self.outs) and self.outs[-1].finish_reason is not None


class Reply:
    def __init__(self, chat: bool, model: str, prompts: list[list[int]], tokenizer: TextTokenizer,
                 echo: bool = False, logprobs: bool = False, tools: ToolRequest | None = None,
                 tool_calls_token: int | None = None):
        """prompts: each choice's prompt ids; echo: the text starts with the prompt's; logprobs: the
        client asked for logprobs (the engine may have computed the prompt's for echo anyway); tools:
        what the answer may call, and the tool format's [TOOL_CALLS] token id."""
        self.chat, self.model, self.tokenizer, self.echo, self.want_logprobs = chat, model, tokenizer, echo, logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.prompt_tokens = sum(len(p) for p in prompts)
        # with echo the pieces start at the prompt's first token; else after the whole prompt
        self.choices = [Choice(list(p), IncrementalDetokenizer(tokenizer, None if echo else list(p)),
                               calls=AnswerCalls(tool_calls_token, tools.forced, tools.parallel) if tools else None)
                        for p in prompts]

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.choices)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _entry(self, c: Choice, token: int, lp: TokenLogprobs | None) -> Entry:
        context = c.pieces.ids[c.pieces.prefix_offset:]
        before = self.tokenizer.decode(context)
        top = None if lp is None else [(self.tokenizer.decode(context + [t])[len(before):], v) for t, v in lp.top]
        piece = c.pieces.add([token])
        offset, c.offset = c.offset, c.offset + len(piece)
        return piece, None if lp is None else lp.logprob, top, offset

    def _entries(self, c: Choice, out: RequestOutput) -> list[Entry]:
        entries = []
        if self.echo and out.prompt_logprobs is not None:
            entries += [self._entry(c, t, lp) for t, lp in zip(c.prompt_ids, out.prompt_logprobs)]
        return entries + [self._entry(c, lp.token_id, lp) for lp in out.logprobs]

    def _logprobs(self, entries: list[Entry]) -> dict | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return {"content": [{"token": s, "logprob": v, "bytes": list(s.encode()),
                                 "top_logprobs": [{"token": t, "logprob": tv, "bytes": list(t.encode())}
                                                  for t, tv in top or []]} for s, v, top, _ in entries],
                    "refusal": None}  # OpenAI's schema requires it on every choice and chunk
        return {"tokens": [s for s, *_ in entries], "token_logprobs": [v for _, v, _, _ in entries],
                "top_logprobs": [None if top is None else dict(top) for _, _, top, _ in entries],
                "text_offset": [offset for *_, offset in entries]}

    def _text(self, c: Choice, out: RequestOutput) -> str:
        """The output's text, after the prompt's when it is the first of an echoed choice."""
        if self.echo and c.first:
            return self.tokenizer.decode(c.prompt_ids) + out.text
        return out.text

    def _count(self, c: Choice, out: RequestOutput) -> None:
        c.outs.append(out)
        c.completion_tokens += len(out.token_ids)
        if out.usage is not None:
            c.cached_tokens = out.usage.cached_prompt_tokens

    def usage(self) -> dict:
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in self.choices)}}

    def chunk(self, index: int, out: RequestOutput) -> dict | None:
        """One stream chunk: choice `index`'s output `out`; None while a tool call's text is held."""
        c = self.choices[index]
        self._count(c, out)
        finish = FINISH.get(out.finish_reason) if out.finish_reason else None
        logprobs = self._logprobs(self._entries(c, out))
        text = self._text(c, out)
        if self.chat and c.calls is not None:
            c.calls.add(out.token_ids, text)
            if c.calls.calling and out.finish_reason is None:
                return None
            if c.calls.calling:  # whole: the calls, or (not parseable) the text held
                calls = c.calls.calls()
                delta = {"role": "assistant"} if c.first else {}
                c.first = False
                if calls is None:
                    delta["content"] = c.calls.text
                else:
                    delta |= {"content": None, "tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
                    finish = "tool_calls"
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                return {**self._head("chat.completion.chunk"), "choices": [choice]}
        if self.chat:
            delta = {"role": "assistant", "content": text} if c.first else {"content": text}
            c.first = False
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        c.first = False
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": self.usage()}

    def whole(self, outs: list[list[RequestOutput]]) -> dict:
        """The whole response: outs[i] is choice i's outputs, in order."""
        choices = []
        for index, (c, chunks) in enumerate(zip(self.choices, outs)):
            entries, text = [], ""
            for out in chunks:
                self._count(c, out)
                entries += self._entries(c, out)
                text += self._text(c, out)
                c.first = False
            finish = FINISH.get(chunks[-1].finish_reason)
            if self.chat:
                message = {"role": "assistant", "content": text, "refusal": None}
                calls = None
                if c.calls is not None:
                    for out in chunks:
                        c.calls.add(out.token_ids, out.text)
                    calls = c.calls.calls()
                if calls is not None:
                    message |= {"content": None, "tool_calls": calls}
                    finish = "tool_calls"
                choices.append({"index": index, "message": message, "logprobs": self._logprobs(entries),
                                "finish_reason": finish})
            else:
                choices.append({"index": index, "text": text, "logprobs": self._logprobs(entries),
                                "finish_reason": finish})
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": self.usage()}
