"""lm-evaluation-harness adapter: a GLM model folder as an lm_eval `LM` named "glm130b".

Optional: needs `lm-eval` (`pip install 'lm-eval==0.4.13'`; its core does not depend on
torch, so it leaves our pinned torch alone). Importing this module registers the model, then

    python -m glm130b.eval.lm_eval_adapter --model glm130b --model_args pretrained=runs/tiny \\
        --tasks lambada_openai --limit 100          # the lm_eval command line, with our model

    import lm_eval, glm130b.eval.lm_eval_adapter
    lm_eval.simple_evaluate(model="glm130b", model_args="pretrained=runs/tiny", tasks=[...])

The three request types map onto this package's scoring (so the numbers equal
`glm130b eval`'s for the same prompts; tests/test_eval_lm_eval.py checks it):
* `loglikelihood(context, continuation)`: context + mask token (`mask=`, default [gMASK]),
  continuation after `<sop>`; (summed log-prob, greedy) — scoring.choice_row.
* `loglikelihood_rolling(text)`: the `lm` task's sliding window (stride = half the context).
* `generate_until(context, {until, max_gen_toks})`: greedy, via the inference engine's
  generate_block; stops at `<eop>`/`<eos>`, max_gen_toks or the first `until` string.
"""

from __future__ import annotations

import warnings

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from glm130b.eval.formats import Item
from glm130b.eval.scoring import choice_row, score_rows
from glm130b.eval.tasks import MASK_TOKENS, encode_context, greedy_generate, lm_row, lm_windows, mask_token_id


@register_model("glm130b")
class GLM130BLM(LM):
    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, mask: str = "[gMASK]",
                 precision: str = "fp32", batch_tokens: int = 8192, max_length: int | None = None,
                 stride: int | None = None, max_gen_toks: int = 256, device: str | None = None, **_ignored):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("glm130b needs model_args pretrained=MODEL_FOLDER (or model= and tokenizer=)")
            from glm130b.eval.runner import load_at_precision

            model, tokenizer, _ = load_at_precision(pretrained, precision)
        if tokenizer is None:
            raise ValueError("pass the tokenizer with the model")
        if mask not in MASK_TOKENS:
            raise ValueError(f"mask must be one of {', '.join(MASK_TOKENS)}")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm_eval's command line asks for cuda by default; stay on the CPU
        if device:
            model = model.to(device)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.mask = mask
        self.mask_id = mask_token_id(tokenizer, mask)
        self.batch_tokens = int(batch_tokens)
        self.max_length = min(int(max_length or model.config.max_seq_len), model.config.max_seq_len)
        self.stride = int(stride or max(1, self.max_length // 2))
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------------------------------
    def _continuation_row(self, context: str, continuation: str, tag: int):
        tok = self.tokenizer
        cont = tok.encode(continuation) if continuation else []
        cont = cont or [tok.eop_id]
        cont = cont[-(self.max_length - 1):]  # a continuation longer than the context window keeps its end
        ids, mpos = encode_context(tok, Item(context=context), self.mask_id, self.max_length - len(cont))
        return choice_row(ids, mpos, self.mask == "[gMASK]", [cont], tok.sop_id, tag=tag)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = [self._continuation_row(*req.args, tag=i) for i, req in enumerate(requests)]
        scores = score_rows(self.model, rows, self.tokenizer.pad_id, self.batch_tokens)
        out = []
        for req, s in zip(requests, scores, strict=True):
            result = (s.logprob[0], bool(s.greedy[0]))
            self.cache_hook.add_partial("loglikelihood", req.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        tok = self.tokenizer
        rows = []
        for i, req in enumerate(requests):
            (text,) = req.args
            for prompt, scored in lm_windows(tok.encode(text), self.max_length, min(self.stride, self.max_length - 1)):
                rows.append(lm_row(prompt, scored, tok.gmask_id, tok.sop_id, tag=i))
        totals = [0.0] * len(requests)
        for row, s in zip(rows, score_rows(self.model, rows, tok.pad_id, self.batch_tokens), strict=True):
            totals[row.tag] += s.logprob[0]
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        tok = self.tokenizer
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if kwargs.get("do_sample") or (kwargs.get("temperature") or 0) > 0:
                warnings.warn("glm130b adapter decodes greedily; do_sample/temperature ignored", stacklevel=2)
            max_new = max(1, min(max_new, self.max_length - 2))
            ids, mpos = encode_context(tok, Item(context=context), self.mask_id, self.max_length - max_new - 1)
            tokens = greedy_generate(self.model, tok, ids, mpos, ids[mpos] == tok.gmask_id, max_new,
                                     should_stop=(lambda text, until=until: any(u in text for u in until)) if until else None)
            text = tok.decode(tokens)
            for u in until:
                if u in text:
                    text = text[: text.index(u)]
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


def main() -> None:
    """The lm_eval command line with the glm130b model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
