"""The DynamoDB fault layer (local/ddb_faults.py): pass-through, and conflicts and throttles as AWS returns them.

Real servers: DynamoDB Local behind the proxy, boto3 / PynamoDB / raw HTTP clients. Ordering is
proven with the proxy's wait_for() (a call is in flight, holding its items) and release() (held
calls go on), never with sleeps or timing assertions. Clients make one attempt only: botocore
would otherwise retry throttles and 5xx by itself and hide the counts.
"""
from __future__ import annotations

import json
import os
import uuid
import zlib
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import boto3
import pytest
import urllib3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from pynamodb.attributes import NumberAttribute, UnicodeAttribute
from pynamodb.connection import Connection
from pynamodb.exceptions import TransactWriteError
from pynamodb.models import Model
from pynamodb.transactions import TransactWrite

from local.ddb_faults import DDB, DEFAULTS, THROTTLE_ON_DEMAND
from local.servers import REGION

RUN = uuid.uuid4().hex[:8]
ITEMS = f"ddb-faults-{RUN}-items"    # hash key pk
ORDERS = f"ddb-faults-{RUN}-orders"  # pk + sk: a Put's key is the schema's attributes of its Item
HOLD_MS = 30_000                     # an upper bound only: each test ends the hold with release()
# botocore's `max_attempts` counts retries (1 = two attempts); `total_max_attempts` counts attempts.
ONE_ATTEMPT = Config(retries={"total_max_attempts": 1, "mode": "standard"})
CONFLICT = "Transaction is ongoing for the item"


class Tally(Model):
    class Meta:
        table_name = ITEMS
        region = REGION

    pk = UnicodeAttribute(hash_key=True)
    n = NumberAttribute(default=0)


def S(value: str) -> dict:
    return {"S": value}


def N(value: int) -> dict:
    return {"N": str(value)}


@pytest.fixture(scope="module")
def ddb(stack):
    client = boto3.client("dynamodb", endpoint_url=stack.ddb_faults_url, region_name=REGION, config=ONE_ATTEMPT)
    schemas = {ITEMS: [("pk", "HASH")], ORDERS: [("pk", "HASH"), ("sk", "RANGE")]}
    for name, keys in schemas.items():
        client.create_table(TableName=name, BillingMode="PAY_PER_REQUEST",
                            KeySchema=[{"AttributeName": a, "KeyType": t} for a, t in keys],
                            AttributeDefinitions=[{"AttributeName": a, "AttributeType": "S"} for a, _ in keys])
    yield client
    for name in schemas:
        client.delete_table(TableName=name)


@pytest.fixture
def key():
    """A fresh item key per use, so tests never share items."""
    return lambda name="item": {"pk": S(f"{name}-{uuid.uuid4().hex[:8]}")}


def raw(url: str, target: str, payload: dict) -> urllib3.BaseHTTPResponse:
    """A signed JSON 1.0 call with no SDK in between, to see the bytes on the wire."""
    body = json.dumps(payload).encode()
    request = AWSRequest("POST", f"{url}/", data=body, headers={
        "Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": f"DynamoDB_20120810.{target}"})
    creds = Credentials(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"],
                        os.environ.get("AWS_SESSION_TOKEN"))
    SigV4Auth(creds, "dynamodb", REGION).add_auth(request)
    return urllib3.request("POST", f"{url}/", body=body, headers=dict(request.headers.items()), retries=False)


def control(stack, method: str, path: str = "", body: dict | None = None) -> dict:
    resp = urllib3.request(method, f"{stack.ddb_faults_url}/_local/faults{path}",
                           body=json.dumps(body).encode() if body is not None else None, retries=False)
    assert resp.status == 200, resp.data
    return resp.json()


def error_of(call, *args, **kwargs) -> ClientError:
    with pytest.raises(ClientError) as err:
        call(*args, **kwargs)
    return err.value


# ---- pass-through -------------------------------------------------------------------------------

