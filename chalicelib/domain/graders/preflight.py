"""Reward-hacking preflight: what a grader gives to answers that should score low.

For each sampled row the grader scores the reference answer itself and a set of
adversarial responses. Findings name what would let a policy learn the wrong thing.
Optionally, k base-model samples per prompt measure the learning signal (`base_stats`).

A grader that reads `{{sample.output_json.<field>}}` gets every probe the way it reads answers: the
probe's text in that field of a JSON object (`context` finds the fields; issue #24). Graded as bare
text, even the reference ("540") is not JSON, and a sound grader was refused.
"""
from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from typing import Any

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


def _other(ctx: dict, n: int = 0) -> str | None:
    """Another sampled row's reference (a plausible answer that is wrong here), if there is one."""
    others = ctx.get("others") or []
    return others[n % len(others)] if others else None


def _shotgun(item: dict, ctx: dict) -> str:
    ref = reference_text(item)
    others = ctx.get("others") or []
    if len(others) >= 2:
        return f"It is one of these: {others[0]}, {ref}, {others[1]}."
    if others:
        return f"It is either {others[0]} or {ref}."
    return f"Possible answers: (a) {ref} (b) not {ref} (c) none of these."


def _contradiction(item: dict, ctx: dict) -> str:
    other = _other(ctx)
    return f"{reference_text(item)}. Wait, that is wrong: the answer is {other if other else 'something else'}."


_JSON_FIELD = re.compile(r"\{\{\s*sample\.output_json((?:\.[A-Za-z_][A-Za-z0-9_]*)+)\s*\}\}")


def json_paths(spec: Any) -> list[tuple[str, ...]]:
    """The `sample.output_json` fields a grader spec reads (in any template, at any depth)."""
    found: list[tuple[str, ...]] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            for m in _JSON_FIELD.finditer(value):
                path = tuple(m.group(1).lstrip(".").split("."))
                if path not in found:
                    found.append(path)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
    walk(spec)
    return found


def context(spec: Any, others: list[str]) -> dict:
    """What the probes know besides the row: the other rows' references and the JSON fields the
    grader reads."""
    return {"others": others, "json_paths": json_paths(spec)}


def _as_json(values: dict[tuple[str, ...], Any], extra: dict | None = None) -> str:
    out: dict = dict(extra or {})
    for path, value in values.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else node
        node[path[-1]] = value
    return json.dumps(out)


def _shaped(make: Callable[[dict, dict], str | None]) -> Callable[[dict, dict], str | None]:
    """A probe as the grader reads answers: for an output_json grader, its text in each field read."""
    def probe(item: dict, ctx: dict) -> str | None:
        text = make(item, ctx)
        paths = ctx.get("json_paths") or []
        if text is None or not paths:
            return text
        return _as_json({path: text for path in paths})
    return probe


def _wrong_field(item: dict, ctx: dict) -> str:
    """The answer outside the field the grader reads (an empty field, the answer in another)."""
    paths = ctx.get("json_paths") or [("answer",)]
    return _as_json({path: "" for path in paths}, {"notes": reference_text(item)})


# Each probe makes a response from the row (`item`) and what the preflight knows of the other
# sampled rows (`ctx["others"]`: their references, none equal to this row's; `ctx["json_paths"]`:
# the output_json fields the grader reads); None skips it.
_TEXT_PROBES: dict[str, Callable[[dict, dict], str | None]] = {
    "reference": lambda item, ctx: reference_text(item),
    "empty": lambda item, ctx: "",
    "whitespace": lambda item, ctx: "  \n\t  ",
    "prompt_echo": lambda item, ctx: _prompt(item),
    "refusal": lambda item, ctx: REFUSAL,
    "long_repetitive": lambda item, ctx: "This is a thorough and complete answer. " * 150,
    "padded_reference": lambda item, ctx: ("Let me think step by step about this. " * 20 + reference_text(item)
                                           + " I hope this helps! " * 20),
    "format_slip": lambda item, ctx: f"The answer is: {reference_text(item).upper()}.",
    # Learning-signal probes (issue #16): answers a policy can drift into that must not pay.
    "plausible_wrong": lambda item, ctx: _other(ctx),                  # another row's reference
    "shotgun": _shotgun,                                               # several candidates, one right
    "contradiction": _contradiction,                                   # right, then taken back
}
PROBES: dict[str, Callable[[dict, dict], str | None]] = {
    **{name: _shaped(make) for name, make in _TEXT_PROBES.items()}, "wrong_field": _wrong_field}


