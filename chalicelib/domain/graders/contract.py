"""Bedrock's reward-Lambda contract (shared/docs/bedrock-rft.md section 5).

In: a bare JSON list of {id, messages (the prompt plus the generated assistant turn),
reference_answer, ...extra fields}. Out: a list of {id, aggregate_reward_score,
metrics_list?: [{name, value, type: "Metric"|"Reward"}]}, one per input, same ids.
"""
from __future__ import annotations

from typing import Any

from chalicelib.domain import numbers


def request_rows(pairs: list[tuple[dict, dict]]) -> list[dict]:
    """Rows as Bedrock would send them, for (sample, item) pairs."""
    rows = []
    for i, (sample, item) in enumerate(pairs):
        prompt = item.get("messages") if isinstance(item.get("messages"), list) else []
        row = {k: v for k, v in item.items() if k not in ("messages", "id")}
        row.update({"id": str(item.get("id") or f"sample-{i}"),
                    "messages": prompt + [{"role": "assistant", "content": sample["output_text"]}]})
        if i and any(r["id"] == row["id"] for r in rows):
            row["id"] = f"{row['id']}#{i}"
        rows.append(row)
    return rows


# Lambda refuses a synchronous request over 6,291,456 bytes; the JSON list's brackets and commas
# and a margin for the SDK's framing are kept under it.
MAX_INVOKE_BYTES = 6_000_000


def size_batches(rows: list[dict], max_bytes: int = MAX_INVOKE_BYTES) -> tuple[list[list[int]], list[int]]:
    """Row indexes grouped so each group's JSON fits one invocation, and the rows too large to
    send at all (they are graded as errors, never sent to be refused)."""
    import json

    batches: list[list[int]] = []
    too_large: list[int] = []
    current, size = [], 2
    for i, row in enumerate(rows):
        n = len(json.dumps(row, separators=(",", ":")).encode()) + 1
        if n + 2 > max_bytes:
            too_large.append(i)
            continue
        if current and size + n > max_bytes:
            batches.append(current)
            current, size = [], 2
        current.append(i)
        size += n
    if current:
        batches.append(current)
    return batches, too_large


def check_response(rows: list[dict], response: Any) -> tuple[list[float], list[str]]:
    """Scores in input order, or every way the response breaks the contract."""
    problems = []
    if isinstance(response, dict) and isinstance(response.get("body"), str):
        problems.append("returned an API Gateway-style {statusCode, body} object; return the list itself")
    if not isinstance(response, list):
        return [], problems + [f"response is not a list (got {type(response).__name__})"]
    by_id: dict[str, Any] = {}
    for i, item in enumerate(response):
        if not isinstance(item, dict):
            problems.append(f"item {i} is not an object")
            continue
        if not isinstance(item.get("id"), str):
            problems.append(f"item {i} has no string 'id'")
            continue
        if item["id"] in by_id:
            problems.append(f"id {item['id']!r} appears twice")
        by_id[item["id"]] = item
        score = item.get("aggregate_reward_score")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            problems.append(f"id {item['id']!r}: aggregate_reward_score is not a number")
        elif numbers.finite(score) is None:      # inf, nan, or an int float() cannot hold
            problems.append(f"id {item['id']!r}: aggregate_reward_score is not finite")
        metrics = item.get("metrics_list", [])
        if not isinstance(metrics, list) or any(
                not isinstance(m, dict) or not isinstance(m.get("name"), str)
                or isinstance(m.get("value"), bool) or not isinstance(m.get("value"), (int, float))
                or m.get("type") not in ("Metric", "Reward") for m in metrics):
            problems.append(f"id {item['id']!r}: metrics_list items need name, numeric value and "
                            "type 'Metric' or 'Reward'")
    wanted = [r["id"] for r in rows]
    missing = [i for i in wanted if i not in by_id]
    extra = [i for i in by_id if i not in set(wanted)]
    if missing:
        problems.append(f"missing ids: {missing[:5]}")
    if extra:
        problems.append(f"unexpected ids: {extra[:5]}")
    if problems:
        return [], problems
    return [float(by_id[i]["aggregate_reward_score"]) for i in wanted], []