def test_pass_through_is_byte_faithful(stack, ddb_faults, ddb, key):
    direct = f"http://127.0.0.1:{stack.ports['dynamodb_local']}"
    item = {**key("bytes"), "name": S('café ✓ "quoted" \\ \u2028'), "price": {"N": "12.50"},
            "blob": {"B": b"\x00\xff\x10"}, "tags": {"SS": ["b", "a"]},
            "nested": {"M": {"list": {"L": [{"BOOL": True}, {"NULL": True}, N(-3)]}}}}
    assert ddb.put_item(TableName=ITEMS, Item=item)["ResponseMetadata"]["HTTPStatusCode"] == 200
    got = ddb.get_item(TableName=ITEMS, Key={"pk": item["pk"]}, ConsistentRead=True)
    direct_client = boto3.client("dynamodb", endpoint_url=direct, region_name=REGION, config=ONE_ATTEMPT)
    assert got["Item"] == direct_client.get_item(TableName=ITEMS, Key={"pk": item["pk"]})["Item"]
    assert got["Item"]["name"] == item["name"] and got["Item"]["blob"] == item["blob"]
    assert got["ResponseMetadata"]["HTTPHeaders"]["content-type"] == "application/x-amz-json-1.0"

    calls = [("GetItem", {"TableName": ITEMS, "Key": {"pk": item["pk"]}, "ConsistentRead": True}),
             ("Query", {"TableName": ITEMS, "KeyConditionExpression": "pk = :p",
                        "ExpressionAttributeValues": {":p": item["pk"]}}),
             ("GetItem", {"TableName": "no-such-table-" + RUN, "Key": {"pk": S("x")}})]  # an upstream error too
    for target, payload in calls:
        via, upstream = raw(stack.ddb_faults_url, target, payload), raw(direct, target, payload)
        assert via.status == upstream.status
        assert via.data == upstream.data
        for header in ("content-type", "x-amz-crc32"):  # DynamoDB Local sends no CRC32 on its errors
            assert via.headers.get(header) == upstream.headers.get(header)
        assert via.headers["x-amzn-RequestId"]
    assert ddb_faults.counters()["faults"] == {}


# ---- conflicts ----------------------------------------------------------------------------------

def test_plain_write_on_an_item_held_by_a_transaction_is_refused(ddb_faults, ddb, key):
    item, order_pk = key("held"), key("order")["pk"]
    ddb.put_item(TableName=ITEMS, Item={**item, "n": N(0)})
    ddb_faults.configure(conflicts=True, tx_delay_ms=HOLD_MS)
    transaction = [
        {"Update": {"TableName": ITEMS, "Key": item, "UpdateExpression": "SET n = :one",
                    "ExpressionAttributeValues": {":one": N(1)}}},
        {"Put": {"TableName": ORDERS, "Item": {"pk": order_pk, "sk": S("1"), "status": S("new")}}}]
    with ThreadPoolExecutor(1) as pool:
        tx = pool.submit(ddb.transact_write_items, TransactItems=transaction)
        assert ddb_faults.wait_for("TransactWriteItems")  # the transaction now holds both items

        err = error_of(ddb.update_item, TableName=ITEMS, Key=item, UpdateExpression="SET n = :v",
                       ExpressionAttributeValues={":v": N(99)})
        assert err.response["Error"] == {"Code": "TransactionConflictException", "Message": CONFLICT}
        assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        # The Put's key is projected from its Item: the same (pk, sk) by Key conflicts, another sk does not.
        err = error_of(ddb.delete_item, TableName=ORDERS, Key={"pk": order_pk, "sk": S("1")})
        assert err.response["Error"]["Code"] == "TransactionConflictException"
        ddb.put_item(TableName=ORDERS, Item={"pk": order_pk, "sk": S("2")})
        # Reads never conflict, and the refused write changed nothing.
        assert ddb.get_item(TableName=ITEMS, Key=item)["Item"]["n"] == N(0)

        ddb_faults.release()
        tx.result(timeout=30)
    assert ddb.get_item(TableName=ITEMS, Key=item)["Item"]["n"] == N(1)
    assert ddb_faults.counters()["faults"] == {"TransactionConflictException": {"UpdateItem": 1, "DeleteItem": 1}}


