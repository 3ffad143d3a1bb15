"""Judge calls for graders (`score_model`, `label_model`): checked like any call of the team and
metered on the gateway's one path (`kind: grader`).
"""
from __future__ import annotations

import json

from chalicelib import tracing
from chalicelib.domain import budget as budget_rules
from chalicelib.domain import ids
from chalicelib.domain.graders import JudgeRefused, judge_specs
from chalicelib.errors import InvalidRequest, NotFound, UpstreamError
from chalicelib.inference import converse as nova_converse
from chalicelib.inference.metered import metered_call, tokens
from chalicelib.inference.targets import Target, priced
from chalicelib.inference.upstream import send
from chalicelib.spend import budgets
from chalicelib.store.models import LedgerEntry


def check_judges(team_id: str, spec, param: str, allowed=None) -> None:
    """A grader's judge models resolve exactly as the gateway resolves them for the team (priced
    base models, the team's own tuned models and aliases, within the calling key's model list
    `allowed`), and a judge served by Converse has no sampling parameter Converse lacks; anything
    else is a 400 naming it (a model outside the key's list: the same 400 as another team's)."""

    for spec_, where in judge_specs(spec, param):
        model = spec_.get("model")
        try:
            target, _ = priced(team_id, model, f"{where}.model", allowed=allowed)
        except NotFound:
            raise InvalidRequest(f"The judge model '{model}' does not exist or you do not have access to it.",
                                 param=f"{where}.model", code="invalid_grader") from None
        sampling = spec_.get("sampling_params") or {}
        for ours in sampling:
            try:
                nova_converse.check_translatable(target, "/chat/completions",
                                        _judge_body(target, [{"role": "user", "content": "-"}], {ours: sampling[ours]}))
            except InvalidRequest as err:
                raise InvalidRequest(f"The judge model '{model}': {err.message}", param=f"{where}.sampling_params.{ours}",
                                     code="invalid_grader") from None


# A grader's sampling parameters, as chat completions takes them.
_JUDGE_SAMPLING = (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                   ("max_completions_tokens", "max_tokens"), ("max_completion_tokens", "max_tokens"),
                   ("reasoning_effort", "reasoning_effort"))


def _judge_body(target: Target, messages: list[dict], sampling: dict) -> dict:
    body: dict = {"model": target.upstream, "messages": messages}
    for ours, theirs in _JUDGE_SAMPLING:
        if sampling.get(ours) is not None:
            body[theirs] = sampling[ours]
    return body


def metered_judge(team_id: str, key_id: str | None, request_id: str, model: str, messages: list[dict],
                  sampling: dict, *, job_id: str | None = None) -> tuple[str, dict, LedgerEntry]:
    """One judge call of a grader (score_model, label_model): the model resolved as the team's
    gateway resolves it, sent as the gateway sends it (Converse for Amazon Nova), and metered on
    the ledger as kind `grader`. Returns (reply text, usage, ledger entry); over budget raises
    budgets.OverBudget."""
    target, price = priced(team_id, model, "grader.model")
    body = _judge_body(target, messages, sampling)
    converse = nova_converse.converse_call(team_id, target, "/chat/completions", body)   # refuses before the hold
    worst = budget_rules.worst_case_micro(price, budget_rules.prompt_tokens_estimate(messages),
                                          sampling.get("max_completion_tokens"))

    def invoke():
        with tracing.subsegment("judge"):
            _, _, raw = send(team_id, target, "/chat/completions", body, converse)
        try:
            data = json.loads(raw)
            choice = (data.get("choices") or [{}])[0]
            text, usage = (choice.get("message") or {}).get("content") or "", data.get("usage") or {}
        except (ValueError, AttributeError, TypeError, IndexError):
            raise UpstreamError("Amazon Bedrock answered the judge call with an unreadable body.") from None
        return (str(text), usage), tokens(usage, "chat")

    (text, usage), entry = metered_call(team_id, key_id or "grader", request_id, target, price, worst,
                                    endpoint="/chat/completions", stream=False, invoke=invoke, kind="grader",
                                    job_id=job_id)
    return text, usage, entry


def judge(team_id: str, *, key_id: str | None = None, job_id: str | None = None, spent: list | None = None):
    """A `Deps.judge` for one team: every call metered on the ledger (kind `grader`, with the job
    id when there is one) and held to the team's budget; over budget raises JudgeRefused.
    `spent`, when given, collects each call's cost in micro-dollars."""

    def call(model: str, messages: list[dict], sampling: dict) -> tuple[str, int]:
        try:
            text, usage, entry = metered_judge(team_id, key_id, ids.new_id("judge", 8), model, messages, sampling,
                                               job_id=job_id)
        except budgets.OverBudget as err:
            raise JudgeRefused(err) from None
        if spent is not None:
            spent.append(entry.cost_micro)
        return text, int(usage.get("total_tokens") or 0)
    return call
