"""Team-style reward Lambdas for the local stack (what a team would deploy themselves).

Each follows Bedrock's reward contract: a bare list of samples in, a list of
{id, aggregate_reward_score, metrics_list} out.
"""
from __future__ import annotations

from local.servers import ACCOUNT, REGION


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


# Named rft-grader-* like every team grader (the only names rft-hub may invoke). A team may use
# them once an admin registers them to it: `make run` does that for the demo team, the tests for theirs.
FUNCTIONS = {
    "rft-grader-example-exact-match": exact_match,
    "rft-grader-example-always-half": always_half,
    "rft-grader-example-broken-contract": broken_contract,
}


def arn(name: str) -> str:
    """The local ARN of an example grader (the local stack's account and region)."""
    return f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}"
