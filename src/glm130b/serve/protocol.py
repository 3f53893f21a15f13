"""Request and response bodies of the HTTP API: OpenAI's completions, plus GLM blank infilling.

Field names, defaults and error bodies follow OpenAI's completions API, so its clients work
unchanged. Fields this server does not implement are ignored when they hold their neutral value
and refused (400) otherwise, never silently dropped. Decisions: docs/serving.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 16
MAX_STOP = 4


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: OpenAIError


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value):
        if value == "":
            raise ValueError("stop must not be an empty string")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    """POST /v1/completions. A prompt with no blank gets a [gMASK] appended (GLM-130B's
    convention) and the model continues it."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=64)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # null: up to the end of the context
    min_tokens: Annotated[int, Field(ge=0)] = 0  # vLLM's extension: <eop>/<eos> are blocked before
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    suffix: str | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class InfillRequest(_Sampling):
    """POST /v1/infill: fill the blanks of `text` left to right, by GLM-130B's generate.py rules
    (one kind of blank: [MASK] > [sMASK] > [gMASK]; each re-encoded with the earlier answers), or
    with `reuse_cache` every blank of every kind in one KV cache."""

    text: Annotated[str, Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 32  # per blank; null: up to the end of the context
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0  # greedy unless asked: blanks want the likeliest
    reuse_cache: bool = False


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

    model_config = ConfigDict(extra="ignore")

    input: (Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                            Field(min_length=1, max_length=256)]
            | Annotated[list[int], Field(min_length=1)] | Annotated[list[list[int]], Field(min_length=1)])
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
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
