"""Request and response bodies of the HTTP API: OpenAI's completions, plus GLM blank infilling.

Field names, defaults and error bodies follow OpenAI's completions API, so its clients work
unchanged. Fields this server does not implement are ignored when they hold their neutral value
and refused (400) otherwise, never silently dropped. Decisions: docs/serving.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16
MAX_STOP = 4
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # torch.Generator.manual_seed's range (negatives wrap)


MAX_PROMPTS = 64


def _unicode(value: str) -> str:
    """Lone surrogates ("\\ud800") are valid JSON but not text: no tokenizer can take them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode: a lone surrogate (\\u{ord(value[e.start]):04x}) at character "
                         f"{e.start}") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


def _each_unicode(values: list) -> None:
    """Checked before the union is tried, so the error names the item (not a union member)."""
    for i, value in enumerate(values):
        if isinstance(value, str):
            try:
                _unicode(value)
            except ValueError as e:
                raise ValueError(f"item {i} is {e}") from None


def _check_min_tokens(min_tokens: int, max_tokens: int | None) -> None:
    if max_tokens is not None and min_tokens > max_tokens:
        raise ValueError(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})")


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: OpenAIError


# strict: a JSON true is not the number 1, "yes" is not true, 2.0 is not the integer 2 (as OpenAI's
# own API refuses them); an integer is still taken where a number is asked
STRICT = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = STRICT

    model: Text | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: Text | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None  # what torch.Generator takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, value):
        if value == "":
            raise ValueError("must not be an empty string")
        if value is None or isinstance(value, str):
            return value
        if (not isinstance(value, list) or len(value) > MAX_STOP
                or not all(isinstance(s, str) and s for s in value)):
            raise ValueError(f"must be a string or a list of at most {MAX_STOP} non-empty strings")
        _each_unicode(value)
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    """POST /v1/completions. A prompt with no blank gets a [gMASK] appended (GLM-130B's
    convention) and the model continues it."""

    # OpenAI's four forms: a string, strings, token ids, lists of token ids
    prompt: (Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # null: up to the end of the context
    min_tokens: Annotated[int, Field(ge=0)] = 0  # vLLM's extension: <eop>/<eos> are blocked before
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    suffix: str | None = None

    @model_validator(mode="after")
    def _min_within_max(self):
        _check_min_tokens(self.min_tokens, self.max_tokens)
        return self

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value):
        if isinstance(value, str):
            return _unicode(value)
        if isinstance(value, list) and value and (all(isinstance(p, str) for p in value) or _is_ids(value)
                                                  or all(_is_ids(p) for p in value)):
            if not _is_ids(value) and len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
            _each_unicode(value)
            if any(t < 0 for p in ([value] if _is_ids(value) else value) if _is_ids(p) for t in p):
                raise ValueError("token ids must be >= 0")
            return value
        raise ValueError("must be a string, a non-empty list of strings, a non-empty list of token ids "
                         "(integers), or a list of such lists")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        if isinstance(self.prompt, str) or _is_ids(self.prompt):
            return [self.prompt]
        return list(self.prompt)


class InfillRequest(_Sampling):
    """POST /v1/infill: fill the blanks of `text` left to right, by GLM-130B's generate.py rules
    (one kind of blank: [MASK] > [sMASK] > [gMASK]; each re-encoded with the earlier answers), or
    with `reuse_cache` every blank of every kind in one KV cache."""

    text: Text
    max_tokens: Annotated[int, Field(ge=1)] | None = 32  # per blank; null: up to the end of the context
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0  # greedy unless asked: blanks want the likeliest
    reuse_cache: bool = False
    n: int = 1  # (completions' fields, not served here: refused unless neutral)
    min_tokens: int = 0


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class InfillSpan(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None


class Infill(BaseModel):
    id: str
    object: Literal["infill"] = "infill"
    created: int
    model: str
    text: str
    spans: list[InfillSpan]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glm130b"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    running: int
    waiting: int


# -- chat and embeddings ---------------------------------------------------------------------
class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    """POST /v1/chat/completions: the messages rendered by the model's chat template
    (glm130b.infer.chat), then continued like a completion."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # null: up to the end of the context
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name
    min_tokens: Annotated[int, Field(ge=0)] = 0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    logprobs: bool | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    tools: list | None = None
    response_format: dict | None = None  # only {"type": "text"} (plain text) is served

    @model_validator(mode="after")
    def _one_budget(self):
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) and max_completion_tokens ({self.max_completion_tokens}) "
                             "differ: give one of them")
        _check_min_tokens(self.min_tokens, self.answer_budget())
        return self

    def answer_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings: `input` a string or a list of strings (or token ids)."""

    model_config = STRICT

    input: (Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                            Field(min_length=1, max_length=256)]
            | Annotated[list[int], Field(min_length=1)] | Annotated[list[list[int]], Field(min_length=1)])
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value):  # (the union's own message would name only its first member)
        if value == "" or value == []:
            raise ValueError("must be a non-empty string, or a non-empty list of non-empty strings or token ids")
        if isinstance(value, list) and any(v == "" for v in value):
            raise ValueError(f"item {value.index('')} is an empty string")
        return value
    dimensions: int | None = None
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
