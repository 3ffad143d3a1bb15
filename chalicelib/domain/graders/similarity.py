"""Text similarity metrics for `text_similarity` graders, all in [0, 1].

Libraries: rapidfuzz (fuzzy_match), NLTK (bleu, gleu, meteor; Porter stemmer only), and ROUGE
(rouge_1..5, rouge_l, F-measure) in pure Python below: Google's rouge-score with
use_stemmer=True, re-implemented without numpy, which it needs only to import (64 MB of the
deployment package). tests/unit/test_similarity.py proves the scores identical to rouge-score's on
random texts (rouge-score stays a development dependency, as the oracle). Every library is
imported where it is used, not when the app is imported. Nothing downloads data at run time:
METEOR runs without WordNet synonyms (exact and stem matches only), and `cosine` (embeddings)
is not offered.
"""
from __future__ import annotations

import functools
import re
from collections import Counter

METRICS = ("fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5",
           "rouge_l")
_WORD = re.compile(r"\w+|[^\w\s]")


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class _NoWordNet:
    """Stands in for NLTK's WordNet corpus (which would need a download): no synonyms."""

    @staticmethod
    def synsets(*_args, **_kwargs):
        return []


# ---- ROUGE (rouge-score 0.1.2's DefaultTokenizer, _score_ngrams and _score_lcs) -----------------
_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")


@functools.lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import porter

    return porter.PorterStemmer()


@functools.lru_cache(maxsize=65536)
def _stem(token: str) -> str:
    return _stemmer().stem(token)


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokenizer: lower case, runs of anything but [a-z0-9] split, words of more
    than 3 characters Porter-stemmed, empty or invalid tokens dropped."""
    tokens = _SPACES.split(_NON_ALPHANUM.sub(" ", text.lower()))
    tokens = [_stem(t) if len(t) > 3 else t for t in tokens]
    return [t for t in tokens if _VALID_TOKEN.match(t)]


def _fmeasure(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_n(target: list[str], prediction: list[str], n: int) -> float:
    """F-measure of clipped n-gram overlap."""
    def grams(tokens: list[str]) -> Counter:
        return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))

    t, p = grams(target), grams(prediction)
    overlap = sum(min(count, p[gram]) for gram, count in t.items())
    return _fmeasure(overlap / max(sum(p.values()), 1), overlap / max(sum(t.values()), 1))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyro 2004): one pass over `a`
    with Python integers as bit vectors over `b`; the same number as the quadratic table."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, token in enumerate(b):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full
    for token in a:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(b) - bin(v).count("1")


def rouge_l(target: list[str], prediction: list[str]) -> float:
    if not target or not prediction:
        return 0.0
    lcs = lcs_length(target, prediction)
    return _fmeasure(lcs / len(prediction), lcs / len(target))


def rouge(metric: str, output: str, reference: str) -> float:
    target, prediction = rouge_tokens(reference), rouge_tokens(output)
    if metric == "rouge_l":
        return float(rouge_l(target, prediction))
    return float(rouge_n(target, prediction, int(metric[-1])))


@functools.lru_cache(maxsize=1)
def _smoothing():
    from nltk.translate.bleu_score import SmoothingFunction

    return SmoothingFunction().method1


def score(metric: str, output: str, reference: str) -> float:
    if not output.strip() or not reference.strip():
        return 1.0 if output.strip() == reference.strip() else 0.0
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return fuzz.ratio(output, reference) / 100.0
    if metric.startswith("rouge_"):
        return rouge(metric, output, reference)
    hyp, ref = _tokens(output), _tokens(reference)
    if not hyp or not ref:
        return 1.0 if hyp == ref else 0.0
    if metric == "bleu":
        from nltk.translate.bleu_score import sentence_bleu

        return float(sentence_bleu([ref], hyp, smoothing_function=_smoothing()))
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([ref], hyp))
    if metric == "meteor":
        from nltk.translate.meteor_score import meteor_score

        return float(meteor_score([ref], hyp, wordnet=_NoWordNet()))
    raise ValueError(f"unknown metric {metric}")
