"""The inference gateway through the unmodified openai SDK: routing, metering, budgets."""
import json
import threading
import time
from decimal import Decimal

import boto3
import openai
import pytest
from helpers import settled, start_job, wait_for

from chalicelib import outbox
from chalicelib.domain import budget as budget_rules
from chalicelib.domain import pricing
from chalicelib.store.models import BudgetPeriod


def tuned_alias(api, client, bedrock, model="openai.gpt-oss-20b", suffix="helpdesk"):
    """A job trained on the local Bedrock, finished and registered with `suffix` as its alias."""
    job = start_job(client, model=model, suffix=suffix)
    return wait_for(client, job.id, {"succeeded"}).fine_tuned_model


def admin(api, admin_headers, method, path, body=None):
    fn = getattr(api.http, method)
    kwargs = {"headers": admin_headers}
    if body is not None:
        kwargs["body"] = json.dumps(body)
    r = fn(path, **kwargs)
    assert r.status_code < 300, r.json_body
    return r.json_body


def usage(api, client, **query):
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return api.http.get(f"/v1/usage?{qs}", headers={"Authorization": f"Bearer {client.api_key}"})


def test_chat_stream_and_responses_on_an_alias_are_metered_exactly(api, client, bedrock):
    model = tuned_alias(api, client, bedrock)
    reply = client.chat.completions.create(model="helpdesk", messages=[{"role": "user", "content": "hello there"}],
                                           max_tokens=20)
    assert reply.choices[0].message.content and reply.usage.total_tokens > 0
    assert bedrock.requests[-1]["body"]["model"] == model          # routed to the tuned model

    chunks = list(client.chat.completions.create(model="helpdesk", stream=True,
                                                 messages=[{"role": "user", "content": "stream please"}]))
    assert chunks and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)                      # not asked for: not shown ...
    sent = bedrock.requests[-1]["body"]
    assert sent["stream_options"]["include_usage"] is True           # ... but always metered
    with_usage = list(client.chat.completions.create(model="helpdesk", stream=True,
                                                     stream_options={"include_usage": True},
                                                     messages=[{"role": "user", "content": "and usage"}]))
    assert with_usage[-1].usage.completion_tokens > 0

    resp = client.responses.create(model="helpdesk", input="say hi", max_output_tokens=16)
    assert resp.output_text and resp.usage.output_tokens > 0

    # A plain call is booked just after its answer is sent (docs/inference.md): the report has it then.
    deadline = time.monotonic() + 20
    while True:
        report = usage(api, client, group_by="model").json_body
        row = next((r for r in report["data"] if r["model"] == "helpdesk"), {"requests": 0})
        if row["requests"] >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert row["requests"] == 4 and row["errors"] == 0 and row["output_tokens"] > 0
    price = pricing.price_for("openai.gpt-oss-20b")
    expected = pricing.micro_usd(row["input_tokens"] - row["cached_tokens"], price.input) \
        + pricing.micro_usd(row["output_tokens"], price.output)
    # rounding up happens per call, so the sum of calls is within a micro-dollar per call of the total
    assert expected <= row["cost_micro"] <= expected + 4
    assert row["cost_usd"] == pricing.usd(row["cost_micro"])

    csv_body = usage(api, client, group_by="model", format="csv").body.decode()
    lines = csv_body.strip().splitlines()
    assert lines[0].startswith("team_id,model,requests")
    assert any(line.split(",")[1] == "helpdesk" and line.endswith(row["cost_usd"]) for line in lines[1:])
    assert any(t["status"] == "succeeded" and t["estimated_usd"] for t in report["training"])


def test_unknown_and_unpriced_models_are_refused(api, client, bedrock):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_found"
    # Training an unpriced model is refused (test_money), so an unpriced tuned model can only be
    # one trained while an admin price existed: its registry record, as the registry writes it.
    from chalicelib.store.models import Alias, TunedModel
    team_id = client.get("/me", cast_to=object)["team"]["id"]
    TunedModel(team_id, "ft:nemotron:unpriced", base_model="nvidia.nemotron-nano-3-30b", job_id="ftjob-x",
               grader={}, created_at=int(time.time())).save()
    Alias(team_id, "unpriced", model_id="ft:nemotron:unpriced", base_model="nvidia.nemotron-nano-3-30b",
          version=1, updated_at=int(time.time())).save()
    before = len(bedrock.requests)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="unpriced", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_priced"
    assert len(bedrock.requests) == before                           # refused before any upstream call


def test_revoked_key_is_refused(api, admin_headers, make_team, stack):
    from chalicelib.domain import keys
    _, key = make_team("revoked")
    c = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    assert c.chat.completions.create(model="openai.gpt-oss-20b", messages=[{"role": "user", "content": "x"}],
                                     max_tokens=5).choices
    api.http.delete(f"/v1/admin/keys/{keys.parse_key_id(key)}", headers=admin_headers)
    with pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model="openai.gpt-oss-20b", messages=[{"role": "user", "content": "x"}])


def test_upstream_throttling_is_retried_then_surfaced(client, bedrock):
    bedrock.faults = [{"status": 429, "count": 2, "path": "/v1/chat/completions", "method": "POST"}]
    assert client.chat.completions.create(model="openai.gpt-oss-20b", max_tokens=5,
                                          messages=[{"role": "user", "content": "x"}]).choices
    bedrock.faults = [{"status": 429, "count": 10_000, "path": "/v1/chat/completions", "method": "POST"}]
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="openai.gpt-oss-20b", max_tokens=5,
                                       messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 429
    bedrock.faults = [{"status": 503, "count": 10_000, "path": "/v1/chat/completions", "method": "POST"}]
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="openai.gpt-oss-20b", max_tokens=5,
                                       messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 503


