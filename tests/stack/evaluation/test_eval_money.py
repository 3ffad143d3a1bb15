"""Evals that bind (issue #23): a run's cost cap counts what is sent (M1), and an eval worker
that meets an unexpected failure on an item fails the run instead of redelivering it for ever (L8)."""
import json
import time

from helpers import wait_run
from hypothesis import given, settings
from hypothesis import strategies as st
from test_evals import JUDGE, TUNED, _eval, _inline, _team_id

from chalicelib.domain import budget as budget_rules
from chalicelib.domain.graders.templates import compile_template, make_sample
from chalicelib.evaluation import worker as eval_worker
from chalicelib.spend import ledger
from chalicelib.store.models import EvalRunRecord

FILLER = "Context. " * 3_000          # 27,000 characters of fixed text in every call


def _run_entries(team_id, run_id):
    return [e for e in ledger.entries(team_id) if e.request_id.startswith(run_id + ".")]


def test_a_run_cost_cap_counts_the_rendered_template_and_judge_inputs(client, bedrock, api, admin_headers):
    """The finding's reproduction: a template (and a judge) with a long fixed text, a small cap."""
    # The catalog's price (other tests in a session may have set another): $0.15 / $0.60 per 1M.
    r = api.http.put("/v1/admin/prices/openai.gpt-oss-120b", headers=admin_headers,
                     body=json.dumps({"input_usd_per_1m": "0.15", "output_usd_per_1m": "0.60"}))
    assert r.status_code == 200, r.json_body
    team_id = _team_id(client)
    judge = {**JUDGE, "input": [{"role": "user", "content": FILLER + "Reference: {{item.reference_answer}}\n"
                                 "Answer: {{sample.output_text}}"}]}
    ev = _eval(client, TUNED, judge, name="cap-template")
    source = _inline("openai.gpt-oss-120b", 6)
    source["input_messages"]["template"][0]["content"]["text"] = FILLER + "Say {{item.reference_answer}}."
    # Each item sends ~27,000 characters twice (the generation and the judge): about $0.0010 each
    # at the local Bedrock's count; a cap of $0.0050 admits at most a couple of items.
    cap = 5_000
    run = client.evals.runs.create(ev.id, data_source=source, extra_body={"rft_max_usd": "0.005000"})
    done = wait_run(client, ev.id, run.id)
    assert done.status == "canceled" and done.error.code == "cost_cap_reached", done.error
    entries = _run_entries(team_id, run.id)
    spent = sum(e.cost_micro for e in entries)
    assert entries and {e.kind for e in entries} == {"inference", "grader"}    # items ran, judges too
    assert spent <= cap, (spent, len(entries))


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60)


@settings(max_examples=200, deadline=None)
@given(fixed=st.lists(_TEXT, min_size=1, max_size=4), refs=st.lists(st.sampled_from(
    ["{{sample.output_text}}", "{{ sample.output_text }}", "{{sample.output_json.a}}"]), max_size=3),
    reference=_TEXT, output=_TEXT)
def test_a_judge_input_never_exceeds_its_estimate(fixed, refs, reference, output):
    """Whatever the judge's template and the sample: its rendered input's estimate (what the
    gateway holds) is within the worker's bound for it."""
    text = "".join(f + r for f, r in zip(fixed, refs + [""] * len(fixed))) + "{{item.reference_answer}}"
    spec = {"input": [{"role": "user", "content": text}]}
    item, sample_text = {"reference_answer": reference}, json.dumps({"a": output})
    out_tokens = budget_rules.prompt_tokens_estimate(sample_text)      # as the worker counts a given sample
    parts, count = eval_worker._judge_input(spec)
    bound = budget_rules.prompt_tokens_estimate([{"role": r, "content": p(item, {})} for r, p in parts]) \
        + count * (out_tokens + eval_worker.JOIN_TOKENS)
    sent = [{"role": "user", "content": compile_template(text)(item, make_sample(sample_text))}]
    assert budget_rules.prompt_tokens_estimate(sent) <= bound


# ---- M2: a promotion gate binds ---------------------------------------------------------------------

def _gate_source(model, rows, template="Q: {{item.id}}", sampling=None):
    return {"type": "completions", "model": model,
            "source": {"type": "file_content", "content": [{"item": r} for r in rows]},
            "input_messages": {"type": "template", "template": [
                {"type": "message", "role": "user", "content": {"type": "input_text", "text": template}}]},
            "sampling_params": sampling or {"max_completion_tokens": 16}}


