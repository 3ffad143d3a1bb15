"""LLM-judge calls are the team's: resolved like the gateway resolves models, metered on the
ledger, held to the budget, capped in output, and stopped when the budget runs out in training."""
import json
import time

import openai
import pytest
from helpers import reconcile_until_ended, wait_for, wait_submitted
from sample_data import arithmetic_rows, jsonl

from chalicelib.domain import budget as budget_rules
from chalicelib.spend import budgets, ledger, slices
from chalicelib.store.models import BudgetPeriod, Job

JUDGE = {"type": "score_model", "name": "judge", "model": "openai.gpt-oss-120b", "range": [0, 1],
         "input": [{"role": "system", "content": "Grade the answer. Reply with JSON {\"score\": x}."},
                   {"role": "user", "content": "Reference: {{item.reference_answer}}\nAnswer: {{sample.output_text}}"}]}
ITEM = {"reference_answer": "42"}


def team_client(make_team, stack):
    team_id, key = make_team("judges")
    return team_id, openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)


def set_budget(api, admin_headers, team_id, usd):
    r = api.http.put(f"/v1/admin/teams/{team_id}/budget", headers=admin_headers,
                     body=json.dumps({"limit_usd": usd, "alert_thresholds": []}))
    assert r.status_code == 200, r.json_body
    budgets._config.invalidate(team_id)


def grader_entries(team_id):
    return [e for e in ledger.entries(team_id) if e.kind == "grader"]


def test_dry_run_judge_calls_are_metered_and_budgeted(api, admin_headers, make_team, stack, bedrock):
    team_id, client = team_client(make_team, stack)
    set_budget(api, admin_headers, team_id, "5")
    result = client.fine_tuning.alpha.graders.run(grader=JUDGE, model_sample="42", item=ITEM)
    assert result.reward == 1.0
    entries = grader_entries(team_id)
    assert len(entries) == 1 and entries[0].cost_micro > 0 and entries[0].outcome == "served"
    sent = bedrock.requests[-1]["body"]
    assert sent["max_tokens"] == 1024                                      # the default output cap is sent
    slices.lender().give_back_all()                                        # the instance goes idle
    period = BudgetPeriod.get(team_id, budget_rules.period_of(time.time()), consistent_read=True)
    assert period.spent == entries[0].cost_micro and not budgets.open_holds(period)
    report = client.get("/usage", cast_to=object)
    assert report["spend_by_kind"]["grader"] != "0.000000"

    # Out of budget: the dry run is refused with insufficient_quota, not graded 0; nothing is sent.
    set_budget(api, admin_headers, team_id, "0")
    before = len(bedrock.requests)
    with pytest.raises(openai.RateLimitError) as err:
        client.fine_tuning.alpha.graders.run(grader=JUDGE, model_sample="42", item=ITEM)
    assert err.value.code == "insufficient_quota" and len(bedrock.requests) == before


def test_a_judge_model_must_be_one_the_team_may_call(make_team, stack, client, bedrock):
    # Another team's tuned model (as the registry records it) is not this team's to call.
    other_id, other = team_client(make_team, stack)
    from chalicelib.store.models import TunedModel
    TunedModel(other_id, "ft:openai.gpt-oss-20b:other:secret", base_model="openai.gpt-oss-20b", job_id="ftjob-o",
               grader={}, created_at=int(time.time())).save()
    before = len(bedrock.requests)
    for call in (client.fine_tuning.alpha.graders.run, client.fine_tuning.alpha.graders.validate):
        kwargs = {"model_sample": "42", "item": ITEM} if call == client.fine_tuning.alpha.graders.run else {}
        with pytest.raises(openai.BadRequestError) as err:
            call(grader={**JUDGE, "model": "ft:openai.gpt-oss-20b:other:secret"}, **kwargs)
        assert err.value.param == "grader.model"
        assert "secret" not in str(err.value.body.get("message", "")).replace("ft:openai.gpt-oss-20b:other:secret",
                                                                          "")
    assert len(bedrock.requests) == before                                 # never called
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.alpha.graders.validate(
            grader={**JUDGE, "sampling_params": {"max_completion_tokens": 100000}})
    assert err.value.param == "grader.sampling_params.max_completion_tokens"


