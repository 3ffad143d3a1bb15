"""Slack: configuration, Block Kit messages, reliable delivery, and verified slash commands."""
import json
import time
import urllib.parse

import boto3
import pytest
from helpers import drain_notifications, http, start_job, wait_for
from slack_sdk.signature import SignatureVerifier

from chalicelib import outbox
from chalicelib.domain import slack_messages as messages
from chalicelib.slack import notifications as slack
from chalicelib.store.models import SlackConfig
from local.harness import SLACK_SIGNING_SECRET


@pytest.fixture
def sink(stack):
    state = stack.slack_app.config["sink"]
    with state["lock"]:
        state["faults"].clear()
    return state


def sent_to(sink, hook):
    with sink["lock"]:
        return [m["payload"] for m in sink["messages"] if m["path"].endswith(hook)]


def configure(api, admin_headers, stack, team_id, hook, **extra):
    body = {"webhook_url": f"http://127.0.0.1:{stack.slack.port}/services/{hook}", "slack_team_id": "TTEST1",
            "channel_ids": [f"C{team_id[-8:].upper()}"], "notify": ["job", "budget", "model"], **extra}
    r = api.http.put(f"/v1/admin/teams/{team_id}/slack", headers=admin_headers, body=json.dumps(body))
    assert r.status_code == 200, r.json_body
    return r.json_body


def test_webhook_is_write_only_and_validated(api, admin_headers, make_team, stack):
    team_id, _ = make_team("slack-config")
    view = configure(api, admin_headers, stack, team_id, "T1/B1/secret-path")
    assert view["webhook"] == {"set": True, "health": {"status": "unknown", "error": None,
                                                       "at": view["webhook"]["health"]["at"]}}
    assert "secret-path" not in json.dumps(view)
    got = api.http.get(f"/v1/admin/teams/{team_id}/slack", headers=admin_headers).json_body
    assert "secret-path" not in json.dumps(got) and got["notify"] == ["job", "budget", "model"]
    stored = SlackConfig.get(team_id)
    name, _, version = stored.webhook_secret_id.partition("#")    # "<secret>#<version>": rotation-safe caching
    secret = boto3.client("secretsmanager", region_name="us-west-2").get_secret_value(SecretId=name, VersionId=version)
    assert version and secret["SecretString"].endswith("secret-path")
    for body, param in [({"webhook_url": "https://evil.example.com/x"}, "webhook_url"),
                        ({"notify": ["everything"]}, "notify"), ({"channel": "x"}, "channel"),
                        ({"slack_team_id": "not a team"}, "slack_team_id")]:
        r = api.http.put(f"/v1/admin/teams/{team_id}/slack", headers=admin_headers, body=json.dumps(body))
        assert r.status_code == 400 and r.json_body["error"]["param"] == param


def test_messages_stay_inside_block_kit_limits():
    detail = {"status": "failed", "previous_status": "running", "source": "poll",
              "job": {"job_id": "ftjob-" + "x" * 300, "model": "m" * 3000, "suffix": "s" * 500,
                      "error": {"message": "boom " * 2000}, "bedrock_job_id": "b" * 4000}}
    msg = messages.job_message(detail, [0.1, 0.5, 0.9] * 40, ["validating_files", "running", "failed"], "$1" * 2000)
    header = msg["blocks"][0]["text"]["text"]
    assert len(header) <= 150 and header.startswith(":x:")
    for block in msg["blocks"]:
        for field in block.get("fields", []):
            assert len(field["text"]) <= 2000
        if "text" in block and block["type"] == "section":
            assert len(block["text"]["text"]) <= 3000
    assert len(msg["text"]) <= 3000 and any("Failure" in json.dumps(b) and "boom" in json.dumps(b) for b in msg["blocks"])
    assert messages.sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert messages.budget_message({"threshold": 0.8, "spent_usd": "8", "limit_usd": "10", "period": "2026-11",
                                    "resets_at": 1798761600})["blocks"][0]["text"]["text"] == ":moneybag: Budget 80% reached"