def others_for(items: list[dict]) -> list[list[str]]:
    """For each sampled row, the other rows' distinct references that differ from its own, nearest
    rows first (deterministic)."""
    refs = [reference_text(item) for item in items]
    out = []
    for i, own in enumerate(refs):
        seen, chosen = {own.strip().lower()}, []
        for j in list(range(i + 1, len(refs))) + list(range(0, i)):
            key = refs[j].strip().lower()
            if key and key not in seen:
                seen.add(key)
                chosen.append(refs[j])
            if len(chosen) == 3:
                break
        out.append(chosen)
    return out


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

    def mean(probe: str) -> float | None:
        return (probes.get(probe) or {}).get("mean")

    # A wrong answer, or a hedge that lists the right one among others, paid like the reference:
    # the policy learns to guess or to list candidates (critical); paid half as much: a warning.
    for probe, code, what in (("plausible_wrong", "rewards_plausible_wrong", "A plausible wrong answer (another "
                               "row's reference)"),
                              ("shotgun", "rewards_shotgun", "A response listing several candidate answers")):
        value = mean(probe)
        if value is None or ref <= 0:
            continue
        if value >= ref - 0.05:
            add(code, CRITICAL, f"{what} scores {value}, as much as the reference ({ref}): the policy can collect "
                "the reward without knowing the answer.")
        elif value >= 0.5 * ref and value >= 0.3:
            add(code, WARNING, f"{what} scores {value} (reference: {ref}): the grader gives partial credit to "
                "answers that are wrong.")
    value = mean("contradiction")
    if value is not None and ref > 0 and value >= ref - 0.05:
        add("rewards_contradiction", WARNING, f"The right answer followed by a contradiction scores {value} "
            f"(reference: {ref}): the grader does not read past the first answer, so hedging pays.")
    value = mean("wrong_field")
    if value is not None and ref > 0 and value >= ref - 0.05:
        add("rewards_wrong_field", WARNING, f"The answer in the wrong field of a JSON object scores {value} "
            f"(reference: {ref}): the grader accepts answers outside the format it asks for.")
    return out


def base_stats(scores_by_prompt: list[list[float]], reference_mean: float | None) -> dict:
    """What base-model samples say about the learning signal: the reward floor (mean score), the
    share of prompts whose k samples all score the same (GRPO learns nothing from them: every
    sample's advantage is 0), and the headroom (reference mean minus the floor)."""
    scored = [s for s in scores_by_prompt if s]
    flat = [s for s in scored if len(s) >= 2 and max(s) - min(s) <= 1e-9]
    grouped = [s for s in scored if len(s) >= 2]
    every = [x for s in scored for x in s]
    floor = round(statistics.fmean(every), 4) if every else None
    return {"prompts": len(scored), "samples": len(every), "reward_floor": floor,
            "flat_share": round(len(flat) / len(grouped), 4) if grouped else None,
            "headroom": round(reference_mean - floor, 4) if floor is not None and reference_mean is not None else None,
            "reward_std": round(statistics.pstdev(every), 4) if len(every) > 1 else 0.0}


def base_findings(base: dict) -> list[dict]:
    out = []
    if base.get("flat_share") is not None and base["flat_share"] >= 0.8:
        out.append({"code": "no_learning_signal", "severity": WARNING, "message": (
            f"For {base['flat_share']:.0%} of prompts every base-model sample scores the same: GRPO compares a "
            "prompt's samples with each other, so those prompts teach nothing (make the grader finer, or the "
            "prompts harder or easier).")})
    if base.get("reward_floor") is not None and (base["reward_floor"] >= 0.9 or
                                                  (base.get("headroom") is not None and base["headroom"] <= 0.1)):
        out.append({"code": "little_headroom", "severity": WARNING, "message": (
            f"The base model already scores {base['reward_floor']} (headroom to the references: "
            f"{base.get('headroom')}): there is little left for training to improve.")})
    return out
