"""Event-driven lifecycle: the real handlers, invoked with generated EventBridge events."""
import itertools
import json
import time

import boto3
import pytest
from helpers import start_job, wait_submitted
from hypothesis import given, settings
from hypothesis import strategies as st

from chalicelib import outbox
from chalicelib.domain import ids
from chalicelib.domain import jobs as rules
from chalicelib.store.models import Alias, Job, TunedModel

DETAIL_TYPE = "Model Customization Job State Change"
SEQUENCES = {  # a job's native event sequence -> its final state
    "completed": (["InProgress", "Completed"], "succeeded"),
    "stopped": (["InProgress", "Stopping", "Stopped"], "cancelled"),
    "failed": (["InProgress", "Failed"], "failed"),
}


def event_for(api, bedrock_id, status, **detail):
    arn = f"arn:aws:bedrock:us-west-2:123456789012:model-customization-job/{bedrock_id}"
    body = {"version": "0.0", "jobName": bedrock_id, "jobArn": arn, "jobStatus": status,
            "creationTime": "2026-11-23T10:11:12Z", "lastModifiedTime": "2026-11-23T12:34:56Z", **detail}
    if status == "Failed":
        body.setdefault("failureMessage", "Reward function timed out.")
    return api.events.generate_cw_event(source="aws.bedrock", detail_type=DETAIL_TYPE, detail=body,
                                        resources=[arn])


def deliver(api, event):
    return api.lambda_.invoke("on_bedrock_job_event", event).payload


def record(team_id="team-lifecycle", bedrock_id=None, status="validating_files") -> Job:
    """A submitted job record whose Bedrock side is not consulted (no Completed in its events)."""
    now = ids.now()
    job = Job(team_id, ids.new_id("ftjob"), status=status, model="openai.gpt-oss-20b", training_file="file-x",
              method={"type": "reinforcement"}, bedrock_method={}, created_at=now, updated_at=now,
              request_hash="h", submit_state="submitted", bedrock_job_id=bedrock_id or ids.new_id("ftjob"),
              active_shard="active", status_path=[status])
    job.save()
    return job


def real_job(client, bedrock, suffix=None):
    """A job rft-hub submitted to the local Bedrock, which then finishes it (no polling by rft-hub)."""
    created = wait_submitted(client, start_job(client, suffix=suffix).id)
    bid = created.model_extra["rft_bedrock_job_id"]
    deadline = time.monotonic() + 20
    while bedrock.jobs[bid]["status"] != "succeeded":
        assert time.monotonic() < deadline, bedrock.jobs[bid]["status"]
        time.sleep(0.1)
    return Job.get(created.organization_id, created.id), bid


def test_in_order_events_complete_register_and_alias(api, client, bedrock):
    job, bid = real_job(client, bedrock, suffix="calc-bot")
    assert deliver(api, event_for(api, bid, "InProgress")) == "applied"
    assert deliver(api, event_for(api, bid, "Completed")) == "applied"
    job.refresh()
    assert job.status == "succeeded" and job.fine_tuned_model == bedrock.jobs[bid]["fine_tuned_model"]
    assert job.active_shard is None                       # finalized: out of the reconciler's index
    model = TunedModel.get(job.team_id, job.fine_tuned_model)
    assert model.base_model == "openai.gpt-oss-20b" and model.job_id == job.job_id
    assert model.best_reward is not None and model.checkpoints
    assert Alias.get(job.team_id, "calc-bot").model_id == job.fine_tuned_model
    sources = [e.rft_source for e in client.fine_tuning.jobs.list_events(job.job_id, limit=100).data
               if e.message.startswith("Status")]
    assert "event" in sources


def test_every_permutation_ends_like_in_order_delivery(api, client, bedrock):
    for name, (sequence, final) in SEQUENCES.items():
        orders = set(itertools.permutations(sequence)) | {tuple(sequence + sequence)}
        for order in orders:
            if name == "completed":
                job, bid = real_job(client, bedrock)
            else:
                job = record()
                bid = job.bedrock_job_id
            for status in order:
                deliver(api, event_for(api, bid, status))
            job.refresh()
            assert job.status == final, (name, order, job.status)
            if final == "succeeded":
                assert job.fine_tuned_model
            if final == "failed":
                assert job.error["message"] == "Reward function timed out."


@settings(max_examples=15, deadline=None)
@given(st.lists(st.sampled_from(["InProgress", "Stopping", "Stopped"]), min_size=1, max_size=8))
def test_any_delivery_with_duplicates_converges(api, stack, delivered):
    job = record()
    for status in delivered:
        deliver(api, event_for(api, job.bedrock_job_id, status))
    job.refresh()
    expected = "cancelled" if "Stopped" in delivered else "running"
    assert job.status == expected
    assert job.status_path == sorted(set(job.status_path), key=job.status_path.index)  # never repeats


