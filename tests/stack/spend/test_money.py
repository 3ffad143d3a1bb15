"""Money on a DynamoDB as strict as AWS: conflicts, throttles, crashes and failed writes.

Every test drives the real gateway over HTTP (the openai SDK) with the DynamoDB fault layer
(local/ddb_faults.py) between rft-hub and DynamoDB Local, then checks the invariants: spend
never passes the limit, every served call is on the ledger exactly once, daily totals equal
the ledger, no hold is left once the reconciler ran, and a refusal is `insufficient_quota`
only when the budget was really short.
"""
import json
import threading
import time
from decimal import Decimal

import openai
import pytest
from botocore.exceptions import ReadTimeoutError
from helpers import settled, wait_for
from pynamodb.exceptions import PutError, UpdateError

from chalicelib.domain import budget as budget_rules
from chalicelib.domain import pricing
from chalicelib.spend import budgets, ledger, metering, slices
from chalicelib.store import dynamo
from chalicelib.store.models import BudgetPeriod, Job, LedgerEntry, UsageDaily
from chalicelib.training import lifecycle

MODEL = "openai.gpt-oss-120b"
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
         "reference": "{{item.reference_answer}}", "operation": "eq"}


def admin(api, admin_headers, method, path, body=None, expect=300):
    kwargs = {"headers": admin_headers}
    if body is not None:
        kwargs["body"] = json.dumps(body)
    r = getattr(api.http, method)(path, **kwargs)
    assert r.status_code < expect, r.json_body
    return r


def priced_team(api, admin_headers, make_team, stack, calls_covered: int, max_tokens: int = 10):
    """A team whose budget covers `calls_covered` worst-case calls (1,000 micro-dollars a token)."""
    team_id, key = make_team("money")
    admin(api, admin_headers, "put", f"/v1/admin/prices/{MODEL}", {"input_usd_per_1m": "1000",
                                                                   "output_usd_per_1m": "1000"})
    price = pricing.Price(MODEL, Decimal(1000), Decimal(1000), Decimal(1000), "", "", False)
    worst = budget_rules.worst_case_micro(price, budget_rules.prompt_tokens_estimate([MESSAGES, None]), max_tokens)
    limit = calls_covered * worst
    admin(api, admin_headers, "put", f"/v1/admin/teams/{team_id}/budget",
          {"limit_usd": pricing.usd(limit), "alert_thresholds": [0.5]})
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    return team_id, client, limit, worst


def period_of_now(team_id):
    return BudgetPeriod.get(team_id, budget_rules.period_of(time.time()), consistent_read=True)


def booked(team_id, kind="inference"):
    return [e for e in ledger.entries(team_id) if e.kind == kind]


def burst(client, n, max_tokens=10):
    outcomes, barrier, lock = [], threading.Barrier(n), threading.Lock()

    def call():
        barrier.wait()
        try:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=max_tokens)
            result = "ok"
        except openai.APIStatusError as err:
            result = err.code or str(err.status_code)
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=call) for _ in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return outcomes


