"""Pipelines (issue #27) on the local stack: the repository's state machine definition executed by moto's
Step Functions interpreter, every step a message with a task token to the pipeline worker (driven by
the event pump), Slack approval through the sink's signed clicks.

The local Bedrock's tuned models answer with their name in the text (":ft:"), so an eval whose criterion
looks for ":ft:" passes a tuned model and fails a base model; one that looks for text no model writes
fails every model.
"""
import json
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from helpers import drain_notifications, http, register_graders, rft
from sample_data import arithmetic_rows, jsonl

from chalicelib.config import pipeline_schedule_group
from chalicelib.pipelines import repair
from chalicelib.spend import budgets
from local import scheduler, servers
from local.harness import ADMIN_KEY, SLACK_SIGNING_SECRET
from local.slack_sink import signed_request

APPROVER, STRANGER = "U0APPROVER1", "U0STRANGER1"
SHORT = {"max_completion_tokens": 16}
TUNED = {"type": "string_check", "name": "tuned", "input": "{{sample.output_text}}", "reference": ":ft:",
         "operation": "like"}
NEVER = {"type": "string_check", "name": "never", "input": "{{sample.output_text}}", "reference": "no model says this",
         "operation": "like"}
ITEM_SCHEMA = {"type": "object", "required": ["messages", "reference_answer"],
               "properties": {"messages": {"type": "array"}, "reference_answer": {"type": "string"},
                              "id": {"type": "string"}}}


@pytest.fixture
def team(stack, make_team, bedrock, api, admin_headers):
    team_id, key = make_team("pipelines")
    hook = f"T{team_id[-6:].upper()}/BPIPE/{team_id}"
    r = api.http.put(f"/v1/admin/teams/{team_id}/slack", headers=admin_headers, body=json.dumps(
        {"webhook_url": f"http://127.0.0.1:{stack.slack.port}/services/{hook}", "notify": ["pipeline"]}))
    assert r.status_code == 200, r.json_body
    import openai
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    register_graders(client)
    return {"id": team_id, "key": key, "client": client, "hook": hook, "base": stack.base_url}


def _call(team, method, path, body=None, headers=None):
    return http(method, f"{team['base']}{path}", team["key"], body)


def _spec(team, *, criterion=TUNED, approval=None, name="weekly", alias=None, dataset=None, triggers=None):
    client = team["client"]
    data = client.files.create(file=("eval.jsonl", jsonl(arithmetic_rows(20, seed=5))), purpose="fine-tune")
    ev = client.evals.create(name="pipeline-eval", data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
                             testing_criteria=[criterion])
    return {"name": name, "dataset": dataset or {"prefix": True},
            "job": {"model": "openai.gpt-oss-20b", "method": rft()},
            "eval": {"eval_id": ev.id, "criteria": {criterion["name"]: 1.0}, "no_worse_than_current": True,
                     "data_source": {"source": {"type": "file_id", "id": data.id},
                                     "input_messages": {"type": "item_reference", "item_reference": "item.messages"},
                                     "sampling_params": SHORT}},
            "target_alias": alias or f"calc-{int(time.time() * 1000) % 10**8}",
            "approval": approval or {"mode": "slack", "approvers": [APPROVER], "timeout_seconds": 600},
            "triggers": triggers or {"schedule": "rate(7 days)", "new_data": False, "on_busy": "drop"}}


def _create(team, spec):
    status, body = _call(team, "POST", "/v1/pipelines", spec)
    assert status == 201, body
    return body


