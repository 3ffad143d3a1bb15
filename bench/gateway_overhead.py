"""Gateway overhead: the same chat request straight to the local Bedrock and through rft-hub,
in one run: in-process (the Lambda handler via chalice.test) and over HTTP (`chalice local`'s
server). Reports latency percentiles, the added latency, and DynamoDB round trips per call.

Targets (issue #6), warm path: added p50 <= 5 ms in-process against DynamoDB Local; at most 2
DynamoDB round trips per call; no DynamoDB read for auth or prices.
"""
from __future__ import annotations

import json

from bench.common import ROOT, percentiles, start_stack, timed

N = 300
BODY = {"model": "openai.gpt-oss-20b", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 8}


def run(n: int = N) -> dict:
    stack, admin_key = start_stack(fault_layer=False)
    import openai
    from aws_bedrock_token_generator import provide_token
    from chalice.test import Client
    from pynamodb.signals import pre_dynamodb_send

    from app import app
    from bench.common import new_team

    _, key = new_team(admin_key)
    direct = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.bedrock.port}/v1",
                           api_key=provide_token(region="us-west-2"), max_retries=0)
    over_http = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    calls: list[str] = []
    pre_dynamodb_send.connect(lambda sender, operation_name, **kw: calls.append(operation_name), weak=False)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps(BODY)
    with Client(app, stage_name="local", project_dir=str(ROOT)) as local:
        def in_process():
            r = local.http.post("/v1/chat/completions", headers=headers, body=body)
            assert r.status_code == 200, r.body

        for _ in range(20):   # warm: connections, caches
            direct.chat.completions.create(**BODY)
            in_process()
            over_http.chat.completions.create(**BODY)
        base = timed(lambda: direct.chat.completions.create(**BODY), n)
        calls.clear()
        inproc = timed(in_process, n)
        ddb_ops = list(calls)
        http = timed(lambda: over_http.chat.completions.create(**BODY), n)
    stack.stop()
    p_base, p_in, p_http = percentiles(base), percentiles(inproc), percentiles(http)
    return {"benchmark": "gateway_overhead", "requests_each": n,
            "direct_to_local_bedrock_ms": p_base, "through_rft_hub_in_process_ms": p_in,
            "through_rft_hub_http_ms": p_http,
            "added_in_process_ms": {k: round(p_in[k] - p_base[k], 2) for k in p_base},
            "added_http_ms": {k: round(p_http[k] - p_base[k], 2) for k in p_base},
            "dynamodb_round_trips_per_call": round(len(ddb_ops) / n, 2),
            "dynamodb_operations": sorted(set(ddb_ops)),
            "targets": {"added_p50_in_process_ms": 5, "dynamodb_round_trips_per_call": 2}}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
