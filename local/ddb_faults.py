"""A fault layer in front of DynamoDB Local: transaction conflicts and throttles, as AWS returns them.

DynamoDB Local applies each request atomically and has no throughput limits, so it never answers
TransactionConflictException, a TransactionCanceledException for a conflict, or a throttle; real
DynamoDB does, and the code handling them would otherwise never run locally. This proxy forwards
every request byte for byte and, only when configured, refuses some without forwarding, with AWS's
exact error shapes. Default: everything off (pure pass-through). Controls, on the same port and
never forwarded: GET/POST /_local/faults, POST /_local/faults/reset and /_local/faults/release
(docs/local-stack.md, "DynamoDB fault layer"); in-process: configure(**kw), reset(), counters(), release(), wait_for().
A rule with `"after": true` forwards the request and then answers its error: the write was applied and
its answer lost (an unknown outcome, as a 5xx or a read timeout after the write landed is on AWS).

    python -m local.ddb_faults --port 8006 --upstream http://127.0.0.1:8001
"""
from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import random
import threading
import time
import zlib
from collections import Counter
from urllib.parse import urlsplit

import urllib3
from werkzeug.exceptions import BadRequest
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

DDB = "com.amazonaws.dynamodb.v20120810#"
THROTTLE_PROVISIONED = ("The level of configured provisioned throughput for the table was exceeded. "
                        "Consider increasing your provisioning level with the UpdateTable API.")
# What AWS says instead when an on-demand table (every rft-hub table) throttles a hot key.
THROTTLE_ON_DEMAND = ("Throughput exceeds the current capacity of your table or index. DynamoDB is automatically "
                      "scaling your table or index so please try again shortly. If exceptions persist, check if you "
                      "have a hot key: https://docs.aws.amazon.com/amazondynamodb/latest/developerguide/"
                      "bp-partition-key-design.html.")
ERRORS = {  # rule error name -> (status, __type, message)
    "ProvisionedThroughputExceededException": (400, DDB + "ProvisionedThroughputExceededException",
                                               THROTTLE_PROVISIONED),
    "ThrottlingException": (400, "com.amazon.coral.availability#ThrottlingException",
                            "Rate of requests exceeds the allowed throughput."),
    "InternalServerError": (500, DDB + "InternalServerError", "Internal server error"),
}
CONFLICT = "Transaction is ongoing for the item"
PLAIN_WRITES = {"PutItem", "UpdateItem", "DeleteItem"}
TX = "TransactWriteItems"
DEFAULTS = {"conflicts": False, "tx_delay_ms": 0, "write_delay_ms": 0, "rules": [], "item_write_rate": None,
            "partition_write_rate": None, "seed": None}
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade"}
# werkzeug's server writes its own Date and Server and computes Content-Length from the body.
NOT_COPIED_BACK = HOP_BY_HOP | {"content-length", "date", "server"}
AUTH_HEADERS = ("Authorization", "X-Amz-Date", "X-Amz-Security-Token")