def test_transaction_on_an_item_with_a_plain_write_in_flight_is_cancelled(ddb_faults, ddb, key):
    other, busy = key("other"), key("busy")
    ddb_faults.configure(conflicts=True, write_delay_ms=HOLD_MS)
    with ThreadPoolExecutor(1) as pool:
        write = pool.submit(ddb.put_item, TableName=ITEMS, Item={**busy, "n": N(5)})
        assert ddb_faults.wait_for("PutItem")
        err = error_of(ddb.transact_write_items, TransactItems=[
            {"Put": {"TableName": ITEMS, "Item": {**other, "n": N(1)}}},
            {"Update": {"TableName": ITEMS, "Key": busy, "UpdateExpression": "SET n = :v",
                        "ExpressionAttributeValues": {":v": N(7)}}}])
        ddb_faults.release()
        write.result(timeout=30)
    # botocore parses the modeled CancellationReasons, one per item in request order.
    assert err.response["Error"]["Code"] == "TransactionCanceledException"
    assert err.response["Error"]["Message"] == ("Transaction cancelled, please refer cancellation reasons for "
                                                "specific reasons [None, TransactionConflict]")
    assert err.response["CancellationReasons"] == [{"Code": "None"},
                                                   {"Code": "TransactionConflict", "Message": CONFLICT}]
    assert "Item" not in ddb.get_item(TableName=ITEMS, Key=other)  # nothing of the transaction was applied
    assert ddb.get_item(TableName=ITEMS, Key=busy)["Item"]["n"] == N(5)


def test_overlapping_transactions_one_commits_the_other_is_cancelled_at_the_shared_item(ddb_faults, key):
    shared, only_a, only_b = (key(n)["pk"]["S"] for n in ("shared", "a", "b"))
    orders = {"A": [only_a, shared], "B": [shared, only_b]}  # the shared item at index 1 in A, 0 in B

    def transaction(name: str) -> str:
        with TransactWrite(connection=Connection(region=REGION)) as tx:
            for pk in orders[name]:
                tx.save(Tally(pk, n=1))
        return name

    ddb_faults.configure(conflicts=True, tx_delay_ms=HOLD_MS)
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(transaction, name) for name in orders}
        done, _ = wait(futures.values(), timeout=30, return_when=FIRST_COMPLETED)  # the loser, at once
        ddb_faults.release()                                                        # the winner goes on
        wait(futures.values(), timeout=30)
    failed = {name: f.exception() for name, f in futures.items() if f.exception() is not None}
    assert len(failed) == 1, failed
    (loser, error), = failed.items()
    winner = "B" if loser == "A" else "A"
    assert futures[loser] in done  # it was refused while the winner still held the shared item
    assert futures[winner].result() == winner
    assert isinstance(error, TransactWriteError) and error.cause_response_code == "TransactionCanceledException"
    reasons = [(r.code, r.message) if r else None for r in error.cancellation_reasons]
    assert reasons == [None if pk != shared else ("TransactionConflict", CONFLICT) for pk in orders[loser]]
    for pk in orders[winner]:
        assert Tally.get(pk, consistent_read=True).n == 1
    exclusive = only_a if loser == "A" else only_b
    assert Tally.count(exclusive) == 0
    assert ddb_faults.counters()["faults"] == {
        "TransactionCanceledException:TransactionConflict": {"TransactWriteItems": 1}}


def test_non_overlapping_transactions_both_commit(ddb_faults, ddb, key):
    items = [key("left"), key("right")]
    ddb_faults.configure(conflicts=True, tx_delay_ms=HOLD_MS)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(ddb.transact_write_items, TransactItems=[
            {"Put": {"TableName": ITEMS, "Item": {**item, "n": N(1)}}}]) for item in items]
        assert ddb_faults.wait_for("TransactWriteItems", 2)  # both in flight at once
        ddb_faults.release()
        for future in futures:
            future.result(timeout=30)
    for item in items:
        assert ddb.get_item(TableName=ITEMS, Key=item)["Item"]["n"] == N(1)
    assert ddb_faults.counters()["faults"] == {}


# ---- throttles and errors -----------------------------------------------------------------------