def _event(team_id, detail_type="rft-hub.model.registered", **fields):
    staged = outbox.stage(detail_type, team_id, model="m1", job_id="ftjob-1", base_model="b", best_reward=0.9, **fields)
    return json.dumps({"detail-type": detail_type, "source": "rft-hub", "detail": staged.detail})


def test_delivery_dedupes_retries_and_dead_letters(api, admin_headers, make_team, stack, sink):
    team_id, _ = make_team("delivery")
    configure(api, admin_headers, stack, team_id, f"T/B/{team_id}")
    body = _event(team_id)
    assert slack.deliver(body) == "sent"
    assert slack.deliver(body) == "duplicate"                    # a duplicated event never posts twice
    assert len(sent_to(sink, team_id)) == 1

    drain_notifications(api)                                    # an empty queue, to find our message
    sqs = boto3.client("sqs", region_name="us-west-2")
    url = sqs.get_queue_url(QueueName=slack.notify_queue())["QueueUrl"]
    throttled = _event(team_id)
    sqs.send_message(QueueUrl=url, MessageBody=throttled)
    msg = next(m for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
               if m["Body"] == throttled)
    sink["faults"][:] = [{"status": 429, "count": 1, "retry_after": 30, "body": "rate_limited"}]
    with pytest.raises(slack.RetryLater):
        slack.deliver(throttled, msg["ReceiptHandle"])
    visible = [m["Body"] for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])]
    assert throttled not in visible                               # hidden for Retry-After seconds
    assert slack.deliver(throttled) == "sent" and len(sent_to(sink, team_id)) == 2

    sink["faults"][:] = [{"status": 500, "count": 1, "body": "rollup_error"}]
    flaky = _event(team_id)
    with pytest.raises(slack.RetryLater):
        slack.deliver(flaky)
    assert slack.deliver(flaky) == "sent"

    sink["faults"][:] = [{"status": 404, "count": 1, "body": "no_service"}]
    revoked = _event(team_id)
    assert slack.deliver(revoked) == "dead-lettered"
    view = api.http.get(f"/v1/admin/teams/{team_id}/slack", headers=admin_headers).json_body
    assert view["webhook"]["health"]["status"] == "broken" and "no_service" in view["webhook"]["health"]["error"]
    dlq = sqs.get_queue_url(QueueName=slack.dead_letter_queue())["QueueUrl"]
    dead = [m["Body"] for m in sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10).get("Messages", [])]
    assert revoked in dead
    assert slack.deliver(_event(team_id)) == "webhook-broken"    # no more posts until it is fixed
    configure(api, admin_headers, stack, team_id, f"T/B/{team_id}")   # a new URL resets the health
    assert slack.deliver(_event(team_id)) == "sent"


def test_a_job_produces_messages_for_each_state_change_and_a_final_sparkline(api, admin_headers, make_team, stack,
                                                                              bedrock, sink):
    import openai
    team_id, key = make_team("slack-job")
    configure(api, admin_headers, stack, team_id, f"T/B/{team_id}")
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    job = start_job(client, suffix="slacky")
    wait_for(client, job.id, {"succeeded"})
    drain_notifications(api)
    drain_notifications(api)      # a second pass (e.g. redelivery) posts nothing new
    posted = sent_to(sink, team_id)
    texts = [m["text"] for m in posted]
    state_changes = [m for m in posted if m["blocks"][0]["text"]["text"].startswith((":runner:", ":white_check_mark:",
                                                                                     ":inbox_tray:"))]
    path = client.fine_tuning.jobs.retrieve(job.id).model_extra["rft_status_path"]
    assert len(state_changes) == len(path) - 1                   # one message per state change, no duplicates
    final = next(m for m in posted if m["blocks"][0]["text"]["text"].startswith(":white_check_mark:"))
    curve = next(b for b in final["blocks"] if "Reward curve" in b.get("text", {}).get("text", ""))
    assert any(ch in curve["text"]["text"] for ch in messages.SPARK)
    assert any("New tuned model" in t for t in texts) and any("Alias `slacky`" in t for t in texts)


