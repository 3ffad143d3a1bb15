"""The ledger's dead-letter queue, message by message (issue #23, H1): an entry DynamoDB can never
store is parked in a second queue (alarmed in the template) and never stands in front of the
other teams' dead-lettered calls, which are written and settled in the same reconciler pass."""
import json
import time

import boto3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_money import MESSAGES, MODEL, booked, dead_lettered, dlq_depth, period_of_now, priced_team

from chalicelib.config import settings as app_settings
from chalicelib.domain import budget as budget_rules
from chalicelib.spend import budgets, ledger, metering, slices
from chalicelib.training import lifecycle


def _sqs():
    return boto3.client("sqs", region_name=app_settings().region)


def _url(name):
    return _sqs().get_queue_url(QueueName=name)["QueueUrl"]


def _take_all(name):
    """Every visible message of a queue, deleted (so each test sees only its own)."""
    sqs, url, bodies = _sqs(), _url(name), []
    while True:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0,
                                  VisibilityTimeout=30).get("Messages", [])
        if not got:
            return bodies
        for m in got:
            bodies.append(m["Body"])
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def _poison(team_id, request_id):
    """The finding's entry: a worst case of 41 digits (DynamoDB numbers have at most 38). Another
    change bounds max_tokens, so it is built here, as `metering.record` dead-letters it."""
    now = int(time.time() * 1000)
    entry = ledger.new_entry(team_id, now, request_id, None, model=MODEL,
                        upstream_model=MODEL, endpoint="/v1/chat/completions", status=200,
                        kind="inference", outcome="served", input_tokens=7, output_tokens=3, cost_micro=1,
                        reserved_micro=12345678901234567890123456789012345678901 * 1000)
    return ledger.entry_json(entry)


def test_a_poison_entry_is_parked_and_the_other_teams_entries_are_written(api, admin_headers, make_team, stack,
                                                                        bedrock, ddb_faults):
    _take_all(ledger.ledger_parked_queue())
    poor, _ = make_team("no-budget")
    poison = _poison(poor, "req-poison-h1")
    dlq = _url(ledger.ledger_dlq())
    _sqs().send_message(QueueUrl=dlq, MessageBody=poison)            # first in line
    _sqs().send_message(QueueUrl=dlq, MessageBody="{not json")        # an unreadable body too

    # Two other teams' served calls whose ledger writes fail: dead-lettered behind the poison.
    served = []
    for _name in ("team-p", "team-q"):
        team_id, client, _, _ = priced_team(api, admin_headers, make_team, stack, calls_covered=10)
        ddb_faults.configure(rules=[{"operation": "PutItem", "table": "ledger", "next": 50,
                                     "error": "InternalServerError"}])
        depth = dlq_depth()
        reply = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=5)
        dead_lettered(depth)
        ddb_faults.reset()
        assert reply.parse().choices[0].message.content
        assert not booked(team_id)                                              # dead-lettered ...
        assert period_of_now(team_id).committed >= budget_rules.to_micro(reply.headers["x-rft-cost-usd"])  # counted
        served.append((team_id, reply.headers["x-request-id"]))

    report = lifecycle.reconcile()
    assert not [p for p in report.problems if p.startswith("ledger_dead_letters")], report.problems
    drained = report.money["ledger_dead_letters"]
    assert drained["written"] >= 2 and drained["parked"] >= 2, drained
    slices.lender().give_back_all()                                 # the instance's idle slices
    for team_id, request_id in served:                              # written and settled
        assert [e.request_id for e in booked(team_id)] == [request_id]
        assert not budgets.open_holds(period_of_now(team_id))
    assert not booked(poor)

    # The poison and the unreadable body wait in the parked queue (alarmed), no longer in the DLQ.
    parked = _take_all(ledger.ledger_parked_queue())
    assert poison in parked and "{not json" in parked
    assert metering.drain_dead_letters()["parked"] == 0        # the next pass has nothing to park


def test_parking_is_idempotent(stack):
    _take_all(ledger.ledger_parked_queue())
    body = _poison("team-x", "req-park-twice")
    # A park repeated (its DLQ delete failed, or SQS delivered the message twice) leaves one copy.
    ledger.park(body, "test")
    ledger.park(body, "test")
    assert _take_all(ledger.ledger_parked_queue()) == [body]


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                    max_size=3), max_leaves=6)
_HUGE = st.integers(min_value=10 ** 38, max_value=10 ** 60) | st.integers(max_value=-(10 ** 38))
_ENTRY_FIELD = st.sampled_from(["reserved_micro", "cost_micro", "input_tokens", "status", "created_at"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(
    _JSON.map(lambda v: json.dumps(v)),                                          # any JSON (mostly no entry)
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc", "Cn"]), max_size=40),   # any text
    st.tuples(_ENTRY_FIELD, _HUGE).map(lambda f: json.dumps({**json.loads(_poison("team-h", "req-h")),
                                                             f[0]: f[1]})),     # an entry, one number too big
    st.tuples(_ENTRY_FIELD, _JSON).map(lambda f: json.dumps({**json.loads(_poison("team-h", "req-h")),
                                                            "reserved_micro": 1, f[0]: f[1]}))))
def test_no_body_stops_the_drain(stack, body):
    """Whatever a dead-lettered body holds, the drain ends, and an entry queued behind it is written."""
    marker = f"req-behind-{time.time_ns()}"
    entry = json.loads(_poison("team-behind", marker))
    entry["reserved_micro"] = 1
    dlq = _url(ledger.ledger_dlq())
    _sqs().send_message(QueueUrl=dlq, MessageBody=body or " ")
    _sqs().send_message(QueueUrl=dlq, MessageBody=json.dumps(entry))
    metering.drain_dead_letters()
    assert marker in [e.request_id for e in ledger.entries("team-behind")]