def dlq_depth():
    from chalicelib.adapters import aws, queues
    attrs = aws.sqs().get_queue_attributes(QueueUrl=queues.url(ledger.ledger_dlq()), AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return sum(int(v) for v in attrs.values())


def dead_lettered(before=0, timeout=30.0):
    """Once one more ledger entry is in the dead-letter queue (it is written after the answer is sent)."""
    end = time.monotonic() + timeout
    while dlq_depth() <= before:
        assert time.monotonic() < end, "no ledger entry was dead-lettered"
        time.sleep(0.05)


def repair(team_id):
    """What the instances' idle timers and the reconciler do for money, run now, as if every hold had expired."""
    slices.lender().give_back_all()
    metering.drain_dead_letters()
    report = metering.release_expired_holds(now=time.time() + budgets.HOLD_TTL_SECONDS + 60, team_ids=[team_id])
    metering.aggregate_team(team_id)
    return report


def assert_books_balance(team_id, limit, served):
    slices.lender().give_back_all()        # what an idle instance does
    period = period_of_now(team_id)
    entries = booked(team_id)
    served_entries = [e for e in entries if e.outcome == "served"]
    assert len(served_entries) == served                                   # every served call, once
    assert len({e.request_id for e in served_entries}) == served
    assert sum(e.cost_micro for e in entries) == period.spent <= limit    # never past the limit
    assert period.committed == period.spent and not budgets.open_holds(period)   # nothing left held
    daily = list(UsageDaily.query(team_id))
    assert sum(d.cost_micro for d in daily) == period.spent               # totals equal the ledger
    assert sum(d.requests for d in daily) == len(entries)
    assert not [e for pk in ledger.partitions(team_id) for e in LedgerEntry.pending_usage.query(pk)]


def test_calls_under_conflicts_and_throttles_never_lose_or_overspend(api, admin_headers, make_team, stack,
                                                                     bedrock, ddb_faults):
    # Plenty of budget: conflicts and 5% throttles on every table must never read as "out of money".
    team_id, client, limit, worst = priced_team(api, admin_headers, make_team, stack, calls_covered=1000)
    ddb_faults.configure(conflicts=True, seed=11,
                         rules=[{"operation": "*", "table": "*", "rate": 0.05, "error": "ThrottlingException"}])
    outcomes = burst(client, 40)
    assert "insufficient_quota" not in outcomes
    assert set(outcomes) <= {"ok", "service_unavailable"}, outcomes
    assert ddb_faults.counters()["faults"]                                   # faults really were injected
    ddb_faults.reset()
    repair(team_id)
    assert_books_balance(team_id, limit, outcomes.count("ok"))

    # A budget that covers 6 worst cases (about 20 calls as they cost): refusals are insufficient_quota
    # (really short) or 503, never more.
    team_id, client, limit, worst = priced_team(api, admin_headers, make_team, stack, calls_covered=6)
    ddb_faults.configure(conflicts=True, seed=5,
                         rules=[{"operation": "*", "table": "*", "rate": 0.05, "error": "ThrottlingException"}])
    outcomes = burst(client, 40)
    assert set(outcomes) <= {"ok", "insufficient_quota", "service_unavailable"}, outcomes
    assert outcomes.count("ok") >= 1 and "insufficient_quota" in outcomes
    ddb_faults.reset()
    repair(team_id)
    assert_books_balance(team_id, limit, outcomes.count("ok"))


def test_a_busy_budget_is_a_503_not_insufficient_quota(api, admin_headers, make_team, stack, bedrock, ddb_faults):
    team_id, client, limit, _ = priced_team(api, admin_headers, make_team, stack, calls_covered=100)
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10)   # warm caches
    settled(team_id, 1)              # and its hold settled (just after its answer) before any fault
    upstream_before = len(bedrock.requests)
    ddb_faults.configure(rules=[{"operation": "UpdateItem", "table": "budget_periods", "rate": 1.0,
                                 "error": "ProvisionedThroughputExceededException"}])
    raw = client.chat.completions.with_raw_response
    with pytest.raises(openai.InternalServerError) as err:
        raw.create(model=MODEL, messages=MESSAGES, max_tokens=10)
    assert err.value.status_code == 503 and err.value.code == "service_unavailable"
    assert err.value.response.headers["retry-after"] and err.value.response.headers["x-should-retry"] == "true"
    assert len(bedrock.requests) == upstream_before                          # nothing reached Bedrock
    ddb_faults.reset()
    period = period_of_now(team_id)
    assert period.committed == period.spent and not budgets.open_holds(period)


def test_insufficient_quota_tells_the_sdk_not_to_retry(api, admin_headers, make_team, stack, bedrock):
    team_id, client, _, _ = priced_team(api, admin_headers, make_team, stack, calls_covered=0)
    r = api.http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {client.api_key}",
                                                        "Content-Type": "application/json"},
                      body=json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 10}))
    assert r.status_code == 429 and r.json_body["error"]["code"] == "insufficient_quota"
    assert r.headers["x-should-retry"] == "false"