class FaultProxy:
    """A WSGI app: serve it with local.servers.ThreadServer, or `python -m local.ddb_faults`."""

    def __init__(self, upstream: str) -> None:
        url = urlsplit(upstream)
        # Bounded reuse of upstream connections; under a burst extra ones are opened and dropped.
        self.pool = urllib3.HTTPConnectionPool(url.hostname, url.port or 80, maxsize=16, retries=False,
                                               timeout=urllib3.Timeout(connect=5, read=120))
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)  # in-flight changes and release() wake waiters
        self.tables: dict[tuple, tuple[list[str], bool]] = {}  # (credential scope, table) -> (key names, on-demand)
        self.held = {"tx": Counter(), "write": Counter()}       # (table, canonical key) -> calls in flight
        self.in_flight: Counter = Counter()                     # operation -> calls in flight
        self.generation = 0                                     # bumped by release(): ends every delay
        self.reset()

    # ---- Python API ----------------------------------------------------------------------------

    def configure(self, **kw) -> dict:
        unknown = set(kw) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        for name in ("tx_delay_ms", "write_delay_ms"):
            if name in kw and not (isinstance(kw[name], int) and kw[name] >= 0):
                raise ValueError(f"{name} must be an integer >= 0")
        rate = kw.get("item_write_rate")
        if rate is not None and not (isinstance(rate, (int, float)) and rate > 0):
            raise ValueError("item_write_rate must be a number > 0 (writes per second per item) or null")
        rules = [_rule(r) for r in kw.get("rules", [])]
        with self.lock:
            self.config.update(copy.deepcopy(kw))
            if "rules" in kw:
                self.config["rules"] = rules
            if "seed" in kw:
                self.rng = random.Random(kw["seed"])
            if "item_write_rate" in kw:
                self.buckets = {}
        return self.state()

    def reset(self) -> None:
        """Everything off, counters zeroed, held calls released. Calls in flight still finish cleanly."""
        with self.cond:
            self.config = copy.deepcopy(DEFAULTS)
            self.rng = random.Random()
            self.buckets: dict[tuple, tuple[float, float]] = {}
            self.faults: Counter = Counter()     # (fault, operation) -> n
            self.forwarded: Counter = Counter()  # operation -> n
            self.writes_by_partition: Counter = Counter()   # (table, partition key) -> writes admitted
            self.generation += 1
            self.cond.notify_all()

    def counters(self) -> dict:
        with self.lock:
            faults: dict[str, dict[str, int]] = {}
            for (fault, op), n in sorted(self.faults.items()):
                faults.setdefault(fault, {})[op] = n
            hottest = {f"{table} {key}": n for (table, key), n in self.writes_by_partition.most_common(3)}
            return {"faults": faults, "forwarded": dict(self.forwarded),
                    "in_flight": {op: n for op, n in self.in_flight.items() if n},
                    "hottest_partitions": hottest}

    def state(self) -> dict:
        with self.lock:
            config = copy.deepcopy(self.config)
        return {"config": config, "counters": self.counters()}

    def release(self) -> None:
        """Ends every tx_delay_ms / write_delay_ms now, so a test decides when a held call goes on."""
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def wait_for(self, operation: str, count: int = 1, timeout: float = 30) -> bool:
        """Blocks until `count` calls of `operation` are in flight (admitted, holding their items)."""
        with self.cond:
            return self.cond.wait_for(lambda: self.in_flight[operation] >= count, timeout)

    # ---- HTTP ----------------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        request = Request(environ)
        response = self._control(request) if request.path.startswith("/_local/") else self._dynamodb(request)
        return response(environ, start_response)

    def _control(self, request: Request) -> Response:
        path, method = request.path.rstrip("/"), request.method
        if path == "/_local/faults" and method == "POST":
            try:
                body = request.get_json(force=True)
                if not isinstance(body, dict):
                    raise ValueError("expected a JSON object")
                self.configure(**body)
            except (BadRequest, ValueError, TypeError) as exc:
                return _json({"error": str(exc)}, 400)
        elif path == "/_local/faults/reset" and method == "POST":
            self.reset()
        elif path == "/_local/faults/release" and method == "POST":
            self.release()
        elif path != "/_local/faults" or method != "GET":
            return _json({"error": f"no route {method} {request.path}"}, 404)
        return _json(self.state())

    def _dynamodb(self, request: Request) -> Response:
        body = request.get_data(cache=False)
        op = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            payload = None
        if not isinstance(payload, dict):  # not ours to judge: DynamoDB Local answers it
            return self._forward(request, body, op)
        if op in ("CreateTable", "DeleteTable"):
            with self.lock:
                self.tables = {k: v for k, v in self.tables.items() if k[1] != payload.get("TableName")}
        refused, after = self._rule_fault(op, _tables(payload))
        if refused is not None and not after:
            return refused
        if op in PLAIN_WRITES or op == TX:
            answer = self._write(request, body, op, payload)
        else:
            answer = self._forward(request, body, op)
        # `after`: the request was applied (or refused) by DynamoDB, and its answer is lost on the
        # way back -- an unknown outcome, as a 500 or a read timeout after the write landed is on AWS.
        return refused if refused is not None else answer

    def _rule_fault(self, op: str, tables: set[str]) -> tuple[Response | None, bool]:
        with self.lock:
            for rule in self.config["rules"]:
                if rule["operation"] not in ("*", op):
                    continue
                if rule["table"] != "*" and not any(t.endswith(rule["table"]) for t in tables):
                    continue
                if "next" in rule:
                    if rule["next"] <= 0:
                        continue
                    rule["next"] -= 1
                elif self.rng.random() >= rule["rate"]:
                    continue
                self.faults[(rule["error"] + (" after applying" if rule["after"] else ""), op)] += 1
                status, type_, message = ERRORS[rule["error"]]
                return _aws_error(status, {"__type": type_, "message": message}), rule["after"]
        return None, False

    # ---- writes: conflicts and per-item throughput ---------------------------------------------

    def _write(self, request: Request, body: bytes, op: str, payload: dict) -> Response:
        items = self._items(op, payload, {h: request.headers[h] for h in AUTH_HEADERS if h in request.headers})
        if items is None:  # malformed or unknown table: DynamoDB Local gives the right validation error
            return self._forward(request, body, op)
        kind = "tx" if op == TX else "write"
        with self.cond:
            refused = self._admit(op, kind, items)
            if refused is None:
                self.in_flight[op] += 1
                self.held[kind].update(set(items))
                self.cond.notify_all()
            delay = self.config["tx_delay_ms" if kind == "tx" else "write_delay_ms"]
        if refused is not None:
            return refused
        try:
            self._hold(delay)  # before forwarding: the items stay held through the whole window
            return self._forward(request, body, op)
        finally:
            with self.cond:
                self.in_flight[op] -= 1
                for item in set(items):
                    self.held[kind][item] -= 1
                    if not self.held[kind][item]:
                        del self.held[kind][item]
                self.cond.notify_all()

    def _admit(self, op: str, kind: str, items: list[tuple[str, str]]) -> Response | None:
        """Under the lock: refuse the call as AWS would, or take its throughput tokens."""
        conflicts, now = self.config["conflicts"], time.monotonic()
        if not items:  # conflicts and item throttles are off: nothing to judge
            return None
        if kind == "write":
            if conflicts and self.held["tx"][items[0]]:
                self.faults[("TransactionConflictException", op)] += 1
                return _aws_error(400, {"__type": DDB + "TransactionConflictException", "message": CONFLICT})
            if self._tokens(items[0], now) < 1:
                self.faults[("ProvisionedThroughputExceededException", op)] += 1
                return _aws_error(400, {"__type": DDB + "ProvisionedThroughputExceededException",
                                        "message": self._throttle_message(items[0])})
        else:
            # A transaction conflicts with another transaction holding the item, and with a plain
            # write to it still in flight (AWS: TransactionCanceledException, reason per item).
            if conflicts:
                reasons = [("TransactionConflict", CONFLICT) if self.held["tx"][i] or self.held["write"][i] else None
                           for i in items]
                if any(reasons):
                    return self._cancelled(op, reasons)
            # A throttled item cancels the whole transaction with ThrottlingError at its index.
            reasons = [None if self._tokens(i, now) >= 1 else ("ThrottlingError", self._throttle_message(i))
                       for i in items]
            if any(reasons):
                return self._cancelled(op, reasons)
        for item in set(items):
            self._take_token(item, now)
        return None

    def _cancelled(self, op: str, reasons: list) -> Response:
        codes = [r[0] if r else "None" for r in reasons]
        self.faults[(f"TransactionCanceledException:{next(c for c in codes if c != 'None')}", op)] += 1
        return _aws_error(400, {
            "__type": DDB + "TransactionCanceledException",
            "Message": f"Transaction cancelled, please refer cancellation reasons for specific reasons "
                       f"[{', '.join(codes)}]",
            "CancellationReasons": [{"Code": r[0], "Message": r[1]} if r else {"Code": "None"} for r in reasons]})

    def _tokens(self, item, now: float) -> float:
        """What `item` may still write now: the smaller of its own bucket (`item_write_rate`) and its
        partition key's (`partition_write_rate`, shared by every item with that partition key)."""
        return min(self._bucket(("item", item), "item_write_rate", now),
                   self._bucket(("partition", item[0], item[2]), "partition_write_rate", now))

    def _bucket(self, name, setting: str, now: float) -> float:
        """A token bucket standing in for a partition's write limit: `setting` writes a second,
        burst = the rate but at least one write, so a rate below 1/s still lets a cold key be written."""
        rate = self.config[setting]
        if rate is None:
            return float("inf")
        tokens, last = self.buckets.get(name, (max(rate, 1.0), now))
        return min(max(rate, 1.0), tokens + (now - last) * rate)

    def _take_token(self, item, now: float) -> None:
        self.writes_by_partition[(item[0], item[2])] += 1
        for name, setting in ((("item", item), "item_write_rate"),
                              (("partition", item[0], item[2]), "partition_write_rate")):
            if self.config[setting] is not None:
                self.buckets[name] = (self._bucket(name, setting, now) - 1, now)

    def _throttle_message(self, item: tuple[str, str]) -> str:
        on_demand = next((v[1] for k, v in self.tables.items() if k[1] == item[0]), False)
        return THROTTLE_ON_DEMAND if on_demand else THROTTLE_PROVISIONED

    def _items(self, op: str, payload: dict, auth: dict) -> list[tuple[str, str, str]] | None:
        """Each written item as (table, canonical JSON of its key, of its partition key), in request
        order; [] when nothing is judged per item (conflicts and write limits off), None when the
        request is malformed."""
        with self.lock:
            if not self.config["conflicts"] and self.config["item_write_rate"] is None \
                    and self.config["partition_write_rate"] is None:
                return []
        items = []
        try:
            entries = ([("Put" if op == "PutItem" else "Key", payload)] if op in PLAIN_WRITES else
                       [(kind, spec) for entry in payload["TransactItems"] for kind, spec in entry.items()])
            for kind, spec in entries:
                info = self._table(spec["TableName"], auth)
                if info is None:
                    return None
                key = {name: spec["Item"][name] for name in info[0]} if kind == "Put" else spec["Key"]
                items.append((spec["TableName"], json.dumps(key, sort_keys=True, separators=(",", ":")),
                              json.dumps(key[info[0][0]], sort_keys=True, separators=(",", ":"))))
        except (KeyError, TypeError, AttributeError, ValueError, urllib3.exceptions.HTTPError):
            return None
        return items

    def _table(self, table: str, auth: dict) -> tuple[list[str], bool] | None:
        """Key attribute names and billing mode, from one DescribeTable upstream per table.

        DynamoDB Local keeps a separate database per access key and region, so the lookup is made
        with the caller's own auth headers (it does not verify signatures) and cached per scope."""
        scope = auth.get("Authorization", "").partition("Credential=")[2].split(",")[0]
        scope = tuple(scope.split("/")[0:3:2])  # (access key id, region)
        with self.lock:
            if (scope, table) in self.tables:
                return self.tables[(scope, table)]
        resp = self.pool.urlopen("POST", "/", body=json.dumps({"TableName": table}).encode(), headers={
            **auth, "Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "DynamoDB_20120810.DescribeTable"})
        if resp.status != 200:
            return None
        desc = json.loads(resp.data)["Table"]
        info = ([k["AttributeName"] for k in desc["KeySchema"]],
                desc.get("BillingModeSummary", {}).get("BillingMode") == "PAY_PER_REQUEST")
        with self.lock:
            self.tables[(scope, table)] = info
        return info

    def _hold(self, ms: int) -> None:
        if ms and ms > 0:
            with self.cond:
                generation = self.generation
                self.cond.wait_for(lambda: self.generation != generation, ms / 1000)

    def _forward(self, request: Request, body: bytes, op: str) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        path = request.environ.get("RAW_URI") or request.full_path
        try:
            upstream = self.pool.urlopen(request.method, path, body=body, headers=headers, redirect=False,
                                         decode_content=False, assert_same_host=False)
        except urllib3.exceptions.HTTPError as exc:
            return Response(f"DynamoDB Local unreachable: {exc}", status=502)
        with self.lock:
            self.forwarded[op or request.path] += 1
        return Response(upstream.data, status=upstream.status,
                        headers=[(k, v) for k, v in upstream.headers.items() if k.lower() not in NOT_COPIED_BACK])


def _rule(rule: dict) -> dict:
    if not isinstance(rule, dict) or rule.get("error") not in ERRORS:
        raise ValueError(f"each rule needs an error in {sorted(ERRORS)}: {rule!r}")
    if ("rate" in rule) == ("next" in rule):
        raise ValueError(f"each rule needs exactly one of rate (0..1) or next (a count): {rule!r}")
    if ("rate" in rule and not 0 <= float(rule["rate"]) <= 1) or ("next" in rule and int(rule["next"]) < 0):
        raise ValueError(f"rate must be within 0..1 and next >= 0: {rule!r}")
    if not isinstance(rule.get("after", False), bool):
        raise ValueError(f"after must be true or false: {rule!r}")
    return {"operation": "*", "table": "*", "after": False, **rule}


def _tables(payload: dict) -> set[str]:
    names = {payload["TableName"]} if isinstance(payload.get("TableName"), str) else set()
    if isinstance(payload.get("RequestItems"), dict):
        names.update(payload["RequestItems"])
    for entry in payload.get("TransactItems") or []:
        if isinstance(entry, dict):
            names.update(spec["TableName"] for spec in entry.values()
                         if isinstance(spec, dict) and isinstance(spec.get("TableName"), str))
    return names


def _aws_error(status: int, payload: dict) -> Response:
    """As DynamoDB sends an error: compact JSON 1.0, a request id, and the CRC32 botocore checks."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(body, status=status, headers={
        "Content-Type": "application/x-amz-json-1.0", "x-amz-crc32": str(zlib.crc32(body)),
        "x-amzn-RequestId": base64.b32encode(os.urandom(35)).decode()[:52]})


def _json(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, content_type="application/json")


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args) -> None:  # a line per DynamoDB call would drown `make run` and test output
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8006)
    parser.add_argument("--upstream", default="http://127.0.0.1:8001")
    args = parser.parse_args()
    make_server("127.0.0.1", args.port, FaultProxy(args.upstream), threaded=True,
                request_handler=QuietHandler).serve_forever()


if __name__ == "__main__":
    main()