def test_budget_crossings_post_once_per_threshold(api, admin_headers, make_team, stack, sink):
    import openai
    team_id, key = make_team("slack-budget")
    configure(api, admin_headers, stack, team_id, f"T/B/{team_id}", notify=["budget"])
    api.http.put(f"/v1/admin/teams/{team_id}/budget", headers=admin_headers,
                 body=json.dumps({"limit_usd": "0.00002", "alert_thresholds": [0.5, 0.8]}))
    c = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    for _ in range(30):
        try:
            c.chat.completions.create(model="openai.gpt-oss-20b", max_tokens=1, messages=[{"role": "user", "content": "hi"}])
        except openai.RateLimitError:
            break
    drain_notifications(api)
    posted = [m["blocks"][0]["text"]["text"] for m in sent_to(sink, team_id)]
    assert sorted(posted) == [":moneybag: Budget 50% reached", ":moneybag: Budget 80% reached"]


# ---- delivery rules: unknown outcomes, per-job order, rotation, redirects (issue #19) ----------

def sink_fault(stack, fault):
    """The local Slack sink's controls, over HTTP."""
    status, body = http("POST", f"http://127.0.0.1:{stack.slack.port}/_local/fail", body=fault)
    assert status == 200, body


def _state(team_id, job_id, previous, status, **extra):
    """A job state change as apply_status publishes it (optionally with the producer's status_seq)."""
    staged = outbox.stage("rft-hub.job.state_changed", team_id, previous_status=previous, status=status,
                          source="poll", job={"job_id": job_id, "model": "openai.gpt-oss-20b", "suffix": None,
                                              "bedrock_job_id": None, "fine_tuned_model": None, "error": None,
                                              "estimated_usd": None}, **extra)
    return json.dumps({"detail-type": "rft-hub.job.state_changed", "source": "rft-hub", "detail": staged.detail})


def _headers(sink, hook):
    return [m["blocks"][0]["text"]["text"] for m in sent_to(sink, hook)]


@pytest.mark.parametrize("with_seq", [False, True], ids=["status-order", "status_seq"])
def test_a_timed_out_post_is_never_repeated_and_a_job_posts_in_order(api, admin_headers, make_team, stack, sink,
                                                                     monkeypatch, with_seq):
    team_id, _ = make_team("slack-order")
    configure(api, admin_headers, stack, team_id, f"T/B/{team_id}")
    job_id = f"ftjob-order-{team_id}"
    seq = (lambda n: {"status_seq": n}) if with_seq else (lambda n: {})
    queued = _state(team_id, job_id, "validating_files", "queued", **seq(2))
    running = _state(team_id, job_id, "queued", "running", **seq(3))
    succeeded = _state(team_id, job_id, "running", "succeeded", **seq(4))

    monkeypatch.setenv("RFT_SLACK_TIMEOUT_SECONDS", "0.5")
    sink_fault(stack, {"hang_seconds": 5, "count": 1})   # Slack posts it, then answers too late
    assert slack.deliver(running) == "unknown"
    assert len(sent_to(sink, team_id)) == 1
    assert slack.deliver(running) == "duplicate"          # SQS redelivers it: not posted a second time
    assert slack.deliver(queued) == "superseded"          # older than what the channel already shows
    assert slack.deliver(succeeded) == "sent"
    assert slack.deliver(queued) == "superseded"
    headers = _headers(sink, team_id)
    assert len(headers) == 2 and headers[0].startswith(":runner:") and headers[1].startswith(":white_check_mark:")


