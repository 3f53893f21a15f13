"""Fine-tuning data: JSONL records turned into GLM instruction samples.

Each record becomes Part A = prompt + [gMASK] and Part B = `<sop>` + response, with the loss on
the response and its `<eop>` only (data/objective.py `instruction_sample`), the same layout
`glm130b generate` feeds a prompt. Accepted records, one JSON object per line:

* {"prompt": ..., "response": ...}
* {"instruction": ..., "input": ..., "output": ...} (Alpaca; the prompt is the instruction, then
  the input on a new line when there is one)
* {"prompt": ..., "response": ..., "history": [[question, answer], ...]} or
  {"messages": [{"role", "content"}, ..., {"role": "assistant", ...}]}: a conversation, rendered
  by the model's chat template (infer/chat.py) as `glm130b chat` and /v1/chat/completions render
  it; the last assistant message is the response.

A bad record stops the run before training with one line naming the file and line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from glm130b.errors import GLMError
from glm130b.io import read_jsonl


class FinetuneDataError(GLMError, ValueError):
    """A fine-tuning record that cannot be used (named by file and line)."""


def _text(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key, None if required else "")
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise FinetuneDataError(f"{where}: field {key!r} must be a string, got {got}")
    return value


def _messages_of(record: dict, where: str) -> tuple[list[dict], str]:
    """(the conversation up to the last user message, the response) of a chat record."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise FinetuneDataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        last = messages[-1]
        if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
            raise FinetuneDataError(f"{where}: the last message must be the assistant's answer (the response)")
        return messages[:-1], last["content"]
    history = record["history"]
    if not isinstance(history, list) or not all(
            isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history):
        raise FinetuneDataError(f"{where}: 'history' must be a list of [question, answer] string pairs")
    messages = []
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": _text(record, "prompt", where)})
    return messages, _text(record, "response", where)


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """("file:line", record) with the record normalised to {"prompt": str, "response": str} or
    {"messages": [...], "response": str} (a conversation)."""
    for where, record in read_jsonl(path, FinetuneDataError):
        if "messages" in record or "history" in record:
            messages, response = _messages_of(record, where)
            out = {"messages": messages, "response": response}
        elif "instruction" in record or "output" in record:
            instruction, extra = _text(record, "instruction", where), _text(record, "input", where, required=False)
            out = {"prompt": instruction + ("\n" + extra if extra else ""),
                   "response": _text(record, "output", where)}
        elif "prompt" in record or "response" in record:
            out = {"prompt": _text(record, "prompt", where), "response": _text(record, "response", where)}
        else:
            raise FinetuneDataError(f"{where}: expected {{'prompt', 'response'}}, {{'instruction', 'input', "
                                    "'output'}, or a conversation ('messages' or 'history')")
        if not out["response"].strip():
            raise FinetuneDataError(f"{where}: the response is empty")
        yield where, out


def encode_records(path: str | Path, tokenizer, seq_len: int, chat_template: str | None = None):
    """(pairs of (prompt_ids, response_ids), how many prompts will lose their start to fit seq_len).

    A response that cannot fit `seq_len` (with [gMASK] and <sop>) is an error naming its line;
    a long prompt keeps its end, as instruction_sample cuts it."""
    from glm130b.infer.chat import ChatError, render

    pairs, cut = [], 0
    for where, record in read_records(path):
        if "messages" in record:
            try:
                prompt = tokenizer.encode(render(chat_template, record["messages"]), blanks=False)
            except ChatError as e:
                raise FinetuneDataError(f"{where}: {e}") from None
        else:
            prompt = tokenizer.encode(record["prompt"])
        response = tokenizer.encode(record["response"], blanks=False)
        if len(response) > seq_len - 2:
            raise FinetuneDataError(f"{where}: the response has {len(response)} tokens; with [gMASK] and <sop> it "
                                    f"cannot fit seq_len {seq_len} (raise --seq-len or shorten it)")
        cut += len(prompt) + 2 + len(response) > seq_len
        pairs.append((prompt, response))
    if not pairs:
        raise FinetuneDataError(f"{path}: no records")
    return pairs, cut


class FinetuneData:
    """Samples of `pairs`, epoch after epoch, each epoch in a fresh order drawn from `seed`.

    `state_dict()` is how many samples were drawn: resuming there gives the same stream exactly
    (the order of epoch e depends only on seed and e)."""

    def __init__(self, pairs: list, builder, seed: int):
        self.pairs, self.builder, self.seed = pairs, builder, seed
        self.drawn = 0

    def samples(self) -> Iterator:
        n = len(self.pairs)
        while True:
            epoch, start = divmod(self.drawn, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for i in order[start:]:
                self.drawn += 1
                yield self.builder.instruction_sample(*self.pairs[i])

    def state_dict(self) -> dict:
        return {"seed": self.seed, "samples": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed or not isinstance(state.get("samples"), int):
            raise ValueError(f"the checkpoint's data position {state!r} is not this run's (seed {self.seed})")
        self.drawn = state["samples"]