def _upload(team, pipeline_id, rows=100, seed=7):
    status, up = _call(team, "POST", f"/v1/pipelines/{pipeline_id}/uploads", {"filename": "week.jsonl"})
    assert status == 201, up
    # (urllib's default content type is a form's, which moto's S3 reads as an empty body.)
    req = urllib.request.Request(up["url"], data=jsonl(arithmetic_rows(rows, seed=seed)), method="PUT",
                                 headers={"Content-Type": "application/jsonl"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
    return up["key"]


def _run(team, pipeline_id, run_id):
    status, body = _call(team, "GET", f"/v1/pipelines/{pipeline_id}/runs/{run_id}")
    assert status == 200, body
    return body


def _until(team, pipeline_id, run_id, statuses, timeout=120, waiting_on=None):
    """Waits for the run's status (reading its job drives the job on the test stack, as the reconciler
    would; the Slack queue is drained into the sink, as the notifier would)."""
    deadline = time.monotonic() + timeout
    while True:
        run = _run(team, pipeline_id, run_id)
        if run["status"] in statuses and (waiting_on is None or run["waiting_on"] == waiting_on):
            return run
        assert time.monotonic() < deadline, f"run stuck: {json.dumps(run)[:1500]}"
        if run["job_id"]:
            team["client"].fine_tuning.jobs.retrieve(run["job_id"])
        time.sleep(0.3)


def _messages(stack, team):
    with stack.slack_app.config["sink"]["lock"]:
        return [(i, m) for i, m in enumerate(stack.slack_app.config["sink"]["messages"])
                if m["path"].endswith(team["hook"]) or m["path"].startswith("/actions/")]


def _approval_message(stack, team, api, run_id):
    deadline = time.monotonic() + 30
    while True:
        drain_notifications(api)
        found = [(i, m) for i, m in _messages(stack, team) if run_id in json.dumps(m["payload"])
                 and "pipeline_approve" in json.dumps(m["payload"])]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, "no approval message in the sink"
        time.sleep(0.3)


def _click(stack, index, action, user):
    return http("POST", f"http://127.0.0.1:{stack.slack.port}/_local/slack/click",
                body={"message": index, "action": action, "user": user})


def _interact(stack, value, action_id, user, index):
    """A signed interactivity request, as Slack sends it (here: one the sink's buttons no longer offer)."""
    payload = {"type": "block_actions", "user": {"id": user}, "response_url":
               f"http://127.0.0.1:{stack.slack.port}/actions/{index}",
               "actions": [{"type": "button", "action_id": action_id, "value": value}]}
    form = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
    req = urllib.request.Request(f"{stack.base_url}/slack/interactions", data=form, method="POST",
                                 headers=signed_request(SLACK_SIGNING_SECRET, form))
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status


def _alias(team, alias):
    return _call(team, "GET", f"/v1/models/aliases/{alias}/history")


def test_a_scheduled_run_trains_evaluates_waits_for_a_listed_approver_and_moves_the_alias(stack, team, api):
    spec = _spec(team)
    pipeline = _create(team, spec)
    assert pipeline["version"] == 1 and pipeline["dataset_prefix"].endswith(f"/incoming/{team['id']}/{pipeline['id']}/")
    _upload(team, pipeline["id"])
    fired = scheduler.fire(pipeline["id"], pipeline_schedule_group())          # as EventBridge Scheduler would
    run_id = _wait_for_run(team, pipeline["id"])
    run = _until(team, pipeline["id"], run_id, {"awaiting_approval"}, timeout=180)
    assert run["trigger"]["kind"] == "schedule" and run["trigger"]["at"] == fired["scheduled_time"]
    assert [s["name"] for s in run["steps"]][:5] == ["check_data", "preflight", "train", "evaluate", "gate"]
    assert all(s["status"] == "succeeded" and s["ended_at"] >= s["started_at"] for s in run["steps"][:5])
    assert run["comparison"]["tuned"]["score"] == 1.0 and run["candidate_model"].startswith("openai.gpt-oss-20b:ft:")

    # A second trigger during the run starts nothing: it is recorded as dropped.
    scheduler.fire(pipeline["id"], pipeline_schedule_group(), at=datetime.now(UTC) + timedelta(days=7))
    deadline = time.monotonic() + 30
    while len(listed := _call(team, "GET", f"/v1/pipelines/{pipeline['id']}/runs")[1]["data"]) < 2:
        assert time.monotonic() < deadline, listed
        time.sleep(0.2)
    assert [r["status"] for r in listed] == ["dropped", "awaiting_approval"], listed
    assert "a run was in progress" in listed[0]["error"]["message"]

    index, message = _approval_message(stack, team, api, run_id)
    # Someone not listed: refused (ephemeral), the run still waits.
    status, answer = _click(stack, index, "approve", STRANGER)
    assert status == 200 and answer["status"] == 200, answer
    assert _run(team, pipeline["id"], run_id)["status"] == "awaiting_approval"
    refusal = [m for _, m in _messages(stack, team) if m["path"] == f"/actions/{index}"]
    assert refusal and "listed approvers" in json.dumps(refusal[-1]["payload"])
    assert refusal[-1]["payload"]["replace_original"] is False
    # A stale request (signed, but outside the 5-minute window) and a bad signature: 401, nothing decided.
    form = urllib.parse.urlencode({"payload": json.dumps({"type": "block_actions", "user": {"id": APPROVER},
                                                          "actions": [message["payload"]["blocks"][-1]["elements"][0]]})}).encode()
    for headers in (signed_request(SLACK_SIGNING_SECRET, form, int(time.time()) - 600),
                    signed_request("not-the-secret", form)):
        req = urllib.request.Request(f"{stack.base_url}/slack/interactions", data=form, headers=headers, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        assert refused.value.code == 401
    assert _run(team, pipeline["id"], run_id)["approval"] is None

    status, answer = _click(stack, index, "approve", APPROVER)
    assert status == 200 and answer["status"] == 200, answer
    run = _until(team, pipeline["id"], run_id, {"succeeded", "failed"})
    assert run["status"] == "succeeded", run
    assert run["approval"]["by"] == APPROVER and run["approval"]["decision"] == "approve"
    assert [s["name"] for s in run["steps"]] == ["check_data", "preflight", "train", "evaluate", "gate", "approval",
                                                 "promote"]
    # The message now says who decided; a replayed click decides nothing new.
    with stack.slack_app.config["sink"]["lock"]:
        replaced = stack.slack_app.config["sink"]["messages"][index]["payload"]
    assert "approved by <@U0APPROVER1>" in replaced["text"] and "blocks" in replaced
    assert "pipeline_approve" not in json.dumps(replaced)
    status, history = _alias(team, spec["target_alias"])
    assert status == 200 and history["data"][0]["changed_by"] == f"pipeline:{pipeline['id']}/run:{run_id}", history
    assert history["data"][0]["model"] == run["candidate_model"] and run["alias_version"] == 1
    # Nothing held by the run; the pipeline is free; the end was announced in the channel.
    assert run["held_usd"] is None
    status, now = _call(team, "GET", f"/v1/pipelines/{pipeline['id']}")
    assert now["active_run"] is None and now["last_run"] == run_id
    drain_notifications(api)
    assert any("Pipeline run succeeded" in json.dumps(m["payload"]) for _, m in _messages(stack, team))

    # The same data again: the run is skipped, nothing trained.
    status, again = _call(team, "POST", f"/v1/pipelines/{pipeline['id']}/runs")
    assert status == 201, again
    skipped = _until(team, pipeline["id"], again["id"], {"skipped_unchanged", "failed", "succeeded"})
    assert skipped["status"] == "skipped_unchanged" and skipped["job_id"] is None, skipped


def _wait_for_run(team, pipeline_id, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        status, listed = _call(team, "GET", f"/v1/pipelines/{pipeline_id}/runs")
        if listed["data"]:
            return listed["data"][0]["id"]
        assert time.monotonic() < deadline, "the trigger started no run"
        time.sleep(0.2)


def test_a_failing_gate_stops_before_approval_and_says_why(stack, team, api):
    spec = _spec(team, criterion=NEVER)
    pipeline = _create(team, spec)
    _upload(team, pipeline["id"])
    status, run = _call(team, "POST", f"/v1/pipelines/{pipeline['id']}/runs")
    assert status == 201 and run["status"] == "running", run
    run = _until(team, pipeline["id"], run["id"], {"gate_failed", "failed", "succeeded", "awaiting_approval"},
                 timeout=180)
    assert run["status"] == "gate_failed", run
    assert run["error"]["step"] == "gate" and "criterion 'never' scored 0.0000" in run["error"]["message"]
    assert "approval" not in [s["name"] for s in run["steps"]] and run["held_usd"] is None
    assert _alias(team, spec["target_alias"])[0] == 404
    drain_notifications(api)
    assert not any(run["id"] in json.dumps(m["payload"]) and "pipeline_approve" in json.dumps(m["payload"])
                   for _, m in _messages(stack, team))


def test_a_reject_and_a_timeout_leave_the_alias_unmoved(stack, team, api):
    spec = _spec(team, approval={"mode": "slack", "approvers": [APPROVER], "timeout_seconds": 600})
    pipeline = _create(team, spec)
    _upload(team, pipeline["id"])
    run = _call(team, "POST", f"/v1/pipelines/{pipeline['id']}/runs")[1]
    _until(team, pipeline["id"], run["id"], {"awaiting_approval"}, timeout=180)
    index, _ = _approval_message(stack, team, api, run["id"])
    assert _click(stack, index, "reject", APPROVER)[1]["status"] == 200
    rejected = _until(team, pipeline["id"], run["id"], {"rejected", "failed", "succeeded"})
    assert rejected["status"] == "rejected" and "rejected by U0APPROVER1" in rejected["error"]["message"], rejected
    assert _alias(team, spec["target_alias"])[0] == 404
    # The buttons are gone; a request replayed with the other decision (freshly signed) changes nothing.
    assert _click(stack, index, "approve", APPROVER)[0] == 404
    value = f"{team['id']}/{pipeline['id']}/{run['id']}"
    assert _interact(stack, value, "pipeline_approve", APPROVER, index) == 200
    answers = [m for _, m in _messages(stack, team) if m["path"] == f"/actions/{index}"]
    assert "already rejected" in json.dumps(answers[-1]["payload"]), answers[-1]
    assert _run(team, pipeline["id"], run["id"])["status"] == "rejected"

    # A timeout: nobody decides within the pipeline's timeout (10 s, the least a pipeline may set).
    status, changed = _call(team, "PATCH", f"/v1/pipelines/{pipeline['id']}",
                            {"approval": {"mode": "slack", "approvers": [APPROVER], "timeout_seconds": 10}})
    assert status == 200 and changed["version"] == 2, changed
    _upload(team, pipeline["id"], seed=8)                     # new data: not skipped
    run = _call(team, "POST", f"/v1/pipelines/{pipeline['id']}/runs")[1]
    assert run["pipeline_version"] == 2
    timed_out = _until(team, pipeline["id"], run["id"], {"rejected", "failed", "succeeded"}, timeout=240)
    assert timed_out["status"] == "rejected" and "in time" in timed_out["error"]["message"], timed_out
    assert _alias(team, spec["target_alias"])[0] == 404


def test_a_run_whose_execution_dies_midway_holds_no_money_and_moves_no_alias(stack, team, api, bedrock):
    """The execution is stopped while the run waits on its job. (moto's interpreter notices a stop when the
    waiting task next wakes, here when the job ends; Step Functions ends it at once.) The reconciler finds
    the execution over without the run's end and ends the run: nothing held, the alias unmoved."""
    bedrock.clock.update({"step_seconds": 0.5, "total_steps": 8})
    spec = _spec(team)
    pipeline = _create(team, spec)
    _upload(team, pipeline["id"])
    status, limited = http("PUT", f"{team['base']}/v1/admin/teams/{team['id']}/budget", ADMIN_KEY,
                           {"limit_usd": "1000.00", "period": "monthly"})
    assert status == 200, limited
    run = _call(team, "POST", f"/v1/pipelines/{pipeline['id']}/runs")[1]
    run = _until(team, pipeline["id"], run["id"], {"running"}, waiting_on="train", timeout=120)
    sfn = boto3.client("stepfunctions", region_name=servers.REGION)
    sfn.stop_execution(executionArn=run["execution_arn"], error="test.Killed", cause="the execution died")
    deadline = time.monotonic() + 90
    while (now := _run(team, pipeline["id"], run["id"]))["status"] == "running":
        team["client"].fine_tuning.jobs.retrieve(run["job_id"])           # the job goes on, and ends
        report = repair.reconcile()
        assert time.monotonic() < deadline, (report, now)
        time.sleep(0.5)
    assert now["status"] == "failed" and "ABORTED" in now["error"]["message"], now
    assert now["error"]["step"] in ("train", "evaluate"), now
    assert sfn.describe_execution(executionArn=run["execution_arn"])["status"] == "ABORTED"
    assert budgets.view(team["id"])["reserved_usd"] in ("0", "0.000000", "0.00"), budgets.view(team["id"])
    assert _alias(team, spec["target_alias"])[0] == 404
    assert _call(team, "GET", f"/v1/pipelines/{pipeline['id']}")[1]["active_run"] is None


def _runs(team, pipeline_id, count, timeout=30):
    deadline = time.monotonic() + timeout
    while len(found := _call(team, "GET", f"/v1/pipelines/{pipeline_id}/runs")[1]["data"]) < count:
        assert time.monotonic() < deadline, found
        time.sleep(0.2)
    return found


def test_new_data_and_trigger_events_start_runs_and_a_failed_step_names_itself(stack, team, api):
    """An upload under the prefix starts a run (S3's EventBridge notification, through the rule the
    template declares); a bad line fails the data step, naming the line; a trigger event on rft-hub's bus
    starts one too; with on_busy "queue" a trigger during a run waits for it, then runs."""
    spec = _spec(team, triggers={"new_data": True, "on_busy": "queue"}, approval={"mode": "auto"})
    pipeline = _create(team, spec)
    status, up = _call(team, "POST", f"/v1/pipelines/{pipeline['id']}/uploads", {"filename": "bad.jsonl"})
    req = urllib.request.Request(up["url"], data=b'{"messages": "not a list"}\n', method="PUT",
                                 headers={"Content-Type": "application/jsonl"})
    urllib.request.urlopen(req, timeout=30).read()
    first = _runs(team, pipeline["id"], 1)[0]
    assert first["trigger"]["kind"] == "new_data" and first["trigger"]["detail"]["key"] == up["key"]
    failed = _until(team, pipeline["id"], first["id"], {"failed", "succeeded"})
    assert failed["error"]["step"] == "check_data" and "line 1" in failed["error"]["message"], failed
    assert failed["steps"][0]["status"] == "failed" and failed["held_usd"] is None

    # Good data; an internal app's trigger event during that run is queued, then runs (and is skipped: same data).
    _upload(team, pipeline["id"])
    second = next(r for r in _runs(team, pipeline["id"], 2) if r["id"] != first["id"])
    events = boto3.client("events", region_name=servers.REGION)
    from chalicelib.outbox import bus_name
    events.put_events(Entries=[{"Source": "internal.app", "DetailType": "rft-hub.pipeline.trigger", "EventBusName": bus_name(),
                                "Detail": json.dumps({"team_id": team["id"], "pipeline_id": pipeline["id"]})}])
    # (runs sort by their trigger's time, which EventBridge gives to the second)
    queued = next(r for r in _runs(team, pipeline["id"], 3) if r["trigger"]["kind"] == "event")
    assert queued["trigger"]["kind"] == "event" and queued["status"] in ("queued", "running"), queued
    done = _until(team, pipeline["id"], second["id"], {"succeeded", "failed", "gate_failed"}, timeout=180)
    assert done["status"] == "succeeded" and done["approval"] is None, done           # approval: auto
    after = _until(team, pipeline["id"], queued["id"], {"skipped_unchanged", "failed", "succeeded"})
    assert after["status"] == "skipped_unchanged", after


def test_the_api_names_each_bad_field_and_keeps_teams_apart(stack, team, make_team, api, admin_headers):
    spec = _spec(team)
    cases = [({**spec, "name": "Bad Name"}, "name"), ({**spec, "dataset": {}}, "dataset"),
             ({**spec, "dataset": {"file_id": "file-nope"}}, "dataset.file_id"),
             ({**spec, "job": {"model": "openai.gpt-oss-20b"}}, "job.method"),
             ({**spec, "job": {**spec["job"], "model": "nope"}}, "job.model"),
             ({**spec, "job": {**spec["job"], "suffix": spec["target_alias"]}}, "job.suffix"),
             ({**spec, "eval": {**spec["eval"], "eval_id": "eval_nope"}}, "eval.eval_id"),
             ({**spec, "eval": {**spec["eval"], "criteria": {"nope": 1}}}, "eval.criteria.nope"),
             ({**spec, "approval": {"mode": "slack"}}, "approval.approvers"),
             ({**spec, "triggers": {"schedule": "rate(1 minute)"}}, "triggers.schedule"),
             ({**spec, "extra": 1}, "body.extra")]
    for body, param in cases:
        status, answer = _call(team, "POST", "/v1/pipelines", body)
        assert status == 400 and answer["error"]["param"] == param, (param, answer)
    pipeline = _create(team, spec)
    status, changed = _call(team, "PATCH", f"/v1/pipelines/{pipeline['id']}", {"name": "renamed"})
    assert status == 400 and changed["error"]["param"] == "name"
    status, changed = _call(team, "PATCH", f"/v1/pipelines/{pipeline['id']}", {"triggers": {"schedule": None}})
    assert status == 200 and changed["version"] == 2 and changed["triggers"]["schedule"] is None
    scheduler_client = boto3.client("scheduler", region_name=servers.REGION)
    with pytest.raises(scheduler_client.exceptions.ResourceNotFoundException):   # the schedule went with it
        scheduler_client.get_schedule(Name=pipeline["id"], GroupName=pipeline_schedule_group())
    assert _call(team, "GET", f"/v1/pipelines/{pipeline['id']}?version=1")[1]["triggers"]["schedule"] == "rate(7 days)"
    versions = _call(team, "GET", f"/v1/pipelines/{pipeline['id']}/versions")[1]["data"]
    assert [v["version"] for v in versions] == [2, 1]
    # Another team sees nothing of it.
    _, other = make_team("other")
    for method, path in (("GET", f"/v1/pipelines/{pipeline['id']}"), ("POST", f"/v1/pipelines/{pipeline['id']}/runs"),
                         ("DELETE", f"/v1/pipelines/{pipeline['id']}"), ("GET", f"/v1/pipelines/{pipeline['id']}/runs")):
        status, answer = http(method, f"{team['base']}{path}", other)
        assert status == 404 and answer["error"]["param"] == "pipeline_id", (path, answer)
    # Deciding through the API: only a key whose owner is a listed approver; a fixed-file pipeline takes no upload.
    status, answer = _call(team, "POST", f"/v1/pipelines/{pipeline['id']}/runs/prun-x/approve")
    assert status == 403 and answer["error"]["code"] == "not_an_approver"
    fixed = _create(team, {**_spec(team, name="fixed"), "dataset": {"file_id": spec["eval"]["data_source"]["source"]["id"]}})
    status, answer = _call(team, "POST", f"/v1/pipelines/{fixed['id']}/uploads", {})
    assert status == 400 and answer["error"]["param"] == "dataset"
    status, deleted = _call(team, "DELETE", f"/v1/pipelines/{pipeline['id']}")
    assert status == 200 and deleted["deleted"] is True
    assert _call(team, "GET", f"/v1/pipelines/{pipeline['id']}")[0] == 404


def test_slash_pipeline_run_and_status(stack, team, api):
    from chalicelib.domain import ids
    pipeline = _create(team, _spec(team, name="slashed", approval={"mode": "auto"}))
    r = api.http.put(f"/v1/admin/teams/{team['id']}/slack", headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                                                    "Content-Type": "application/json"},
                     body=json.dumps({"slack_team_id": "TPIPE1", "channel_ids": ["CPIPE1"]}))
    assert r.status_code == 200, r.json_body

    def ask(text):
        form = urllib.parse.urlencode({"team_id": "TPIPE1", "channel_id": "CPIPE1", "user_id": "U0ASKER1",
                                       "command": "/rft", "text": text}).encode()
        return api.http.post("/slack/commands", headers=signed_request(SLACK_SIGNING_SECRET, form), body=form).json_body

    started = ask("pipeline run slashed")
    assert "run `prun-" in started["text"], started
    status = ask("pipeline status slashed")
    assert "newest runs" in status["text"] and "prun-" in json.dumps(status), status
    assert "No pipeline" in ask(f"pipeline status nope-{ids.now()}")["text"]
    runs = _runs(team, pipeline["id"], 1)
    assert runs[0]["trigger"] == {**runs[0]["trigger"], "kind": "manual", "by": "slack:U0ASKER1"}


def test_a_run_holds_its_estimate_and_one_the_budget_cannot_pay_stops_before_training(stack, team, api):
    pipeline = _create(team, _spec(team, approval={"mode": "auto"}))
    status, limited = http("PUT", f"{team['base']}/v1/admin/teams/{team['id']}/budget", ADMIN_KEY,
                           {"limit_usd": "0.000001", "period": "monthly"})
    assert status == 200, limited
    _upload(team, pipeline["id"])
    run = _call(team, "POST", f"/v1/pipelines/{pipeline['id']}/runs")[1]
    ended = _until(team, pipeline["id"], run["id"], {"failed", "succeeded", "gate_failed"})
    assert ended["status"] == "failed" and ended["error"]["step"] == "check_data", ended
    assert "budget" in ended["error"]["message"].lower() and ended["job_id"] is None, ended
    assert budgets.view(team["id"])["reserved_usd"] in ("0", "0.000000", "0.00")
