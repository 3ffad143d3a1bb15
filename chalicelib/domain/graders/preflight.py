"""Reward-hacking preflight: what a grader gives to answers that should score low.

For each sampled row the grader scores the reference answer itself and a set of
adversarial responses. Findings name what would let a policy learn the wrong thing.
"""
from __future__ import annotations

import json
import statistics
from typing import Callable

REFUSAL = "I'm sorry, but I can't help with that request."
CRITICAL, WARNING, INFO = "critical", "warning", "info"


def reference_text(item: dict) -> str:
    ref = item.get("reference_answer")
    if isinstance(ref, dict):
        for key in ("text", "answer", "final_answer", "solution"):
            if isinstance(ref.get(key), str):
                return ref[key]
        return json.dumps(ref)
    return "" if ref is None else str(ref)


def _prompt(item: dict) -> str:
    users = [m.get("content") for m in item.get("messages", []) if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users and isinstance(users[-1], str) else ""


PROBES: dict[str, Callable[[dict], str]] = {
    "reference": reference_text,
    "empty": lambda item: "",
    "whitespace": lambda item: "  \n\t  ",
    "prompt_echo": _prompt,
    "refusal": lambda item: REFUSAL,
    "long_repetitive": lambda item: "This is a thorough and complete answer. " * 150,
    "padded_reference": lambda item: ("Let me think step by step about this. " * 20 + reference_text(item)
                                      + " I hope this helps! " * 20),
    "format_slip": lambda item: f"The answer is: {reference_text(item).upper()}.",
}


def stats(scores: list[float], errors: int) -> dict:
    return {"count": len(scores), "mean": round(statistics.fmean(scores), 4) if scores else None,
            "min": min(scores) if scores else None, "max": max(scores) if scores else None,
            "std": round(statistics.pstdev(scores), 4) if len(scores) > 1 else 0.0, "errors": errors}


def findings(probes: dict[str, dict], error_kinds: dict[str, int], total: int) -> list[dict]:
    out = []
    ref = probes["reference"]["mean"] or 0.0

    def add(code, severity, message):
        out.append({"code": code, "severity": severity, "message": message})

    errors = sum(p["errors"] for p in probes.values())
    if total and errors:
        rate = errors / total
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(error_kinds.items()))
        add("judge_errors", CRITICAL if rate >= 0.1 else WARNING,
            f"{errors} of {total} gradings failed ({kinds}); failed samples score 0 in training.")
    if error_kinds.get("invalid_variable_error"):
        add("invalid_variable", CRITICAL, "A template names a field some rows do not have.")
    if ref < 0.5:
        add("reference_scores_low", CRITICAL, f"The reference answers themselves score {ref} on average: "
            "the grader or the data is wrong, and training will learn from noise.")
    for probe, code in (("empty", "rewards_empty_response"), ("whitespace", "rewards_whitespace"),
                        ("refusal", "rewards_refusal"), ("prompt_echo", "rewards_prompt_echo")):
        mean = probes[probe]["mean"] or 0.0
        if mean >= 0.5 or (ref > 0 and mean >= ref - 0.05):
            add(code, CRITICAL, f"A degenerate '{probe}' response scores {mean} (reference: {ref}): the policy "
                "can collect reward without answering.")
    long_mean = probes["long_repetitive"]["mean"] or 0.0
    if long_mean >= 0.5 or (ref > 0 and long_mean >= 0.8 * ref):
        add("rewards_length", WARNING, f"A long, repetitive non-answer scores {long_mean}: the policy may "
            "learn to write more instead of better.")
    spread = [p["max"] for p in probes.values() if p["count"]] + [p["min"] for p in probes.values() if p["count"]]
    if spread and max(spread) - min(spread) < 1e-9:
        add("constant_reward", CRITICAL, f"Every response scores {spread[0]}: there is no learning signal.")
    if probes["padded_reference"]["mean"] is not None and ref > 0 and probes["padded_reference"]["mean"] < 0.5 * ref:
        add("padding_not_rewarded", INFO, "The reference buried in padding scores low: verbose but correct "
            "answers will be penalised (often intended).")
    if probes["format_slip"]["mean"] is not None and ref > 0 and probes["format_slip"]["mean"] < 0.5 * ref:
        add("format_sensitive", INFO, "A correct answer with a small format slip scores low: the grader is "
            "strict about format.")
    return out