def test_an_attempt_that_died_while_sending_is_not_reposted(api, admin_headers, make_team, stack, sink):
    from chalicelib.store.models import SlackDelivery
    team_id, _ = make_team("slack-crash")
    configure(api, admin_headers, stack, team_id, f"T/B/{team_id}")
    body = _event(team_id)
    event_id = json.loads(body)["detail"]["event_id"]
    # What a notifier leaves behind when it dies after claiming the event (its lease has run out).
    SlackDelivery(event_id, status="sending", lease_until=int(time.time()) - 1, attempts=1).save()
    assert slack.deliver(body) == "unknown"
    assert sent_to(sink, team_id) == [] and SlackDelivery.get(event_id).status == "unknown"


def test_a_connection_that_never_opened_is_retried(api, admin_headers, make_team, stack, sink):
    import socket
    team_id, _ = make_team("slack-refused")
    with socket.socket() as s:                            # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    r = api.http.put(f"/v1/admin/teams/{team_id}/slack", headers=admin_headers, body=json.dumps(
        {"webhook_url": f"http://127.0.0.1:{closed}/services/T/B/{team_id}", "notify": ["model"]}))
    assert r.status_code == 200
    body = _event(team_id)
    with pytest.raises(slack.RetryLater):                 # nothing was sent: safe to try again
        slack.deliver(body)
    configure(api, admin_headers, stack, team_id, f"T/B/{team_id}")
    assert slack.deliver(body) == "sent" and len(sent_to(sink, team_id)) == 1


def test_a_rotated_webhook_applies_to_the_next_message(api, admin_headers, make_team, stack, sink):
    team_id, _ = make_team("slack-rotate")
    configure(api, admin_headers, stack, team_id, f"T/B/{team_id}-old")
    assert slack.deliver(_event(team_id)) == "sent"       # the notifier now holds the old URL
    configure(api, admin_headers, stack, team_id, f"T/B/{team_id}-new")
    assert slack.deliver(_event(team_id)) == "sent"
    assert len(sent_to(sink, f"{team_id}-old")) == 1 and len(sent_to(sink, f"{team_id}-new")) == 1


def test_redirects_are_never_followed(api, admin_headers, make_team, stack, sink):
    team_id, _ = make_team("slack-redirect")
    configure(api, admin_headers, stack, team_id, f"T/B/{team_id}")
    elsewhere = f"http://127.0.0.1:{stack.slack.port}/services/T/B/{team_id}-elsewhere"
    sink_fault(stack, {"status": 302, "count": 1, "location": elsewhere, "body": ""})
    assert slack.deliver(_event(team_id)) == "dead-lettered"
    assert sent_to(sink, f"{team_id}-elsewhere") == [] and sent_to(sink, team_id) == []
    health = api.http.get(f"/v1/admin/teams/{team_id}/slack", headers=admin_headers).json_body["webhook"]["health"]
    assert health["status"] == "broken" and "redirect (302) not followed" in health["error"]


# ---- slash commands ---------------------------------------------------------------------------

def signed(form: dict, *, ts: int | None = None, secret: str = SLACK_SIGNING_SECRET, body: str | None = None):
    raw = body if body is not None else urllib.parse.urlencode(form)
    ts = str(ts or int(time.time()))
    sig = SignatureVerifier(secret).generate_signature(timestamp=ts, body=raw)
    return raw, {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig,
                 "Content-Type": "application/x-www-form-urlencoded"}


def slash(api, form, **kw):
    raw, headers = signed(form, **kw)
    return api.http.post("/slack/commands", headers=headers, body=raw)