@pytest.mark.parametrize("error, status, message", [
    ("ProvisionedThroughputExceededException", 400, "The level of configured provisioned throughput for the table "
     "was exceeded. Consider increasing your provisioning level with the UpdateTable API."),
    ("ThrottlingException", 400, "Rate of requests exceeds the allowed throughput."),
    ("InternalServerError", 500, "Internal server error"),
])
def test_counted_rule_fails_exactly_the_next_n_matching_calls(stack, ddb_faults, ddb, key, error, status, message):
    item = key("counted")
    ddb_faults.configure(rules=[{"operation": "PutItem", "table": f"{RUN}-items", "next": 3, "error": error}])
    for _ in range(3):
        err = error_of(ddb.put_item, TableName=ITEMS, Item=item)
        assert err.response["Error"] == {"Code": error, "Message": message}
        assert err.response["ResponseMetadata"]["HTTPStatusCode"] == status
        ddb.get_item(TableName=ITEMS, Key=item)                          # another operation: not matched
        ddb.put_item(TableName=ORDERS, Item={**item, "sk": S("1")})      # another table: not matched
    ddb.put_item(TableName=ITEMS, Item=item)
    state = control(stack, "GET")
    assert state["config"]["rules"][0]["next"] == 0
    assert state["counters"]["faults"] == {error: {"PutItem": 3}}


def test_injected_errors_have_aws_exact_wire_shape(stack, ddb_faults, key):
    types = {"ProvisionedThroughputExceededException": DDB + "ProvisionedThroughputExceededException",
             "ThrottlingException": "com.amazon.coral.availability#ThrottlingException",
             "InternalServerError": DDB + "InternalServerError"}
    for error, type_ in types.items():
        control(stack, "POST", body={"rules": [{"operation": "GetItem", "table": "*", "next": 1, "error": error}]})
        resp = raw(stack.ddb_faults_url, "GetItem", {"TableName": ITEMS, "Key": key()})
        assert resp.status == (500 if error == "InternalServerError" else 400)
        assert list(json.loads(resp.data)) == ["__type", "message"] and json.loads(resp.data)["__type"] == type_
        assert resp.headers["Content-Type"] == "application/x-amz-json-1.0"
        assert resp.headers["x-amz-crc32"] == str(zlib.crc32(resp.data))
        assert len(resp.headers["x-amzn-RequestId"]) == 52
    bad = urllib3.request("POST", f"{stack.ddb_faults_url}/_local/faults", body=b'{"rules": [{"rate": 2}]}')
    assert bad.status == 400


def test_rate_rule_hits_about_its_share_reproducibly_with_a_seed(stack, ddb_faults, ddb, key):
    item = key("rated")
    rules = [{"operation": "GetItem", "table": f"{RUN}-items", "rate": 0.25, "error": "ThrottlingException"}]

    def run() -> list[int]:
        control(stack, "POST", "/reset")
        control(stack, "POST", body={"rules": rules, "seed": 1234})
        failed = []
        for i in range(200):
            try:
                ddb.get_item(TableName=ITEMS, Key=item)
            except ClientError as err:
                assert err.response["Error"]["Code"] == "ThrottlingException"
                failed.append(i)
        counters = control(stack, "GET")["counters"]
        assert counters["faults"] == {"ThrottlingException": {"GetItem": len(failed)}}
        assert counters["forwarded"]["GetItem"] == 200 - len(failed)
        return failed

    first = run()
    assert 25 <= len(first) <= 75  # 50 expected
    assert run() == first