@given(st.permutations(["validating_files", "queued", "running", "succeeded", "failed", "running", "queued"]))
def test_transition_is_monotonic_and_final(observed):
    status, path = "validating_files", ["validating_files"]
    for o in observed:
        nxt = rules.transition(status, o)
        if nxt:
            status = nxt
            path.append(nxt)
    ranks = [list(rules.STATUSES).index(p) if p in ("validating_files", "queued", "running") else 3 for p in path]
    assert ranks == sorted(ranks) and sum(1 for p in path if p in rules.TERMINAL) <= 1


def test_bad_events_are_dropped_never_raised(api, stack):
    job = record()
    assert deliver(api, event_for(api, "ftjob-unknown", "InProgress")) == "dropped"
    bad = event_for(api, job.bedrock_job_id, "InProgress")
    for mutate in (lambda e: e.update(detail="not a dict"), lambda e: e["detail"].pop("jobStatus"),
                   lambda e: e["detail"].update(jobStatus="Exploded"), lambda e: e.update(region="eu-west-1"),
                   lambda e: e.update({"detail-type": "Something Else"}), lambda e: e.update(detail=None)):
        event = json.loads(json.dumps(bad))
        mutate(event)
        assert deliver(api, event) == "dropped"
    job.refresh()
    assert job.status == "validating_files"


def test_the_aws_sample_event_verbatim(api, stack):
    sample = {"version": "0", "id": "UUID", "detail-type": "Model Customization Job State Change",
              "source": "aws.bedrock", "account": "123456789012", "time": "2023-08-11T12:34:56Z",
              "region": "us-east-1",
              "resources": ["arn:aws:bedrock:us-east-1:123456789012:model-customization-job/abcdefghwxyz"],
              "detail": {"version": "0.0", "jobName": "abcd-wxyz",
                         "jobArn": "arn:aws:bedrock:us-east-1:123456789012:model-customization-job/abcdefghwxyz",
                         "outputModelName": "dummy-output-model-name",
                         "outputModelArn": "arn:aws:bedrock:us-east-1:123456789012:dummy-output-model-name",
                         "roleArn": "arn:aws:iam::123456789012:role/JobExecutionRole", "jobStatus": "Failed",
                         "failureMessage": "Failure Message here.", "creationTime": "2023-08-11T10:11:12Z",
                         "lastModifiedTime": "2023-08-11T12:34:56Z", "endTime": "2023-08-11T12:34:56Z",
                         "baseModelArn": "arn:aws:bedrock:us-east-1:123456789012:base-model-name",
                         "hyperParameters": {"batchSize": "1", "epochCount": "5", "learningRate": "0.05",
                                             "learningRateWarmupSteps": "10"},
                         "trainingDataConfig": {"s3Uri": "s3://bucket/key"},
                         "validationDataConfig": {"s3Uri": "s3://bucket/key"},
                         "outputDataConfig": {"s3Uri": "s3://bucket/key"}}}
    assert deliver(api, sample) == "dropped"   # our region is us-west-2: another region's job is not ours
    job = record(bedrock_id="abcd-wxyz")
    assert deliver(api, dict(sample, region="us-west-2")) == "applied"
    job.refresh()
    assert job.status == "failed" and job.error["message"] == "Failure Message here."


def test_reconciler_repairs_a_dropped_completed_event(api, client, bedrock):
    job, bid = real_job(client, bedrock, suffix="repaired")
    deliver(api, event_for(api, bid, "InProgress"))      # ... and the Completed event is lost
    job.refresh()
    assert job.status == "running"
    report = api.lambda_.invoke("reconcile_jobs", api.events.generate_cw_event(
        source="aws.events", detail_type="Scheduled Event", detail={}, resources=[])).payload
    assert report["errors"] == 0, report["problems"]
    job.refresh()
    assert job.status == "succeeded" and job.active_shard is None
    assert Alias.get(job.team_id, "repaired").model_id == job.fine_tuned_model
    metrics = [e for e in client.fine_tuning.jobs.list_events(job.job_id, limit=100).data if e.type == "metrics"]
    assert metrics   # the reward curve was copied from Bedrock


