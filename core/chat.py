"""Chat messages to a prompt: the checkpoint's chat template, or Mixtral Instruct's own.

Templates are Jinja, rendered the way transformers' apply_chat_template renders them; the text is
then tokenised with special tokens (<s>, </s>) recognised, so the ids match transformers'.
"""

from __future__ import annotations

import json
from pathlib import Path

ROLES = ("system", "user", "assistant")

# The chat template of Mixtral-8x7B-Instruct-v0.1: [INST] user [/INST]answer</s>, user first,
# roles alternating.
MIXTRAL_INSTRUCT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)


class ChatError(ValueError):
    """Messages the template cannot render; the message says why."""


def load_chat_template(model_dir: str | Path) -> str:
    """tokenizer_config.json's chat_template when the checkpoint has one, else Mixtral Instruct's."""
    path = Path(model_dir) / "tokenizer_config.json"
    if path.exists():
        template = json.loads(path.read_text()).get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template:
            return template
    return MIXTRAL_INSTRUCT_TEMPLATE


def render_chat(template: str, messages: list[dict], bos_token: str = "<s>", eos_token: str = "</s>") -> str:
    """Render messages [{role, content}] to prompt text, ready for the model's answer."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not messages:
        raise ChatError("messages is empty")
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise ChatError(f"messages[{i}].role {m['role'][:40]!r} is not one of {', '.join(ROLES)}")
    if messages[0]["role"] == "system" and template == MIXTRAL_INSTRUCT_TEMPLATE:
        # Mixtral Instruct has no system role; like Mistral's later templates, fold it into the
        # first user message.
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ChatError("a system message must be followed by a user message")
        messages = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]},
                    *messages[2:]]

    def raise_exception(message: str):
        raise ChatError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=True)
    except jinja2.TemplateError as exc:
        raise ChatError(f"chat template failed: {exc}") from None
