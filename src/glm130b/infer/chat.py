"""Chat: messages -> one prompt, rendered by a chat template, as Hugging Face transformers does it.

A template is Jinja2 (sandboxed, `trim_blocks` and `lstrip_blocks`, as transformers renders
`chat_template`) over `messages` (role: system / user / assistant, content) and
`add_generation_prompt`. It is stored with the model in `tokenizer_config.json` under
`chat_template` (the Hugging Face convention); without one, a folder with ChatGLM-6B's
tokenizer gets CHATGLM6B and any other model PLAIN. `--chat-template FILE` overrides.

The rendered prompt is encoded with every special-token string left as text
(`encode(..., blanks=False)`), then [gMASK] is appended and the model continues it: text a user
types never becomes a blank, a block start or a role marker.

Long chats (`fit_history`): while the prompt and the answer's token budget exceed the context,
the oldest user/assistant exchange is dropped (a system message and the last user turn stay);
when even that does not fit, the caller answers `context_length_exceeded`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from glm130b.errors import GLMError

# ChatGLM-6B v1.1's own prompt (modeling_chatglm.py `chat`/`build_prompt`): one message is the
# query as it is; with history, 1-based rounds separated by blank lines.
CHATGLM6B = (
    "{% set turns = messages | selectattr('role', 'ne', 'system') | list %}"
    "{% set system = messages | selectattr('role', 'eq', 'system') | map(attribute='content') | join('\n') %}"
    "{% if turns | length == 1 %}{% if system %}{{ system }}\n{% endif %}{{ turns[0].content }}"
    "{% else %}{% for m in turns %}"
    "{% if m.role == 'user' %}[Round {{ loop.index0 // 2 + 1 }}]\n\n问：{% if loop.first and system %}{{ system }}\n"
    "{% endif %}{{ m.content }}\n\n答：{% else %}{{ m.content }}\n\n{% endif %}"
    "{% endfor %}{% endif %}"
)
# chatglm.cpp's (and ChatGLM-6B v1.0's) variant: 0-based rounds, single newlines.
CHATGLM6B_CPP = (
    "{% set turns = messages | selectattr('role', 'ne', 'system') | list %}"
    "{% set system = messages | selectattr('role', 'eq', 'system') | map(attribute='content') | join('\n') %}"
    "{% if turns | length == 1 %}{% if system %}{{ system }}\n{% endif %}{{ turns[0].content }}"
    "{% else %}{% for m in turns %}"
    "{% if m.role == 'user' %}[Round {{ loop.index0 // 2 }}]\n问：{% if loop.first and system %}{{ system }}\n"
    "{% endif %}{{ m.content }}\n答：{% else %}{{ m.content }}\n{% endif %}"
    "{% endfor %}{% endif %}"
)
# Base GLM models and the shipped model: a plain transcript the model continues after "Answer:".
PLAIN = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}Question: {{ m.content }}\n"
    "{% else %}Answer: {{ m.content }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}"
)
TEMPLATES = {"chatglm-6b": CHATGLM6B, "chatglm-6b-cpp": CHATGLM6B_CPP, "plain": PLAIN}
ROLES = ("system", "user", "assistant")
CONFIG_FILE = "tokenizer_config.json"


class ChatError(GLMError, ValueError):
    """Bad messages or a template that does not render."""


def template_of(directory: str | Path | None, tokenizer=None, override: str | None = None) -> str:
    """The chat template for a model: `override` (a file, or a name in TEMPLATES), the folder's
    tokenizer_config.json `chat_template`, else CHATGLM6B for a ChatGLM-6B tokenizer, else PLAIN.
    It is rendered once on a sample conversation here, so a broken template stops the command
    that loads it (a server at start-up) instead of failing every request as the client's fault."""
    if override:
        if override in TEMPLATES:
            return TEMPLATES[override]
        try:
            template = Path(override).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ChatError(f"cannot read chat template {override}: {e}") from None
        return check_template(template, override)
    if directory is not None:
        try:
            saved = json.loads((Path(directory) / CONFIG_FILE).read_text()).get("chat_template")
        except (OSError, json.JSONDecodeError, AttributeError):
            saved = None
        if isinstance(saved, str) and saved:
            return check_template(saved, str(Path(directory) / CONFIG_FILE))
    if getattr(tokenizer, "convention", None) == "chatglm-6b":
        return CHATGLM6B
    return PLAIN


SAMPLE = ({"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"})
# (no system message: some templates refuse one with raise_exception, which is the client's concern)


def check_template(template: str, where: str) -> str:
    """`template`, once it renders SAMPLE to a string; else a ChatError naming `where`."""
    try:
        text = render(template, SAMPLE)
    except ChatError as e:
        raise ChatError(f"{where}: {e}") from None
    if not text.strip():
        raise ChatError(f"{where}: the chat template renders a conversation as empty text")
    return template


def render(template: str, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages` (each {"role", "content"}), rendered as transformers does."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    check_messages(messages)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):  # what Hugging Face templates call to refuse a conversation
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise ChatError(f"the chat template does not render: {e}") from None
    except Exception as e:  # noqa: BLE001 - the template's own code failed (1/0, a bad filter argument, ...)
        raise ChatError(f"the chat template does not render: {type(e).__name__}: {e}") from None


def check_messages(messages: Sequence[dict]) -> None:
    if not messages:
        raise ChatError("messages must hold at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatError(f"messages[{i}] must be {{'role': system|user|assistant, 'content': str}}")
    if messages[-1]["role"] != "user":
        raise ChatError("the last message must be the user's")


def encode_chat(tokenizer, template: str, messages: Sequence[dict]) -> list[int]:
    """Prompt ids: the rendered text, every special string in it left as text, then [gMASK]."""
    return tokenizer.encode(render(template, messages), blanks=False) + [tokenizer.gmask_id]


def fit_history(tokenizer, template: str, messages: Sequence[dict], fits: Callable[[int], bool]) -> list[int]:
    """encode_chat of the longest suffix of the conversation for which `fits(prompt tokens)`:
    the oldest exchanges go first; system messages and the last user message always stay."""
    messages = list(messages)
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    while True:
        ids = encode_chat(tokenizer, template, system + turns)
        if fits(len(ids)) or len(turns) <= 1:
            return ids
        turns = turns[2:] if len(turns) > 2 else turns[-1:]  # one user/assistant exchange
