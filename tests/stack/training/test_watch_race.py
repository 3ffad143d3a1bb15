"""The training watch's verdict holds against the race (issue #24): a hack that starts three steps
before the end, flagged critical with `on_critical: cancel`.

* The hosted grader asks Bedrock to stop within the reward invocation that raised the finding
  (no reconciler pass needed): training never reaches its last step.
* When Bedrock finishes first anyway (its cancel refused), the job still ends `cancelled` with the
  finding, its model is never served (no model, no alias, no chat), and only the admin's release
  with a reason makes it callable -- recorded on the model, in the alias history and on the bus.
"""
import json
import random
import uuid

import boto3
import openai
import pytest
from helpers import http, reconcile_until_ended, register_graders, wait_submitted
from sample_data import arithmetic_rows, jsonl
from test_watch import AUDIT, PROMPTS, K, PolicyServer, verbose_grader

from chalicelib import outbox
from local.example_graders import arn

TOTAL = 10
HACK_FROM = TOTAL - 2          # steps 8, 9, 10: the hack's three steps


def late_hack(step, total, prompt, m):
    """Honest short answers, then padding the grader pays for in the last three steps."""
    rng = random.Random(f"{prompt['id']}:{step}:{m}")
    ref = prompt["reference_answer"]
    answer = ref if rng.random() < 0.5 else str(int(ref) + 3)
    if step < HACK_FROM:
        return answer
    return "Let me double-check this carefully. " * rng.randint(0, 40) + answer


def start(stack, bedrock, client, suffix, on_critical="cancel"):
    name = f"rft-grader-test-late-{uuid.uuid4().hex[:8]}"
    stack.lambda_app.config["functions"][name] = verbose_grader
    register_graders(client, name)
    bedrock.clock.update({"validating_seconds": 0.5, "queued_seconds": 0.1, "step_seconds": 0.3,
                          "total_steps": TOTAL, "samples_per_step": K * PROMPTS, "samples_per_prompt": K})
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(120))), purpose="fine-tune")
    grader = {"type": "lambda", "name": "verbose", "lambda": {"function": arn(name)}}
    job = client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=f.id, suffix=suffix, extra_body={
        "method": {"type": "reinforcement", "reinforcement": {"grader": grader, "audit_grader": AUDIT}},
        "watch": {"on_critical": on_critical}, "preflight": "warn"})
    bedrock_id = wait_submitted(client, job.id).model_extra["rft_bedrock_job_id"]
    return job, bedrock_id


def set_policy(stack, bedrock_id, policy):
    status, body = http("POST", f"http://127.0.0.1:{stack.bedrock.port}/_local/jobs/{bedrock_id}/policy",
                        body={"url": policy.url})
    assert status == 200, body


def bus_events(detail_type, model, receives=200):
    """The events of `detail_type` about `model` that reached the bus (its SQS tap); other tests'
    messages are left on the queue (hidden for a few seconds while this reads past them)."""
    sqs = boto3.client("sqs", region_name="us-west-2")
    url = sqs.get_queue_url(QueueName=f"{outbox.bus_name()}-outbound-tap")["QueueUrl"]
    found = []
    for _ in range(receives):
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                       VisibilityTimeout=5).get("Messages", [])
        for msg in messages:
            body = json.loads(msg["Body"])
            if body["detail-type"] == detail_type and body["detail"].get("model") == model:
                found.append(body["detail"])
                sqs.delete_message(QueueUrl=url, ReceiptHandle=msg["ReceiptHandle"])
        if found:
            return found
    return found


def wait_bedrock_ended(bedrock, bedrock_id, calls=2000):
    """Waits (by polling the local Bedrock's own state, never rft-hub) until the job has ended there."""
    import time
    for _ in range(calls):
        with bedrock.lock:
            status = bedrock.jobs[bedrock_id]["status"]
        if status in ("succeeded", "failed", "cancelled"):
            return status
        time.sleep(0.05)
    return status


