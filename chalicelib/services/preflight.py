"""Grader preflight on a team's own dataset (POST /v1/graders/preflight, and at job creation)."""
from __future__ import annotations

import json
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from chalicelib.domain import datasets
from chalicelib.domain.graders import Grader, JudgeRefused, run_text
from chalicelib.domain.graders.core import LambdaGrader, Result
from chalicelib.domain.graders.preflight import CRITICAL, PROBES, findings, stats
from chalicelib.domain.graders.templates import make_sample
from chalicelib.services import files, graders

LAMBDA_BATCH = 100


def sample_rows(team_id: str, file_id: str, n: int, seed: int = 0) -> list[dict]:
    """Reservoir sample of n rows, streamed (the file is never held whole)."""
    rng = random.Random(seed)
    chosen: list[dict] = []
    for i, line in enumerate(datasets.iter_lines(files.open_content(files.get_file(team_id, file_id)))):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if len(chosen) < n:
            chosen.append(row)
        else:
            j = rng.randint(0, i)
            if j < n:
                chosen[j] = row
    return chosen


def _grade_all(grader: Grader, pairs: list[tuple[str, str, dict]], deps) -> list[tuple[str, Result]]:
    if isinstance(grader, LambdaGrader):
        out = []
        for start in range(0, len(pairs), LAMBDA_BATCH):
            chunk = pairs[start:start + LAMBDA_BATCH]
            results = grader.grade_batch([(make_sample(text), item) for _, text, item in chunk], deps)
            out += [(probe, r) for (probe, _, _), r in zip(chunk, results)]
        return out
    with ThreadPoolExecutor(max_workers=8) as pool:   # judge calls overlap
        results = pool.map(lambda p: run_text(grader, p[1], p[2], deps)[0], pairs)
        return [(probe, r) for (probe, _, _), r in zip(pairs, results)]


def run(team_id: str, spec: dict, file_id: str, sample_size: int, key_id: str | None = None) -> dict:
    """Judge calls are the team's (metered, held to its budget); out of budget is the 429."""
    grader = graders.compile_spec(spec, team_id=team_id)
    rows = sample_rows(team_id, file_id, sample_size)
    pairs = []
    for i, row in enumerate(rows):
        item = {**row, "id": str(row.get("id") or f"row-{i}")}
        pairs += [(probe, make(item), item) for probe, make in PROBES.items()]
    try:
        graded = _grade_all(grader, pairs, graders.deps(team_id, key_id=key_id))
    except JudgeRefused as refused:
        raise refused.error from None
    by_probe: dict[str, list[Result]] = {p: [] for p in PROBES}
    for probe, result in graded:
        by_probe[probe].append(result)
    error_kinds = Counter(kind for _, r in graded for kind in r.errors)
    probe_stats = {p: stats([r.reward for r in rs if not r.errors], sum(1 for r in rs if r.errors))
                   for p, rs in by_probe.items()}
    found = findings(probe_stats, dict(error_kinds), len(graded))
    return {"object": "grader.preflight", "grader": {"name": grader.name, "type": grader.type},
            "file_id": file_id, "sample_size": sample_size, "rows_used": len(rows), "probes": probe_stats,
            "findings": found, "passed": not any(f["severity"] == CRITICAL for f in found)}