def test_a_crash_between_reserve_and_settle_is_repaired_by_the_reconciler(api, admin_headers, make_team, stack):
    team_id, _, limit, worst = priced_team(api, admin_headers, make_team, stack, calls_covered=10)
    # A call whose function died after reserving: no ledger entry, no settlement.
    dead = budgets.reserve(team_id, worst)
    # A call that was served and written to the ledger, but whose settlement was lost.
    lost = budgets.reserve(team_id, worst)
    created = budgets.hold_created_ms(lost.hold_id)
    entry = ledger.new_entry(team_id, created, "req-lost", lost.hold_id, model=MODEL, upstream_model=MODEL,
                             endpoint="/chat/completions", status=200, cost_micro=worst // 3, reserved_micro=worst)
    ledger.put(entry)
    assert set(budgets.open_holds(period_of_now(team_id))) == {dead.hold_id, lost.hold_id}
    # Not yet expired: the reconciler leaves live holds alone.
    nothing = {"settled": 0, "abandoned": 0, "orphaned_job_holds": 0, "slices_closed": 0}
    assert metering.release_expired_holds(team_ids=[team_id]) == nothing
    report = repair(team_id)
    assert report == {**nothing, "settled": 1, "abandoned": 1}
    assert repair(team_id) == nothing                                                    # idempotent
    period = period_of_now(team_id)
    assert period.spent == worst // 3 and period.committed == period.spent and not budgets.open_holds(period)
    abandoned = [e for e in booked(team_id, kind="abandoned")]
    assert len(abandoned) == 1 and abandoned[0].outcome == "abandoned" and abandoned[0].cost_micro == 0


def test_a_ledger_write_that_fails_is_dead_lettered_and_replayed(api, admin_headers, make_team, stack, bedrock,
                                                                 ddb_faults):
    team_id, client, limit, _ = priced_team(api, admin_headers, make_team, stack, calls_covered=10)
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10)   # warm caches
    settled(team_id, 1)              # and its hold settled (just after its answer) before any fault
    ddb_faults.configure(rules=[{"operation": "PutItem", "table": "ledger", "next": 50,
                                 "error": "InternalServerError"}])
    reply = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=10)
    assert reply.parse().choices[0].message.content                          # the caller was served
    cost = reply.headers["x-rft-cost-usd"]
    dead_lettered()                  # its ledger write (after the answer) gave up
    ddb_faults.reset()
    assert len(booked(team_id)) == 1                                          # only the warm-up call so far
    counted = period_of_now(team_id).committed                               # spent, or set aside in a slice
    assert counted >= booked(team_id)[0].cost_micro + budget_rules.to_micro(cost)   # the budget counts it
    assert metering.drain_dead_letters()["written"] >= 1
    entries = booked(team_id)
    assert len(entries) == 2 and pricing.usd(entries[-1].cost_micro) == cost
    metering.aggregate_team(team_id)
    assert_books_balance(team_id, limit, 2)


def test_a_job_whose_settlement_fails_once_is_settled_by_the_reconciler(api, admin_headers, make_team, stack,
                                                                       bedrock, ddb_faults):
    from sample_data import arithmetic_rows, jsonl
    team_id, key = make_team("job-settle")
    admin(api, admin_headers, "put", f"/v1/admin/teams/{team_id}/budget", {"limit_usd": "1000"})
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=f.id,
                                         extra_body={"method": {"type": "reinforcement",
                                                                "reinforcement": {"grader": EXACT}}})
    record = Job.get(team_id, job.id)
    assert record.budget_hold_id in budgets.open_holds(period_of_now(team_id))
    # Every settlement attempt of the finishing job fails (10 attempts = one settlement's retries).
    ddb_faults.configure(rules=[{"operation": "UpdateItem", "table": "budget_periods", "next": 10,
                                 "error": "InternalServerError"}])
    assert wait_for(client, job.id, {"succeeded"}).status == "succeeded"
    ddb_faults.reset()
    record.refresh(consistent_read=True)
    assert not record.budget_settled and record.active_shard == "active"     # not skipped: still to do
    assert record.budget_hold_id in budgets.open_holds(period_of_now(team_id))
    lifecycle.reconcile()
    record.refresh(consistent_read=True)
    period = period_of_now(team_id)
    assert record.budget_settled and record.active_shard is None
    assert record.budget_hold_id not in budgets.open_holds(period)
    assert period.spent >= record.estimate["estimated_micro_usd"]


