"""Text similarity metrics for `text_similarity` graders, all in [0, 1].

Libraries: rapidfuzz (fuzzy_match), NLTK (bleu, gleu, meteor; Porter stemmer only),
rouge-score (rouge_1..5, rouge_l, F-measure). Nothing downloads data at run time:
METEOR runs without WordNet synonyms (exact and stem matches only), and `cosine`
(embeddings) is not offered.
"""
from __future__ import annotations

import functools
import re

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


@functools.lru_cache(maxsize=None)
def _rouge(metric: str):
    from rouge_score import rouge_scorer

    key = "rougeL" if metric == "rouge_l" else f"rouge{metric[-1]}"
    return key, rouge_scorer.RougeScorer([key], use_stemmer=True)


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
        key, scorer = _rouge(metric)
        return float(scorer.score(reference, output)[key].fmeasure)
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
