"""Dataset validation speed: rft-hub's streaming validator vs. a bare `json.loads` of every line.

Same 20,000-row file, same process, same run; best of N repetitions for each.
Target (issue #3): the validator takes at most 2x the bare parse.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from sample_data import arithmetic_rows, jsonl  # noqa: E402 - after sys.path is set

from chalicelib.domain import datasets  # noqa: E402 - after sys.path is set

CHUNK = 1024 * 1024


def _chunks(data: bytes):
    for i in range(0, len(data), CHUNK):
        yield data[i:i + CHUNK]


def bare(data: bytes) -> int:
    n = 0
    for line in datasets.iter_lines(_chunks(data)):
        json.loads(line)
        n += 1
    return n


def validator(data: bytes) -> int:
    return datasets.validate(_chunks(data))["rows"]


def best(fn, data: bytes, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn(data)
        times.append(time.perf_counter() - started)
    return min(times)


def run(reps: int = 5) -> dict:
    data = jsonl(arithmetic_rows(20_000, pad_to=1200))
    rows = 20_000
    t_bare, t_val = best(bare, data, reps), best(validator, data, reps)
    mb = len(data) / 1e6
    return {"benchmark": "dataset_validation", "rows": rows, "megabytes": round(mb, 1),
            "bare_json_loads": {"seconds": round(t_bare, 3), "rows_per_s": int(rows / t_bare),
                                "mb_per_s": round(mb / t_bare, 1)},
            "rft_hub_validator": {"seconds": round(t_val, 3), "rows_per_s": int(rows / t_val),
                                  "mb_per_s": round(mb / t_val, 1)},
            "ratio_validator_to_bare": round(t_val / t_bare, 2), "target_ratio": 2.0}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