def test_the_hold_covers_the_largest_output_limit_and_bad_stream_releases_nothing(api, admin_headers, make_team,
                                                                                  stack, bedrock):
    team_id, client, limit, _ = priced_team(api, admin_headers, make_team, stack, calls_covered=1000,
                                            max_tokens=100)
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=1,
                                   extra_body={"max_tokens": 100})
    price = pricing.Price(MODEL, Decimal(1000), Decimal(1000), Decimal(1000), "", "", False)
    assert booked(team_id)[0].reserved_micro == budget_rules.worst_case_micro(
        price, budget_rules.prompt_tokens_estimate([MESSAGES, None]), 100)
    upstream_before = len(bedrock.requests)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, extra_body={"stream": 1})
    assert err.value.param == "stream" and len(bedrock.requests) == upstream_before
    _, period = settled(team_id)
    assert not budgets.open_holds(period) and period.committed == period.spent


def test_training_an_unpriced_model_is_refused_and_overrides_apply(api, admin_headers, client):
    from sample_data import arithmetic_rows, jsonl
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    method = {"type": "reinforcement", "reinforcement": {"grader": EXACT}}
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="nvidia.nemotron-nano-3-30b", training_file=f.id,
                                       extra_body={"method": method})
    assert err.value.code == "model_not_priced"
    admin(api, admin_headers, "put", "/v1/admin/prices/nvidia.nemotron-nano-3-30b",
          {"input_usd_per_1m": "0.5", "output_usd_per_1m": "2"})
    try:
        job = client.fine_tuning.jobs.create(model="nvidia.nemotron-nano-3-30b", training_file=f.id,
                                             extra_body={"method": method})
        estimate = job.model_extra["rft_cost_estimate"]
        assert estimate["priced"] and estimate["rates"]["input_usd_per_1m"] == "0.5"
        assert estimate["estimated_micro_usd"] > 0
    finally:   # back to unpriced, as other tests expect
        admin(api, admin_headers, "delete", "/v1/admin/prices/nvidia.nemotron-nano-3-30b")
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model="nvidia.nemotron-nano-3-30b", training_file=f.id,
                                       extra_body={"method": method})


@pytest.mark.parametrize("body, param", [
    ({"limit_usd": "1" * 39}, "limit_usd"), ({"limit_usd": 1e300}, "limit_usd"),
    ({"limit_usd": True}, "limit_usd"), ({"limit_usd": "-1"}, "limit_usd"),
])
def test_budget_amounts_are_bounded(api, admin_headers, make_team, body, param):
    team_id, key = make_team("bounds")
    r = admin(api, admin_headers, "put", f"/v1/admin/teams/{team_id}/budget", body, expect=500)
    assert r.status_code == 400 and r.json_body["error"]["param"] == param
    assert api.http.get("/v1/budget", headers={"Authorization": f"Bearer {key}"}).status_code == 200


@pytest.mark.parametrize("value", ["9" * 39, "1e400", "NaN", "0.0000000001", True, [1]])
def test_prices_are_bounded(api, admin_headers, value):
    r = admin(api, admin_headers, "put", "/v1/admin/prices/openai.gpt-oss-20b",
              {"input_usd_per_1m": value, "output_usd_per_1m": "1"}, expect=500)
    assert r.status_code == 400 and r.json_body["error"]["param"] == "input_usd_per_1m"


def _pynamo_error(cls, code=None, reasons=None, cause=None):
    from pynamodb.exceptions import CancellationReason, VerboseClientError
    if cause is None:
        cause = VerboseClientError({"Error": {"Code": code, "Message": "x"}}, "TransactWriteItems",
                                   cancellation_reasons=[None if r == "None" else CancellationReason(code=r)
                                                         for r in reasons or []])
    return cls("failed", cause)


def test_every_dynamodb_error_has_one_meaning():
    from pynamodb.exceptions import TransactWriteError
    assert dynamo.classify(_pynamo_error(UpdateError, "ConditionalCheckFailedException")) == dynamo.CONDITION
    assert dynamo.classify(_pynamo_error(UpdateError, "TransactionConflictException")) == dynamo.BUSY
    assert dynamo.classify(_pynamo_error(PutError, "ProvisionedThroughputExceededException")) == dynamo.BUSY
    assert dynamo.classify(_pynamo_error(PutError, "ThrottlingException")) == dynamo.BUSY
    assert dynamo.classify(_pynamo_error(PutError, "InternalServerError")) == dynamo.UNKNOWN
    assert dynamo.classify(_pynamo_error(PutError, cause=ReadTimeoutError(endpoint_url="x"))) == dynamo.UNKNOWN
    assert dynamo.classify(_pynamo_error(PutError, "ValidationException")) == dynamo.ERROR
    cancelled = "TransactionCanceledException"
    assert dynamo.classify(_pynamo_error(TransactWriteError, cancelled, ["None", "TransactionConflict"])) \
        == dynamo.BUSY
    assert dynamo.classify(_pynamo_error(TransactWriteError, cancelled, ["ConditionalCheckFailed", "None"])) \
        == dynamo.CONDITION
    assert dynamo.classify(ValueError("not dynamodb")) == dynamo.ERROR


