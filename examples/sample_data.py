"""Synthetic RFT datasets (arithmetic with exact answers), for the quickstart, tests and benchmarks."""
from __future__ import annotations

import json
import random


def arithmetic_rows(n: int, seed: int = 7, pad_to: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        prompt = f"What is {a} + {b}? Answer with the number only."
        if pad_to:
            prompt += " " + ("Show no working. " * max(0, (pad_to - len(prompt)) // 17))
        rows.append({"id": f"row-{i:05d}",
                     "messages": [{"role": "system", "content": "You are a careful calculator."},
                                  {"role": "user", "content": prompt}],
                     "reference_answer": str(a + b), "difficulty": "easy" if a + b < 1000 else "medium"})
    return rows


def jsonl(rows: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