def test_reconciler_submits_jobs_left_pending(api, client, bedrock):
    bedrock.faults = [{"status": 503, "count": 1000, "path": "/v1/fine_tuning/jobs", "method": "POST"}]
    created = start_job(client)
    assert created.model_extra["rft_submission"] == "pending"
    # The worker tries once, defers (Bedrock unavailable) and drops the message: only the reconciler is left.
    deadline = time.monotonic() + 30
    while True:
        job = Job.get(created.organization_id, created.id, consistent_read=True)
        if job.submit_state == "pending" and (job.submit_attempts or 0) >= 1:
            break
        assert time.monotonic() < deadline, job.submit_state
        time.sleep(0.1)
    bedrock.faults = []
    from chalicelib.training import lifecycle
    lifecycle.reconcile()
    job = Job.get(created.organization_id, created.id)
    assert job.submit_state == "submitted" and job.bedrock_job_id in bedrock.jobs


def test_stalled_job_is_flagged_once(api, client, bedrock, monkeypatch):
    bedrock.clock.update({"validating_seconds": 3600})
    created = wait_submitted(client, start_job(client).id)
    job = Job.get(created.organization_id, created.id)
    from chalicelib.training import lifecycle
    lifecycle.reconcile()                                               # copies the events there are
    job.update(actions=[Job.last_progress_at.set(ids.now() - 7200)])   # then two hours without progress
    first, second = lifecycle.reconcile(), lifecycle.reconcile()
    job.refresh()
    assert job.stalled_at and first.stalled >= 1 and second.stalled == 0
    assert any("stalled" in e.message for e in client.fine_tuning.jobs.list_events(job.job_id).data)