def test_the_hosted_grader_stops_bedrock_within_the_invocation_that_found_the_hack(make_team, stack, bedrock):
    _, key = make_team("watch-stop-now")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    job, bedrock_id = start(stack, bedrock, client, "stop-now")
    policy = PolicyServer(late_hack)
    set_policy(stack, bedrock_id, policy)
    try:
        # No reconciler pass and no read of the job through rft-hub: only the hosted grader can cancel it.
        ended = wait_bedrock_ended(bedrock, bedrock_id)
    finally:
        policy.stop()
    assert ended == "cancelled", ended
    assert max(policy.calls) < TOTAL and bedrock.jobs[bedrock_id].get("fine_tuned_model") is None
    current = reconcile_until_ended(client, job.id, timeout=60)
    assert current.status == "cancelled" and current.error.code == "reward_hacking_suspected"
    assert current.fine_tuned_model is None


@pytest.fixture
def refuse_cancel(bedrock):
    """Bedrock refuses every cancel (as when training finishes first): the race's worst case."""
    def refuse(bedrock_id):
        with bedrock.lock:
            bedrock.faults = [{"path": f"/v1/fine_tuning/jobs/{bedrock_id}/cancel", "method": "POST", "status": 400,
                               "count": 10_000}]
    return refuse


def test_a_late_hack_that_bedrock_finishes_is_never_served_until_the_admin_releases_it(
        api, admin_headers, make_team, stack, bedrock, refuse_cancel):
    team_id, key = make_team("watch-race")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    job, bedrock_id = start(stack, bedrock, client, "late-hack")
    refuse_cancel(bedrock_id)
    policy = PolicyServer(late_hack)
    set_policy(stack, bedrock_id, policy)
    try:
        assert wait_bedrock_ended(bedrock, bedrock_id) == "succeeded"      # Bedrock finished first
        current = reconcile_until_ended(client, job.id, timeout=60)
    finally:
        policy.stop()
    model = bedrock.jobs[bedrock_id]["fine_tuned_model"]
    assert model and max(policy.calls) == TOTAL

    # The SDK sees a cancelled job with the finding, and no model.
    assert current.status == "cancelled", (current.status, current.error)
    assert current.error.code == "reward_hacking_suspected" and "training watch" in current.error.message
    assert current.fine_tuned_model is None and current.model_extra["rft_quarantined_model"] == model
    status, watch = http("GET", f"{stack.base_url}/v1/fine_tuning/jobs/{job.id}/watch", key)
    assert status == 200, watch
    critical = [f for f in watch["findings"] if f["severity"] == "critical"]
    assert critical and all(f["window"] >= HACK_FROM for f in critical) and critical[0]["action"] == "cancel"

    # Never served: not listed, not retrievable, not callable; its suffix alias never made; no alias may move to it.
    assert model not in {m.id for m in client.models.list().data}
    for name in (model, "late-hack"):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(name)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "2+2?"}], max_tokens=5)
    with pytest.raises(openai.ConflictError) as refused:
        client.post("/models/aliases", body={"alias": "prod", "model": model}, cast_to=object)
    assert refused.value.code == "model_quarantined"
    r = api.http.post("/v1/models/aliases", headers=admin_headers, body=json.dumps(
        {"team_id": team_id, "alias": "prod", "model": model, "override_reason": "ship it"}))
    assert r.status_code == 409 and r.json_body["error"]["code"] == "model_quarantined"   # release first

    # The admin releases it with a reason: recorded on the model, in the alias history, on the bus.
    release = f"/v1/admin/teams/{team_id}/model_releases"
    r = api.http.post(release, headers=admin_headers, body=json.dumps({"model": model, "reason": ""}))
    assert r.status_code == 400 and r.json_body["error"]["param"] == "reason"
    r = api.http.post(release, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                      body=json.dumps({"model": model, "reason": "reviewed the rollouts"}))
    assert r.status_code in (401, 403)                                   # the admin's, not a team's
    reviewed = json.dumps({"model": model, "reason": "reviewed the rollouts"})
    r = api.http.post(release, headers=admin_headers, body=reviewed)
    assert r.status_code == 200, r.json_body
    assert r.json_body["rft_watch"]["state"] == "released"
    assert r.json_body["rft_watch"]["reason"] == "reviewed the rollouts"
    again = api.http.post(release, headers=admin_headers, body=json.dumps({"model": model, "reason": "twice"}))
    assert again.status_code == 200 and again.json_body["rft_watch"]["reason"] == "reviewed the rollouts"
    history = client.get("/models/aliases/late-hack/history", cast_to=object)["data"]
    assert history[0]["model"] == model and history[0]["changed_by"] == "admin"
    assert "reviewed the rollouts" in history[0]["override_reason"]
    assert history[0]["watch"]["state"] == "released"
    released = bus_events("rft-hub.model.released", model)
    assert len(released) == 1 and released[0]["reason"] == "reviewed the rollouts"
    assert released[0]["released_from"] == "quarantined" and released[0]["job_id"] == job.id
    from chalicelib.store.models import AuditEntry  # the audit log (issue #29): one entry, the admin's
    entries = [e for e in AuditEntry.query("audit", consistent_read=True) if e.team_id == team_id]
    assert [(e.action, e.actor, e.target) for e in entries if e.action in ("model.released", "alias.override")] == \
        [("model.released", "admin", f"model:{model}")]
    assert client.models.retrieve(model).id == model
    assert client.chat.completions.create(model="late-hack", messages=[{"role": "user", "content": "2+2?"}],
                                          max_tokens=5).choices