def test_a_gate_counts_only_runs_made_with_its_pinned_data_and_settings(client, stack, bedrock):
    from helpers import start_job, wait_for
    from sample_data import arithmetic_rows
    from test_evals import _point

    alias = f"pinned-{int(time.time() * 1000) % 10**8}"
    job = wait_for(client, start_job(client, suffix=alias).id, {"succeeded", "failed"}, timeout=60)
    assert job.status == "succeeded", job.error
    steps = {c["step"]: c["model"] for c in client.models.retrieve(job.fine_tuned_model).model_extra["rft_checkpoints"]}
    step3, step4 = steps[3], steps[4]
    key = client.api_key
    ev = _eval(client, {"type": "string_check", "name": "step4", "input": "{{sample.output_text}}",
                        "reference": "ckpt-step-4", "operation": "like"}, name="pinned-gate")
    rows = arithmetic_rows(20, seed=7)
    pinned = {k: v for k, v in _gate_source("x", rows).items() if k not in ("type", "model")}

    # A gate must pin its data; too few items is refused.
    status, answer = _point(stack, key, alias=alias, model=job.fine_tuned_model,
                            gate={"eval_id": ev.id, "criteria": {"step4": 0.9}})
    assert status == 400 and answer["error"]["param"] == "gate.data_source", answer
    status, answer = _point(stack, key, alias=alias, model=job.fine_tuned_model, gate={
        "eval_id": ev.id, "criteria": {"step4": 0.9},
        "data_source": {k: v for k, v in _gate_source("x", rows[:1]).items() if k not in ("type", "model")}})
    assert status == 400 and answer["error"]["param"] == "gate.data_source.source", answer
    gate = {"eval_id": ev.id, "criteria": {"step4": 0.9}, "data_source": pinned}
    status, answer = _point(stack, key, alias=alias, model=job.fine_tuned_model, gate=gate)
    assert status == 200 and answer["rft_gate"]["min_items"] == 20, answer
    assert answer["rft_gate"]["data_source"]["source"]["items"] == 20

    # The honest run on step 3 fails the gate.
    honest3 = wait_run(client, ev.id, client.evals.runs.create(ev.id, data_source=_gate_source(step3, rows)).id)
    assert honest3.status == "completed"
    status, answer = _point(stack, key, alias=alias, model=step3)
    assert status == 409 and honest3.id in answer["error"]["message"], answer

    # Rigged runs of step 3 that score 1.0: the finding's one-item echo of the reference, the pinned
    # data through an echoing template, and the pinned data and template with other sampling.
    echo = {"messages": [{"role": "user", "content": "x"}], "reference_answer": "ckpt-step-4"}
    rigs = [_gate_source(step3, [echo], template="{{item.reference_answer}}"),
            _gate_source(step3, rows, template="{{item.id}} ckpt-step-4"),
            _gate_source(step3, rows, template="Q: {{item.id}} ckpt-step-4", sampling={"max_completion_tokens": 17})]
    for source in rigs:
        rigged = wait_run(client, ev.id, client.evals.runs.create(ev.id, data_source=source).id)
        assert rigged.status == "completed" and rigged.per_testing_criteria_results[0].passed > 0, rigged
        status, answer = _point(stack, key, alias=alias, model=step3)
        assert status == 409 and answer["error"]["code"] == "gate_failed", answer
        assert rigged.id not in answer["error"]["message"]

    # An honest run with the pinned settings on step 4 passes and is the evidence.
    honest4 = wait_run(client, ev.id, client.evals.runs.create(ev.id, data_source=_gate_source(step4, rows)).id)
    status, answer = _point(stack, key, alias=alias, model=step4)
    assert status == 200 and answer["rft_evidence"]["eval_run_id"] == honest4.id, answer


# ---- L8 (worker side): a bad item fails the run, never a poison message ----------------------------

def test_an_unexpected_failure_on_an_item_fails_the_run_with_a_clear_error(client, bedrock):
    """'²'.isdigit() is true and int('²') raises: the finding's item reference crashed the worker on
    every delivery, leaving the run in_progress. Whatever an item does to the worker, the run ends:
    failed with a clear error (or, once the reference is read as a missing index, completed with
    the item's invalid_variable_error)."""
    ev = _eval(client, TUNED, name="poison-item")
    source = _inline("openai.gpt-oss-20b", 2)
    source["input_messages"] = {"type": "item_reference", "item_reference": "item.messages.²"}
    run = client.evals.runs.create(ev.id, data_source=source)
    done = wait_run(client, ev.id, run.id, timeout=60)
    assert done.status in ("failed", "completed"), done.status
    if done.status == "failed":
        assert done.error.code == "internal_error" and "ValueError" in done.error.message, done.error
        record = EvalRunRecord.get(ev.id, run.id, consistent_read=True)
        assert record.lease_token is None and (record.attempts or 0) == 1     # failed at once, not redelivered
    else:
        items = client.evals.runs.output_items.list(run.id, eval_id=ev.id).data
        assert items and all(i.sample.error.code == "invalid_variable_error" for i in items)
