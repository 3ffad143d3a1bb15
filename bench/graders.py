"""Rule-based grader throughput: 100,000 samples per grader in one process (one core).

Each is compared with its bare operation in the same run (string equality; rapidfuzz's
ratio; NLTK/rouge-score calls), so the figure shows rft-hub's own overhead (templates,
result objects, error handling). Targets (issue #4): string_check >= 50,000/s,
text_similarity fuzzy_match >= 5,000/s.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chalicelib.domain.graders import (  # noqa: E402 - after sys.path is set
    Deps,
    build,
    similarity,  # noqa: E402 - after sys.path is set
)
from chalicelib.domain.graders import run as grade  # noqa: E402 - after sys.path is set
from chalicelib.domain.graders.templates import make_sample  # noqa: E402 - after sys.path is set

N = 100_000


def _data(n: int):
    rng = random.Random(1)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    out = []
    for _ in range(n):
        ref = " ".join(rng.choice(words) for _ in range(8))
        answer = ref if rng.random() < 0.5 else " ".join(rng.choice(words) for _ in range(8))
        out.append((make_sample(answer), {"reference_answer": ref}))
    return out


def _rate(fn, data) -> float:
    started = time.perf_counter()
    for sample, item in data:
        fn(sample, item)
    return len(data) / (time.perf_counter() - started)


def run_bench(n: int = N) -> dict:
    data = _data(n)
    deps = Deps()
    results = {}
    specs = {
        "string_check": ({"type": "string_check", "name": "s", "input": "{{sample.output_text}}",
                          "reference": "{{item.reference_answer}}", "operation": "eq"},
                         lambda s, i: s["output_text"] == i["reference_answer"]),
        "text_similarity fuzzy_match": ({"type": "text_similarity", "name": "f", "input": "{{sample.output_text}}",
                                         "reference": "{{item.reference_answer}}", "evaluation_metric": "fuzzy_match"},
                                        lambda s, i: similarity.score("fuzzy_match", s["output_text"],
                                                                      i["reference_answer"])),
    }
    for name, (spec, bare) in specs.items():
        grader = build(spec)
        rate = _rate(lambda s, i, grader=grader: grade(grader, s, i, deps), data)
        base = _rate(bare, data)
        results[name] = {"samples": n, "samples_per_s": int(rate), "bare_operation_per_s": int(base),
                         "overhead_ratio": round(base / rate, 2)}
    for metric, count in (("bleu", 5_000), ("rouge_l", 5_000), ("meteor", 5_000)):
        grader = build({"type": "text_similarity", "name": metric, "input": "{{sample.output_text}}",
                        "reference": "{{item.reference_answer}}", "evaluation_metric": metric})
        rate = _rate(lambda s, i, grader=grader: grade(grader, s, i, deps), data[:count])
        results[f"text_similarity {metric}"] = {"samples": count, "samples_per_s": int(rate)}
    return {"benchmark": "graders", "results": results,
            "targets": {"string_check": 50_000, "text_similarity fuzzy_match": 5_000}}


run = run_bench

if __name__ == "__main__":
    print(json.dumps(run_bench(), indent=2))