def test_slash_commands(api, admin_headers, make_team, stack, sink, bedrock):
    import openai
    team_id, key = make_team("slash")
    channel = configure(api, admin_headers, stack, team_id, f"T/B/{team_id}")["channel_ids"][0]
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    bedrock.clock.update({"step_seconds": 30, "total_steps": 50})
    job = start_job(client)
    base = {"team_id": "TTEST1", "channel_id": channel, "user_id": "U1", "command": "/rft",
            "response_url": f"http://127.0.0.1:{stack.slack.port}/commands/T/{team_id}/resp"}

    def ask(text, **kw):
        r = slash(api, {**base, "text": text}, **kw)
        assert r.status_code == 200, r.body
        assert r.json_body["response_type"] == "ephemeral"
        return r.json_body["text"] + "\n" + json.dumps(r.json_body["blocks"])

    assert "/rft jobs" in ask("help") and "/rft jobs" in ask("")
    assert job.id in ask("jobs")
    assert job.id in ask(f"status {job.id}") and "validating" in ask(f"status {job.id}")
    assert "No job" in ask("status ftjob-nope") and "Which job" in ask("status")
    assert "Spent $" in ask("usage")
    assert "No tuned models" in ask("models")
    assert "Unknown command" in ask("launch-rockets <script>")
    other_team, _ = make_team("other-slash")
    other_channel = configure(api, admin_headers, stack, other_team, f"T/B/{other_team}")["channel_ids"][0]
    r = slash(api, {**base, "channel_id": other_channel, "text": f"status {job.id}"})
    assert "No job" in r.json_body["text"]                        # another team's job is invisible
    r = slash(api, {**base, "channel_id": "CUNMAPPED", "text": "jobs"})
    assert r.status_code == 200 and "not linked" in r.json_body["text"]

    assert "Cancelling" in ask(f"cancel {job.id}")
    sqs = boto3.client("sqs", region_name="us-west-2")
    url = sqs.get_queue_url(QueueName=slack.commands_queue())["QueueUrl"]
    for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
        api.lambda_.invoke("slack_commands", api.events.generate_sqs_event(message_bodies=[m["Body"]],
                                                                          queue_name=slack.commands_queue()))
        sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    answers = [m["text"] for m in sent_to(sink, "resp")]
    assert any(job.id in a and "cancelled" in a for a in answers)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"


def test_bad_signatures_stale_timestamps_and_tampered_replays_are_401(api, admin_headers, make_team, stack):
    team_id, _ = make_team("slash-auth")
    channel = configure(api, admin_headers, stack, team_id, f"T/B/{team_id}")["channel_ids"][0]
    form = {"team_id": "TTEST1", "channel_id": channel, "text": "jobs"}
    assert slash(api, form).status_code == 200
    assert slash(api, form, secret="wrong-secret").status_code == 401
    assert slash(api, form, ts=int(time.time()) - 600).status_code == 401
    raw, headers = signed(form)
    tampered = raw.replace("jobs", "cancel")
    r = api.http.post("/slack/commands", headers=headers, body=tampered)
    assert r.status_code == 401 and r.json_body["error"]["message"] == "Request verification failed."
    r = api.http.post("/slack/commands", headers={"Content-Type": "application/x-www-form-urlencoded"}, body=raw)
    assert r.status_code == 401


def test_a_gated_alias_move_shows_its_evidence_in_slack():
    from chalicelib.domain import slack_messages as messages
    detail = {"alias": "support", "model": "ft:b", "version": 3, "previous_model": "ft:a", "changed_by": "key:k1",
              "eval_id": "eval-1", "eval_run_id": "evalrun-9",
              "comparison": {"exact": {"score": 0.91, "min_score": 0.8, "current_score": 0.85, "delta": 0.06}}}
    text = messages.model_message("rft-hub.alias.changed", detail)["text"]
    assert "evalrun-9" in text and "exact: 0.910 (gate ≥ 0.8), current model 0.850" in text
    overridden = messages.model_message("rft-hub.alias.changed", {**detail, "override_reason": "hotfix"})["text"]
    assert "overridden by the admin: hotfix" in overridden