def test_item_write_rate_throttles_a_hot_item_not_a_cold_one(ddb_faults, ddb, key):
    hot, cold, fresh = key("hot"), key("cold"), key("fresh")
    ddb_faults.configure(item_write_rate=0.1)  # one write per 10 s per item, burst 1
    outcomes = []
    for _i in range(5):
        try:
            ddb.update_item(TableName=ITEMS, Key=hot, UpdateExpression="ADD n :one",
                            ExpressionAttributeValues={":one": N(1)})
            outcomes.append("ok")
        except ClientError as err:
            assert err.response["Error"] == {"Code": "ProvisionedThroughputExceededException",
                                             "Message": THROTTLE_ON_DEMAND}  # the tables are on-demand
            outcomes.append("throttled")
    assert outcomes[0] == "ok" and "throttled" in outcomes
    ddb.put_item(TableName=ITEMS, Item={**cold, "n": N(1)})
    assert ddb.get_item(TableName=ITEMS, Key=hot)["Item"]["n"] == N(outcomes.count("ok"))

    err = error_of(ddb.transact_write_items, TransactItems=[
        {"Put": {"TableName": ITEMS, "Item": {**fresh, "n": N(1)}}},
        {"Update": {"TableName": ITEMS, "Key": hot, "UpdateExpression": "ADD n :one",
                    "ExpressionAttributeValues": {":one": N(1)}}}])
    assert err.response["Error"]["Code"] == "TransactionCanceledException"
    assert err.response["CancellationReasons"] == [{"Code": "None"},
                                                   {"Code": "ThrottlingError", "Message": THROTTLE_ON_DEMAND}]
    ddb.put_item(TableName=ITEMS, Item={**fresh, "n": N(2)})  # the cancelled transaction took no token
    faults = ddb_faults.counters()["faults"]
    assert faults["ProvisionedThroughputExceededException"] == {"UpdateItem": outcomes.count("throttled")}
    assert faults["TransactionCanceledException:ThrottlingError"] == {"TransactWriteItems": 1}


def test_partition_write_rate_is_shared_by_every_item_of_a_partition_key(ddb_faults, ddb):
    """Items with one partition key and different sort keys share its limit; another key has its own."""
    hot, cold = f"team-{uuid.uuid4().hex[:6]}#00", f"team-{uuid.uuid4().hex[:6]}#01"
    ddb_faults.configure(partition_write_rate=0.1)  # one write per 10 s per partition key, burst 1
    ddb.put_item(TableName=ORDERS, Item={"pk": S(hot), "sk": S("a")})
    err = error_of(ddb.put_item, TableName=ORDERS, Item={"pk": S(hot), "sk": S("b")})   # another item, same key
    assert err.response["Error"] == {"Code": "ProvisionedThroughputExceededException",
                                     "Message": THROTTLE_ON_DEMAND}
    ddb.put_item(TableName=ORDERS, Item={"pk": S(cold), "sk": S("a")})                # another key: its own
    counters = ddb_faults.counters()
    assert counters["faults"] == {"ProvisionedThroughputExceededException": {"PutItem": 1}}
    assert counters["hottest_partitions"] == {f'{ORDERS} {{"S":"{hot}"}}': 1, f'{ORDERS} {{"S":"{cold}"}}': 1}


def test_reset_restores_pass_through(stack, ddb_faults, ddb, key):
    item = key("reset")
    control(stack, "POST", body={"conflicts": True, "tx_delay_ms": 5, "item_write_rate": 0.1, "seed": 3,
                                 "rules": [{"operation": "*", "table": f"{RUN}-items", "rate": 1.0,
                                            "error": "InternalServerError"}]})
    assert error_of(ddb.put_item, TableName=ITEMS, Item=item).response["ResponseMetadata"]["HTTPStatusCode"] == 500
    state = control(stack, "POST", "/reset")
    assert state["config"] == DEFAULTS
    assert state["counters"]["faults"] == {} and state["counters"]["forwarded"] == {}
    for n in range(5):
        ddb.put_item(TableName=ITEMS, Item={**item, "n": N(n)})
        ddb.transact_write_items(TransactItems=[{"Update": {
            "TableName": ITEMS, "Key": item, "UpdateExpression": "ADD n :one",
            "ExpressionAttributeValues": {":one": N(1)}}}])
    assert ddb.get_item(TableName=ITEMS, Key=item)["Item"]["n"] == N(5)
    assert ddb_faults.counters()["faults"] == {}


def test_rft_hub_reaches_dynamodb_through_the_fault_layer(stack, ddb_faults, make_team):
    assert os.environ["AWS_ENDPOINT_URL_DYNAMODB"] == stack.ddb_faults_url
    make_team("via-fault-layer")
    forwarded = ddb_faults.counters()["forwarded"]
    assert forwarded.get("PutItem", 0) + forwarded.get("TransactWriteItems", 0) >= 1, forwarded
