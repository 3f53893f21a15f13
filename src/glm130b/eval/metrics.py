"""Metrics and their standard errors (pure Python, no model).

* Answer normalisation, exact match and token F1 are SQuAD's (the same functions GLM-130B's
  `evaluation/metrics.py` uses), with the maximum taken over the reference answers.
* Standard errors follow lm-evaluation-harness: for a mean of per-item values,
  `sample_stddev / sqrt(n)` (so an accuracy p over n items has stderr sqrt(p(1-p)/(n-1))).
  Perplexities get the delta method: stderr(exp(x)) = exp(x) * stderr(x).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD: lower case, drop punctuation, drop articles (a, an, the), collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _tokens_for_f1(s: str) -> list[str]:
    # SQuAD splits on whitespace; text without spaces (Chinese) is compared character by character.
    norm = normalize_answer(s)
    words = norm.split()
    if len(words) <= 1 and any(_is_cjk(ch) for ch in norm):
        return [ch for ch in norm if not ch.isspace()]
    return words


def _is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" or "\U00020000" <= ch <= "\U0003134f"


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str) -> float:
    pred, ref = _tokens_for_f1(prediction), _tokens_for_f1(reference)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def max_over_references(metric, prediction: str, references: Sequence[str]) -> float:
    if not references:
        return 0.0
    return max(metric(prediction, r) for r in references)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample (n-1) standard deviation; nan below 2 items."""
    n = len(values)
    if n < 2:
        return float("nan")
    m = mean(values)
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def ratio_stderr(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """Standard error of sum(numerators) / sum(denominators) over independent units (documents),
    by the delta method for a ratio estimator; nan below 2 units."""
    n = len(numerators)
    if n < 2 or sum(denominators) <= 0:
        return float("nan")
    r = sum(numerators) / sum(denominators)
    dbar = sum(denominators) / n
    resid = [a - r * b for a, b in zip(numerators, denominators, strict=True)]
    var = sum(x * x for x in resid) / (n - 1)
    return math.sqrt(var / n) / dbar


def exp_capped(x: float, cap: float = 700.0) -> float:
    """exp(x) that returns inf instead of raising for huge x (an untrained model's perplexity)."""
    return math.exp(x) if x < cap else float("inf")


def perplexity_and_stderr(mean_nll: float, nll_stderr: float) -> tuple[float, float]:
    ppl = exp_capped(mean_nll)
    return ppl, ppl * nll_stderr if math.isfinite(nll_stderr) else float("nan")