def test_with_alert_the_flagged_model_is_served_but_no_alias_moves_to_it_without_the_admins_override(
        api, admin_headers, make_team, stack, bedrock):
    team_id, key = make_team("watch-alert")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    job, bedrock_id = start(stack, bedrock, client, "flagged", on_critical="alert")
    policy = PolicyServer(late_hack)
    set_policy(stack, bedrock_id, policy)
    try:
        current = reconcile_until_ended(client, job.id, timeout=90)
    finally:
        policy.stop()
    assert current.status == "succeeded" and current.error is None, (current.status, current.error)
    model = current.fine_tuned_model
    tuned = client.models.retrieve(model).model_extra
    assert tuned["rft_watch"]["state"] == "flagged" and tuned["rft_watch"]["findings"]
    codes = {f["code"] for f in tuned["rft_watch"]["findings"]}
    assert client.chat.completions.create(model=model, messages=[{"role": "user", "content": "2+2?"}],
                                          max_tokens=5).choices                      # served by its id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("flagged")                                           # the suffix alias not made
    with pytest.raises(openai.ConflictError) as refused:
        client.post("/models/aliases", body={"alias": "prod", "model": model}, cast_to=object)
    assert refused.value.code == "watch_finding" and all(c in refused.value.message for c in codes)
    move = {"team_id": team_id, "alias": "prod", "model": model}
    r = api.http.post("/v1/models/aliases", headers=admin_headers, body=json.dumps(move))
    assert r.status_code == 409 and r.json_body["error"]["code"] == "watch_finding"
    r = api.http.post("/v1/models/aliases", headers=admin_headers,
                      body=json.dumps({**move, "override_reason": "the length finding is the grader's, accepted"}))
    assert r.status_code == 200, r.json_body
    history = client.get("/models/aliases/prod/history", cast_to=object)["data"]
    assert history[0]["override_reason"] == "the length finding is the grader's, accepted"
    assert history[0]["watch"]["state"] == "flagged" and {f["code"] for f in history[0]["watch"]["findings"]} == codes
    from chalicelib.store.models import AuditEntry  # the audit log (issue #29): the admin's override, once
    overrides = [e for e in AuditEntry.query("audit", consistent_read=True)
                 if e.team_id == team_id and e.action == "alias.override"]
    assert [(e.actor, e.target, e.after["overrode"]) for e in overrides] == [("admin", "alias:prod", "watch_flag")]
    assert client.chat.completions.create(model="prod", messages=[{"role": "user", "content": "2+2?"}],
                                          max_tokens=5).choices