def test_training_judge_calls_are_billed_to_the_job_and_stop_it_when_money_runs_out(
        api, admin_headers, make_team, stack, bedrock):
    team_id, client = team_client(make_team, stack)
    set_budget(api, admin_headers, team_id, "100")
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    method = {"type": "reinforcement", "reinforcement": {"grader": JUDGE}}
    job = client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=f.id,
                                         extra_body={"method": method, "preflight": "warn"})
    judge_estimate = job.model_extra["rft_cost_estimate"]["judge"]
    assert judge_estimate["calls"] > 0 and judge_estimate["estimated_micro_usd"] > 0
    done = wait_for(client, job.id, {"succeeded"}, timeout=60)
    record = Job.get(team_id, done.id)
    entries = [e for e in grader_entries(team_id) if e.job_id == done.id]
    assert entries and record.judge_micro == sum(e.cost_micro for e in entries)
    usage = client.get("/usage", cast_to=object)
    row = next(t for t in usage["training"] if t["job_id"] == done.id)
    assert row["judge_spent_usd"] != "0.000000"

    # A second job; once it is held and submitted (Bedrock still validating its files), the budget is
    # lowered to what is committed plus what a few judge calls cost -- less than one call's worst
    # case, which a call must fit to be admitted: training runs out of money.
    bedrock.clock["validating_seconds"] = 3
    job2 = client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=f.id,
                                          extra_body={"method": method, "preflight": "warn"})
    wait_submitted(client, job2.id)           # its preflight (judge calls too) ran in the worker
    slices.lender().give_back_all()           # committed: what is spent and the jobs' holds, no slice
    period = BudgetPeriod.get(team_id, budget_rules.period_of(time.time()), consistent_read=True)
    few_calls = 3 * max(e.cost_micro for e in entries)
    assert few_calls < min(e.reserved_micro for e in entries)
    set_budget(api, admin_headers, team_id, str((period.committed + few_calls) / 1_000_000))
    # Long enough that the reconciler's cancel lands before Bedrock would finish (a loaded machine).
    bedrock.clock.update({"validating_seconds": 0.1, "step_seconds": 1.0, "total_steps": 40})
    # The reward Lambda flags the job; the reconciler (here: the next read of the job) cancels it.
    current = reconcile_until_ended(client, job2.id, timeout=60)
    assert current.status == "cancelled", (current.status, current.error)
    assert current.error and current.error.code == "budget_exhausted"
    period = BudgetPeriod.get(team_id, budget_rules.period_of(time.time()), consistent_read=True)
    limit = budgets.config(team_id).limit_micro
    assert period.spent <= limit


def test_a_nova_judge_is_called_through_converse_and_metered(make_team, stack, bedrock):
    """A score_model grader whose judge is an Amazon Nova model: Nova has no OpenAI-compatible
    chat, so the judge goes through the gateway's Converse translation, metered as a grader
    call; a sampling parameter Converse has no equivalent for is a 400 naming it."""
    team_id, client = team_client(make_team, stack)
    nova_judge = {**JUDGE, "model": "amazon.nova-2-lite-v1:0"}
    before, native_before = len(bedrock.requests), len(bedrock.native.requests)
    result = client.fine_tuning.alpha.graders.run(grader=nova_judge, model_sample="42", item=ITEM)
    assert result.reward == 1.0
    sent = bedrock.native.requests[native_before:]
    assert [r["path"] for r in sent] == ["/model/amazon.nova-2-lite-v1:0/converse"], sent
    assert not [r for r in bedrock.requests[before:] if r["path"].endswith("/chat/completions")]
    assert sent[0]["body"]["inferenceConfig"]["maxTokens"] == 1024
    entries = grader_entries(team_id)
    assert len(entries) == 1 and entries[0].upstream_model == "amazon.nova-2-lite-v1:0"
    assert entries[0].cost_micro > 0 and entries[0].input_tokens > 0
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.alpha.graders.run(grader={**nova_judge, "sampling_params": {"seed": 7}},
                                             model_sample="42", item=ITEM)
    assert err.value.body["param"] == "grader.sampling_params.seed" and "Converse" in err.value.message