def test_deployment_and_eval_events_reach_slack(api, admin_headers, make_team, stack, sink):
    """A Nova model's deployment (ready, failed, deleted) and eval results are posted like the
    other events: by category (`model`, `eval`), one message each; a deployment still being made
    is not said."""
    team_id, _ = make_team("deploy-evals")
    configure(api, admin_headers, stack, team_id, f"T/D/{team_id}", notify=["model", "eval"])
    arn = "arn:aws:bedrock:us-east-1:123456789012:custom-model-deployment/abc123"
    deployment = dict(deployment_arn=arn, custom_model_arn="arn:aws:bedrock:us-east-1:123456789012:custom-model/x")
    assert slack.deliver(_event(team_id, "rft-hub.model.deployment_changed", status="Creating", **deployment)) \
        == "dropped"
    for status in ("Active", "Failed", "Deleted"):
        extra = {"failure_message": "Quota exceeded for on-demand deployments."} if status == "Failed" else {}
        assert slack.deliver(_event(team_id, "rft-hub.model.deployment_changed", status=status, **deployment,
                                    **extra)) == "sent"
    run = dict(eval_id="eval_1", run_id="evalrun_1", status="completed", mean_scores={"exact": 0.75},
               result_counts={"total": 4, "passed": 3, "failed": 1, "errored": 0}, cost_usd="0.000120")
    assert slack.deliver(_event(team_id, "rft-hub.eval.run_finished", **run)) == "sent"
    rows = [{"role": "base", "model": "openai.gpt-oss-20b", "status": "completed", "mean_scores": {"exact": 0.25}},
            {"role": "tuned", "model": "m1", "status": "completed", "mean_scores": {"exact": 0.75}}]
    assert slack.deliver(_event(team_id, "rft-hub.eval.compared", eval_id="eval_1", runs=rows)) == "sent"
    posted = sent_to(sink, f"T/D/{team_id}")
    headers = [m["blocks"][0]["text"]["text"] for m in posted]
    assert headers == [":rocket: Model deployed", ":x: Model deployment failed", ":wastebasket: Model deployment deleted",
                       ":bar_chart: Eval run completed", ":bar_chart: Job evaluated"]
    assert "Quota exceeded" in posted[1]["text"] and arn in json.dumps(posted[0]["blocks"])
    assert "exact 0.750" in posted[3]["text"] and "base `openai.gpt-oss-20b` (completed): exact 0.250" in posted[4]["text"]
    configure(api, admin_headers, stack, team_id, f"T/D/{team_id}", notify=["job"])
    assert slack.deliver(_event(team_id, "rft-hub.eval.run_finished", **{**run, "run_id": "evalrun_2"})) == "not-wanted"


def test_slash_keys_lists_the_teams_keys_and_no_secret(api, admin_headers, make_team, stack, sink):
    """`/rft keys` (issue #29): the channel's team's keys with role, models, status and last use."""
    team_id, key = make_team("slash-keys")
    channel = configure(api, admin_headers, stack, team_id, f"T/B/{team_id}")["channel_ids"][0]
    scoped = api.http.post(f"/v1/admin/teams/{team_id}/keys", headers=admin_headers, body=json.dumps(
        {"name": "grafana", "owner": "sre", "role": "read", "models": ["openai.gpt-oss-20b"]})).json_body
    assert api.http.get("/v1/me", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    r = slash(api, {"team_id": "TTEST1", "channel_id": channel, "user_id": "U1", "command": "/rft", "text": "keys",
                    "response_url": f"http://127.0.0.1:{stack.slack.port}/commands/T/{team_id}/resp"})
    assert r.status_code == 200 and r.json_body["response_type"] == "ephemeral"
    text = r.json_body["text"] + json.dumps(r.json_body["blocks"])
    assert "2 API keys" in text and scoped["prefix"] in text and "grafana" in text and "*read*" in text
    assert "`openai.gpt-oss-20b`" in text and "any model" in text and "last used 20" in text and "never" in text
    assert key not in text and scoped["key"] not in text and keys_hash_absent(text)


def keys_hash_absent(text: str) -> bool:
    import re
    return re.search(r"[0-9a-f]{64}", text) is None
