"""Where the data plane's time goes (issue #14): one call handled in-process, exactly as the data
plane's worker thread handles it (`chalicelib/dataplane/app._handle`: the key, the body, the gateway),
against DynamoDB Local and the local Bedrock, the team under a budget. The admission against the
budget, the upstream call and the ledger write are timed apart (by wrapping them, for this
measurement only); what is left is rft-hub's own code.

- streamed: to the first event in hand = the admission (in memory against the instance's slice; a
  DynamoDB write only when a slice is taken) + opening the upstream (to its first event) + the rest;
- plain: to the answer = the admission + the upstream call + the rest; the booking (the ledger
  entry, one PutItem, and the cost on the slice) runs after the answer is sent, timed on its own.
"""
from __future__ import annotations

import json
import time

from bench.common import ROOT, percentiles, start_stack

N = 200
MESSAGES = [{"role": "user", "content": "Say hi."}]


def run(n: int = N) -> dict:
    stack, admin_key = start_stack(fault_layer=False)
    from chalice.test import Client

    from app import app
    from bench.common import new_team
    from chalicelib.dataplane.app import _handle
    from chalicelib.inference import gateway
    from chalicelib.spend import ledger, slices

    team_id, key = new_team(admin_key, "bench-breakdown")
    with Client(app, stage_name="local", project_dir=str(ROOT)) as c:
        r = c.http.put(f"/v1/admin/teams/{team_id}/budget",
                       headers={"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"},
                       body=json.dumps({"limit_usd": "100000", "alert_thresholds": []}))
        assert r.status_code == 200, r.body
    spent: dict[str, list[float]] = {}

    def timed(owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent.setdefault(label, []).append((time.perf_counter() - started) * 1000)
        setattr(owner, name, wrapper)

    for owner, name, label in ((slices.Lender, "admit", "admission"), (gateway, "open_upstream", "upstream"),
                               (gateway, "send", "upstream"), (ledger, "put", "ledger")):
        timed(owner, name, label)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}

    def call(stream: bool) -> float:
        body = json.dumps({"model": "openai.gpt-oss-20b", "max_tokens": 8, "messages": MESSAGES, "stream": stream})
        started = time.perf_counter()
        result = _handle("/v1/chat/completions", headers, body.encode(), "bench", 25.0)
        if stream:
            events = iter(result)
            next(events)
            took = (time.perf_counter() - started) * 1000
            for _ in events:
                pass
            return took
        took = (time.perf_counter() - started) * 1000
        assert result.status_code == 200, result.body
        booking = time.perf_counter()
        result.book()                            # the booking, after the answer (timed apart)
        spent.setdefault("booking", []).append((time.perf_counter() - booking) * 1000)
        return took

    out = {}
    try:
        for stream in (True, False):
            for _ in range(20):                  # warm: connections, caches
                call(stream)
            spent.clear()
            totals = [call(stream) for _ in range(n)]
            parts = ("admission", "upstream")
            rest = [t - sum(spent[p][i] for p in parts) for i, t in enumerate(totals)]
            name = "streamed_first_event" if stream else "plain_answer"
            out[name] = {"total_ms": percentiles(totals), **{f"{p}_ms": percentiles(spent[p]) for p in parts},
                         "rft_hub_code_ms": percentiles(rest)}
            if not stream:
                out[name]["booking_after_answer_ms"] = percentiles(spent["booking"])
                out[name]["ledger_write_ms"] = percentiles(spent["ledger"])
    finally:
        stack.stop()
    return {"benchmark": "dataplane_breakdown", "calls_each": n, **out}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
