"""Jobs never hang with money held (issue #23 M3, M4): every failure of the job worker is
classified once -- not found and other 4xx fail the job and release its hold; only throttles,
5xx and timeouts are retried -- and a lease taken is always released or the job failed.

The job is recorded with its queue unreachable (RFT_JOBS_QUEUE names no queue: creation goes on,
as documented, and leaves the job to the reconciler), so the test decides what happens before the
worker's step, which it then runs as the worker and the reconciler do (`submit.prepare`)."""
import json
import time

import openai
import pytest
from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError
from helpers import start_job, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from sample_data import arithmetic_rows, jsonl

from chalicelib.domain import budget as budget_rules
from chalicelib.errors import (
    ApiError,
    Conflict,
    GatewayTimeout,
    InternalError,
    InvalidRequest,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
)
from chalicelib.spend import budgets
from chalicelib.store.models import Job
from chalicelib.training import lifecycle, submit

EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
         "reference": "{{item.reference_answer}}", "operation": "eq"}


def _budgeted_client(api, admin_headers, make_team, stack):
    team_id, key = make_team("hang")
    r = api.http.put(f"/v1/admin/teams/{team_id}/budget", headers=admin_headers,
                     body=json.dumps({"limit_usd": "1000"}))
    assert r.status_code == 200
    return team_id, openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)


def _holds(team_id):
    return budgets.open_holds(budgets.period_item(team_id, budget_rules.period_of(time.time())))


def _unqueued(monkeypatch, create):
    """Creates a job whose worker message cannot be sent (the reconciler's case)."""
    monkeypatch.setenv("RFT_JOBS_QUEUE", "rfthub-local-no-such-queue")
    try:
        return create()
    finally:
        monkeypatch.undo()


def test_a_job_whose_file_is_deleted_before_submission_fails_and_releases_its_hold(api, admin_headers, make_team,
                                                                                    stack, bedrock, monkeypatch):
    team_id, client = _budgeted_client(api, admin_headers, make_team, stack)
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    created = _unqueued(monkeypatch, lambda: client.fine_tuning.jobs.create(
        model="openai.gpt-oss-20b", training_file=f.id,
        extra_body={"method": {"type": "reinforcement", "reinforcement": {"grader": EXACT}}}))
    job = Job.get(team_id, created.id, consistent_read=True)
    assert job.submit_state == "pending" and job.budget_hold_id in _holds(team_id)
    client.files.delete(f.id)                                    # deleted before the worker submits
    submit.prepare(team_id, created.id)                            # the worker's (or reconciler's) step
    job = Job.get(team_id, created.id, consistent_read=True)
    assert job.status == "failed" and job.submit_state == "rejected", (job.status, job.submit_state)
    assert f.id in job.error["message"]                         # the deleted file is named, not "unavailable"
    lifecycle.reconcile()                                        # finalizes: the hold is released
    assert job.budget_hold_id not in _holds(team_id)
    assert client.fine_tuning.jobs.retrieve(created.id).status == "failed"


def test_a_job_whose_judge_is_retired_before_the_preflight_fails_and_releases_its_hold(api, admin_headers,
                                                                                       make_team, stack, bedrock,
                                                                                       monkeypatch):
    team_id, client = _budgeted_client(api, admin_headers, make_team, stack)
    first = wait_for(client, start_job(client).id, {"succeeded", "failed"}, timeout=60)
    assert first.status == "succeeded", first.error
    judge = {"type": "score_model", "name": "judge", "model": first.fine_tuned_model, "range": [0, 1],
             "input": [{"role": "user", "content": "Reference: {{item.reference_answer}}\n"
                                                   "Answer: {{sample.output_text}}"}]}
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    created = _unqueued(monkeypatch, lambda: client.fine_tuning.jobs.create(
        model="openai.gpt-oss-20b", training_file=f.id, extra_body={
            "preflight": "warn", "method": {"type": "reinforcement", "reinforcement": {"grader": judge}}}))
    job = Job.get(team_id, created.id, consistent_read=True)
    assert job.preflight_state == "queued" and job.budget_hold_id in _holds(team_id)
    client.models.delete(first.fine_tuned_model)                 # the judge retired before the preflight
    assert submit.prepare(team_id, created.id) == "failed"
    job = Job.get(team_id, created.id, consistent_read=True)
    assert job.status == "failed" and job.preflight_state == "failed" and job.preflight_lease_until is None
    assert job.error["param"] == "method.reinforcement.grader"
    lifecycle.reconcile()
    assert job.budget_hold_id not in _holds(team_id)


def test_a_throttled_or_unavailable_submission_releases_its_lease(api, admin_headers, make_team, stack, bedrock,
                                                                  monkeypatch):
    """The other side of the classification: a 503 after retries is retried, and the lease is
    given back at once (the reconciler submits at its next pass)."""
    team_id, client = _budgeted_client(api, admin_headers, make_team, stack)
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    created = _unqueued(monkeypatch, lambda: client.fine_tuning.jobs.create(
        model="openai.gpt-oss-20b", training_file=f.id,
        extra_body={"method": {"type": "reinforcement", "reinforcement": {"grader": EXACT}}}))
    bedrock.faults = [{"status": 503, "count": 1000, "path": "/v1/files", "method": "POST"}]
    assert submit.prepare(team_id, created.id) == "pending"
    job = Job.get(team_id, created.id, consistent_read=True)
    assert job.status != "failed" and job.submit_lease_until is None and job.budget_hold_id in _holds(team_id)
    bedrock.faults = []
    assert submit.prepare(team_id, created.id) == "submitted"


_RETRIED = st.sampled_from([RateLimited("x"), ServiceUnavailable("x"), GatewayTimeout("x"), UpstreamError("x"),
                            ReadTimeoutError(endpoint_url="http://s3"), ConnectTimeoutError(endpoint_url="http://s3")])
_FAILED = st.sampled_from([NotFound("x"), InvalidRequest("x"), Conflict("x"), InternalError("x"), ApiError("x"),
                           KeyError("x"), ValueError("x"), TypeError("x")])


@settings(max_examples=40, deadline=None)
@given(retried=_RETRIED, failed=_FAILED, status=st.integers(400, 599))
def test_every_failure_is_classified_once(retried, failed, status):
    from chalicelib.adapters.bedrock import BedrockRejected, UpstreamStatus

    assert submit.retryable(retried) and not submit.retryable(failed)
    assert not submit.retryable(BedrockRejected("x"))
    assert submit.retryable(UpstreamStatus(status, "x", None, None)) == (status == 429 or status >= 500)


@pytest.fixture(autouse=True)
def _restore_faults(bedrock):
    yield
    bedrock.faults = []
