"""The pure-Python ROUGE in chalicelib/domain/graders/similarity.py scores exactly as Google's
rouge-score (use_stemmer=True, F-measure), the reference implementation it replaced in the
deployment package; rouge-score stays a development dependency for this oracle."""
import functools

from hypothesis import example, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from chalicelib.domain.graders import similarity

ROUGE = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_3": "rouge3", "rouge_4": "rouge4", "rouge_5": "rouge5",
         "rouge_l": "rougeL"}
# Words that stem (running/runs/ran, happiness/happy), short words left alone, digits, mixed case,
# punctuation and non-ASCII letters, so the tokenizer and the stemmer are both exercised.
VOCABULARY = ("the a an of to is was be cat cats dog dogs run running runs ran happy happiness happily "
              "generalization generalize connected connection connecting quickly quick brown fox jumps over "
              "lazy 42 3.14 x1 COVID-19 don't it's e-mail U.S. naïve café über Straße ÉCOLE Σίσυφος"
              ).split()
texts = st.one_of(
    st.lists(st.sampled_from(VOCABULARY + [",", ".", "!", "?", "—", "\n", "  "]), max_size=40).map(" ".join),
    st.text(max_size=120),
    st.text(alphabet="abc xyz.\n", max_size=60),
)


@functools.cache
def _oracle(rouge_type: str):
    return rouge_scorer.RougeScorer([rouge_type], use_stemmer=True)


def _expected(metric: str, output: str, reference: str) -> float:
    if not output.strip() or not reference.strip():             # similarity.score's own rule, before ROUGE
        return 1.0 if output.strip() == reference.strip() else 0.0
    key = ROUGE[metric]
    return float(_oracle(key).score(reference, output)[key].fmeasure)


@settings(max_examples=400, deadline=None)
@given(output=texts, reference=texts)
@example(output="The cats were running quickly.", reference="the cat runs quick")
@example(output="a a a b", reference="a b b b")
@example(output="!!!", reference="...")
@example(output="naïve café", reference="naive cafe")
def test_rouge_scores_are_identical_to_rouge_score(output, reference):
    for metric in ROUGE:
        assert similarity.score(metric, output, reference) == _expected(metric, output, reference), metric


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from("abcde"), max_size=80), st.lists(st.sampled_from("abcde"), max_size=80))
def test_bit_parallel_lcs_equals_the_quadratic_table(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(table[i - 1][j], table[i][j - 1])
    assert similarity.lcs_length(a, b) == table[-1][-1]


def test_rouge_tokens_match_rouge_scores_tokenizer():
    from rouge_score import tokenizers

    text = "Running runs ran; the CATS' e-mails (2024) naïve Straße generalization!"
    assert similarity.rouge_tokens(text) == tokenizers.DefaultTokenizer(use_stemmer=True).tokenize(text)