def test_budget_holds_exactly_under_concurrency(api, admin_headers, make_team, stack, bedrock):
    team_id, key = make_team("concurrent")
    model = "openai.gpt-oss-120b"
    admin(api, admin_headers, "put", f"/v1/admin/prices/{model}",
          {"input_usd_per_1m": "1000", "output_usd_per_1m": "1000"})   # 1,000 micro-dollars per token
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    price = pricing.Price(model, Decimal(1000), Decimal(1000), Decimal(1000), "", "", False)
    worst = budget_rules.worst_case_micro(price, budget_rules.prompt_tokens_estimate([messages, None]), 10)
    limit = 10 * worst
    view = admin(api, admin_headers, "put", f"/v1/admin/teams/{team_id}/budget",
                 {"limit_usd": pricing.usd(limit), "period": "monthly", "alert_thresholds": [0.5, 1.0]})
    assert view["limit_usd"] == pricing.usd(limit) and view["resets_at"] > time.time()

    upstream_before = len([r for r in bedrock.requests if r["path"] == "/v1/chat/completions"])
    c = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    outcomes = []
    barrier = threading.Barrier(50)

    def call():
        barrier.wait()
        try:
            c.chat.completions.create(model=model, messages=messages, max_tokens=10)
            outcomes.append("ok")
        except openai.RateLimitError as err:
            outcomes.append(err.code)

    threads = [threading.Thread(target=call) for _ in range(50)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    admitted = outcomes.count("ok")
    assert admitted >= 10 and set(outcomes) <= {"ok", "insufficient_quota"} and len(outcomes) == 50

    ledger, period = settled(team_id, admitted)
    assert period.spent <= limit and period.committed == period.spent       # nothing left reserved
    assert len(ledger) == admitted and sum(e.cost_micro for e in ledger) == period.spent
    upstream = len([r for r in bedrock.requests if r["path"] == "/v1/chat/completions"]) - upstream_before
    assert upstream == admitted                                              # refusals never reached Bedrock

    # Another call that cannot fit is refused before the upstream call.
    admin(api, admin_headers, "put", f"/v1/admin/teams/{team_id}/budget", {"limit_usd": "0", "period": "monthly"})
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model=model, messages=messages, max_tokens=10)
    assert err.value.code == "insufficient_quota"


def test_threshold_crossings_are_announced_once_per_period(api, admin_headers, make_team, stack):
    team_id, key = make_team("thresholds")
    admin(api, admin_headers, "put", f"/v1/admin/teams/{team_id}/budget",
          {"limit_usd": "0.00002", "period": "monthly", "alert_thresholds": [0.5, 0.8]})
    c = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    for _ in range(30):
        try:
            c.chat.completions.create(model="openai.gpt-oss-20b", max_tokens=1,
                                      messages=[{"role": "user", "content": "hi"}])
        except openai.RateLimitError:
            break
    # A plain call's hold is settled, and its thresholds announced, just after its answer is sent.
    deadline = time.monotonic() + 20
    while True:
        period = BudgetPeriod.get(team_id, budget_rules.period_of(time.time()), consistent_read=True)
        if sorted(period.alerted or []) == [0.5, 0.8] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sorted(period.alerted) == [0.5, 0.8]
    sqs = boto3.client("sqs", region_name="us-west-2")
    url = sqs.get_queue_url(QueueName=f"{outbox.bus_name()}-outbound-tap")["QueueUrl"]
    seen = []
    for _ in range(10):
        msgs = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if not msgs:
            break
        for m in msgs:
            body = json.loads(m["Body"])
            if body["detail-type"] == "rft-hub.budget.threshold_crossed" and body["detail"]["team_id"] == team_id:
                seen.append(body["detail"]["threshold"])
    assert sorted(seen) == [0.5, 0.8]


def test_a_tuned_model_is_retired_with_the_sdk_unless_an_alias_points_at_it(client):
    from chalicelib.store.models import Alias, TunedModel
    team_id = client.get("/me", cast_to=object)["team"]["id"]
    now = int(time.time())
    for model_id in ("openai.gpt-oss-20b:ft:old", "openai.gpt-oss-20b:ft:live"):
        TunedModel(team_id, model_id, base_model="openai.gpt-oss-20b", job_id="ftjob-x", grader={},
                   created_at=now).save()
    Alias(team_id, "live", model_id="openai.gpt-oss-20b:ft:live", base_model="openai.gpt-oss-20b", version=1,
          updated_at=now).save()
    deleted = client.models.delete("openai.gpt-oss-20b:ft:old")
    assert deleted.deleted and deleted.id == "openai.gpt-oss-20b:ft:old"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("openai.gpt-oss-20b:ft:old")
    with pytest.raises(openai.ConflictError) as err:
        client.models.delete("openai.gpt-oss-20b:ft:live")
    assert "live" in err.value.message


@pytest.mark.parametrize("tokens, micro", [
    ((1, 0, 2), 6),      # 0.33 + 5.50 = 5.83 -> 6 (rounding each part up would charge 1 + 6 = 7)
    ((5, 0, 6), 19),     # 1.65 + 16.50 = 18.15 -> 19
    ((10, 4, 0), 3),     # 6 uncached x 0.33 + 4 cached x 0.033 = 2.112 -> 3
    ((0, 0, 0), 0),
])
def test_a_call_costs_its_exact_sum_rounded_up_once(tokens, micro):
    price = pricing.Price("m", Decimal("0.33"), Decimal("2.75"), Decimal("0.033"), "", "", False)
    assert pricing.cost_of_usage(price, *tokens) == micro