def test_an_upstream_that_cannot_finish_in_time_is_a_504_and_releases_the_hold(api, admin_headers, make_team,
                                                                                stack, bedrock):
    team_id, client, limit, _ = priced_team(api, admin_headers, make_team, stack, calls_covered=10)
    bedrock.latency_ms = 8000          # longer than the request may wait (RFT_BEDROCK_RETRY_DEADLINE=3 in tests)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10)
    assert err.value.status_code == 504 and err.value.code == "upstream_timeout"
    _, period = settled(team_id, 1)
    assert not budgets.open_holds(period) and period.committed == period.spent == 0
    entries = booked(team_id)
    assert len(entries) == 1 and entries[0].outcome == "error" and entries[0].status == 504


def test_a_stalled_dynamodb_is_a_503_and_a_late_landing_hold_is_released(api, admin_headers, make_team, stack,
                                                                           bedrock, ddb_faults):
    team_id, client, limit, _ = priced_team(api, admin_headers, make_team, stack, calls_covered=10)
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10)   # warm caches
    settled(team_id, 1)              # and its hold settled (just after its answer) before any fault
    upstream_before = len(bedrock.requests)
    # Every write now stalls past the client's 3 s read timeout, then lands anyway.
    ddb_faults.configure(write_delay_ms=4500)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10)
    assert err.value.status_code == 503 and err.value.code == "service_unavailable"   # not insufficient_quota
    assert len(bedrock.requests) == upstream_before                  # an unknown hold is never used
    ddb_faults.reset()                                               # the stalled reservation lands now
    time.sleep(0.5)
    report = repair(team_id)
    assert report["abandoned"] <= 1                                  # it landed (or not): released either way
    period = period_of_now(team_id)
    assert not budgets.open_holds(period) and period.committed == period.spent
    assert len([e for e in booked(team_id) if e.outcome == "served"]) == 1


def test_the_answer_reaches_the_caller_before_the_ledger_write_starts(api, admin_headers, make_team, stack,
                                                                      bedrock, ddb_faults):
    """With a warm slice a plain call waits for no DynamoDB write at all: admitted in memory, answered,
    and only then booked. Proved by order, not time: every write is held in the fault layer until
    the test lets it go, and the caller has its whole answer while the ledger write is held."""
    team_id, client, limit, worst = priced_team(api, admin_headers, make_team, stack, calls_covered=100)
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10)     # warm caches and a slice
    end = time.monotonic() + 20
    while len(booked(team_id)) < 1:                     # its booking runs just after its answer
        assert time.monotonic() < end
        time.sleep(0.05)
    writes_before = sum(ddb_faults.counters()["forwarded"].get(op, 0) for op in ("PutItem", "UpdateItem"))
    ddb_faults.configure(write_delay_ms=20_000)         # every write waits for release() (or 20 s)
    answer = {}
    caller = threading.Thread(target=lambda: answer.update(
        reply=client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=10)))
    caller.start()
    try:
        assert ddb_faults.wait_for("PutItem")           # the ledger entry, held ...
        caller.join(30)
        assert not caller.is_alive() and answer["reply"].parse().choices     # ... and the caller has its answer
        counters = ddb_faults.counters()
        assert counters["in_flight"] == {"PutItem": 1}                       # the only write, still held
        writes = sum(counters["forwarded"].get(op, 0) for op in ("PutItem", "UpdateItem"))
        assert writes == writes_before                                       # nothing else was written
        assert len(booked(team_id)) == 1                                     # not yet on the ledger
    finally:
        ddb_faults.reset()                              # lets the ledger write go
    entries, period = settled(team_id, 2)
    assert period.spent == sum(e.cost_micro for e in entries) and period.committed == period.spent
    assert answer["reply"].headers["x-rft-cost-usd"] == pricing.usd(entries[-1].cost_micro)