def test_outbound_events_reach_the_bus(client, bedrock, api):
    job, bid = real_job(client, bedrock)
    deliver(api, event_for(api, bid, "Completed"))
    sqs = boto3.client("sqs", region_name="us-west-2")
    url = sqs.get_queue_url(QueueName=f"{outbox.bus_name()}-outbound-tap")["QueueUrl"]
    seen = []
    # The tap gets every event of the session (each audit entry too, issue #29): read until this job's
    # two are there, however many come first (bounded by time, not by a count of messages).
    end = time.monotonic() + 60
    while time.monotonic() < end:
        for msg in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
            body = json.loads(msg["Body"])
            seen.append((body["detail-type"], body["detail"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=msg["ReceiptHandle"])
        mine = {(t, d.get("status")) for t, d in seen
                if d.get("job", {}).get("job_id") == job.job_id or d.get("job_id") == job.job_id}
        if {("rft-hub.job.state_changed", "succeeded"), ("rft-hub.model.registered", None)} <= mine:
            break
    types = {t for t, d in seen if d.get("job", {}).get("job_id") == job.job_id or d.get("job_id") == job.job_id}
    assert {"rft-hub.job.state_changed", "rft-hub.model.registered"} <= types
    changed = [d for t, d in seen if t == "rft-hub.job.state_changed" and d["job"]["job_id"] == job.job_id]
    final = next(d for d in changed if d["status"] == "succeeded")     # earlier changes may be there too
    assert final["schema_version"] == "1" and final["event_id"] and final["status_seq"] >= 2


def test_aliases_promote_roll_back_and_audit(api, client, bedrock, stack):
    first, bid1 = real_job(client, bedrock, suffix="support-bot")
    second, bid2 = real_job(client, bedrock, suffix="support-bot")
    for bid in (bid1, bid2):
        deliver(api, event_for(api, bid, "Completed"))
    first.refresh()
    second.refresh()
    assert Alias.get(first.team_id, "support-bot").model_id == first.fine_tuned_model  # not moved by job 2
    headers = {"Authorization": f"Bearer {client.api_key}", "Content-Type": "application/json"}
    r = api.http.post("/v1/models/aliases", headers=headers,
                      body=json.dumps({"alias": "support-bot", "model": second.fine_tuned_model}))
    assert r.status_code == 200 and r.json_body["rft_version"] == 2
    r = api.http.post("/v1/models/aliases", headers=headers,
                      body=json.dumps({"alias": "support-bot", "model": first.fine_tuned_model}))
    assert r.json_body["rft_version"] == 3
    history = api.http.get("/v1/models/aliases/support-bot/history", headers=headers).json_body["data"]
    assert [h["model"] for h in history] == [first.fine_tuned_model, second.fine_tuned_model,
                                             first.fine_tuned_model]
    assert history[-1]["changed_by"].startswith("job:") and history[0]["changed_by"].startswith("key:")

    models = {m.id: m for m in client.models.list().data}
    assert {"support-bot", first.fine_tuned_model, second.fine_tuned_model, "openai.gpt-oss-20b"} <= set(models)
    assert client.models.retrieve("support-bot@2").model_extra["rft_target"] == second.fine_tuned_model

    r = api.http.post("/v1/models/aliases", headers=headers,
                      body=json.dumps({"alias": "support-bot", "model": "someone-elses-model"}))
    assert r.status_code == 404
    r = api.http.post("/v1/models/aliases", headers=headers,
                      body=json.dumps({"alias": "Bad Alias!", "model": first.fine_tuned_model}))
    assert r.status_code == 400 and r.json_body["error"]["param"] == "alias"


def test_local_event_pump_delivers_eventbridge_events_to_the_handler(stack):
    """make run's pump: the handler's own pattern as a rule on moto's default bus -> SQS -> handler."""
    from app import app
    from local.event_pump import Pump

    pump = Pump(app, schedule_seconds=3600)
    pump.start()
    try:
        job = record()
        events = boto3.client("events", region_name="us-west-2")
        detail = {"jobName": job.bedrock_job_id, "jobStatus": "InProgress"}
        pump.faults["duplicate_next"] = 1
        events.put_events(Entries=[
            {"Source": "aws.bedrock", "DetailType": DETAIL_TYPE, "Detail": json.dumps(detail)},
            {"Source": "aws.bedrock", "DetailType": "Batch Inference Job State Change", "Detail": "{}"},
        ])
        deadline = time.monotonic() + 10
        while len(pump.delivered) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [e["detail-type"] for e in pump.delivered] == [DETAIL_TYPE, DETAIL_TYPE]   # duplicated, filtered
        job.refresh()
        assert job.status == "running" and not pump.errors
    finally:
        pump.stop()


def test_mantle_jobs_emit_no_events_unless_the_local_bedrock_is_told_to(api, client, bedrock, stack):
    """AWS documents no state-change event for OpenAI-compatible jobs, so the local Bedrock publishes
    none by default (tests/stack/training/test_nova.py: such a job converges through the reconciler alone). With
    /_local/config {"mantle_events": true} it publishes them, and they drive the job (the event path)."""
    from helpers import http

    from app import app
    from local.event_pump import Pump

    config = f"http://127.0.0.1:{stack.bedrock.port}/_local/config"
    assert http("POST", config, body={"mantle_events": True})[0] == 200
    pump = Pump(app, schedule_seconds=3600, only={"on_bedrock_job_event"})
    pump.start()
    try:
        created = start_job(client)
        deadline = time.monotonic() + 30
        while True:           # the job record itself: a retrieve would poll Bedrock first
            job = Job.get(created.organization_id, created.id, consistent_read=True)
            if job.status == "succeeded" and job.active_shard is None:
                break
            assert time.monotonic() < deadline, job.status
            time.sleep(0.1)
        assert [p for p in bedrock.published if job.bedrock_job_id in p["Detail"]]
        finished = [e for e in client.fine_tuning.jobs.list_events(job.job_id, limit=100).data
                    if e.message.endswith("-> succeeded.")]
        assert finished[0].model_extra["rft_source"] == "event"
    finally:
        pump.stop()
        http("POST", config, body={"mantle_events": False})


def test_a_busy_dynamodb_while_giving_the_suffix_alias_never_loses_it(api, client, bedrock, ddb_faults):
    """The suffix alias is a reaction to JobSucceeded (evaluation/promotion.give_suffix_alias): a
    throttled alias write fails the finalize, which the reconciler repeats until the alias exists.
    Before, any cancelled transaction was read as "the alias exists" and the step was lost for good."""
    job, bid = real_job(client, bedrock, suffix="kept-alias")
    ddb_faults.configure(rules=[{"operation": "TransactWriteItems", "table": "aliases", "next": 1,
                                 "error": "ThrottlingException"}])
    deliver(api, event_for(api, bid, "InProgress"))
    deliver(api, event_for(api, bid, "Completed"))
    job.refresh()
    assert ddb_faults.counters()["faults"], "the alias write was not throttled"
    assert job.status == "succeeded" and job.active_shard is not None     # finalize is not done: repeated
    assert TunedModel.get(job.team_id, job.fine_tuned_model).job_id == job.job_id
    with pytest.raises(Alias.DoesNotExist):
        Alias.get(job.team_id, "kept-alias")
    report = api.lambda_.invoke("reconcile_jobs", api.events.generate_cw_event(
        source="aws.events", detail_type="Scheduled Event", detail={}, resources=[])).payload
    assert report["errors"] == 0, report["problems"]
    job.refresh()
    assert job.active_shard is None
    assert Alias.get(job.team_id, "kept-alias").model_id == job.fine_tuned_model
