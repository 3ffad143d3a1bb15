"""Team-style reward Lambdas for the local stack (what a team would deploy themselves).

Each follows Bedrock's reward contract: a bare list of samples in, a list of
{id, aggregate_reward_score, metrics_list} out.
"""
from __future__ import annotations


def _reference(sample: dict) -> str:
    ref = sample.get("reference_answer")
    if ref is None:
        ref = (sample.get("metadata") or {}).get("reference_answer")
    if isinstance(ref, dict):
        ref = ref.get("text") or ref.get("answer") or ""
    return str(ref or "")


def _response(sample: dict) -> str:
    messages = sample.get("messages") or []
    return str(messages[-1].get("content", "")) if messages and messages[-1].get("role") != "user" else ""


def exact_match(event, context=None):
    out = []
    for sample in event:
        score = 1.0 if _response(sample).strip().lower() == _reference(sample).strip().lower() else 0.0
        out.append({"id": sample["id"], "aggregate_reward_score": score,
                    "metrics_list": [{"name": "exact_match", "value": score, "type": "Metric"}]})
    return out


def always_half(event, context=None):
    return [{"id": s["id"], "aggregate_reward_score": 0.5} for s in event]


def broken_contract(event, context=None):
    return {"batch": [{"id": s["id"], "aggregate_reward_score": 1.0} for s in event]}


FUNCTIONS = {
    "rft-example-exact-match": exact_match,
    "rft-example-always-half": always_half,
    "rft-example-broken-contract": broken_contract,
}
