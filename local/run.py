"""`make run`: the whole local stack in the foreground. Ctrl-C stops every child, at any moment.

Persists to .local/ (RFT_LOCAL_STATE: another directory): DynamoDB Local's files (ddb/), the datasets
bucket (s3/, restored at start, saved on stop), the local Bedrock (bedrock/) and the keys
(stack.json), so a second `make run` picks up where it left off. children.json lists the running
servers; a run that could not clean up (SIGKILL) leaves it, and the next run stops those first.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from local import servers
from local.example_graders import FUNCTIONS as EXAMPLE_GRADERS
from local.example_graders import arn as example_arn

LOCAL = Path(os.environ.get("RFT_LOCAL_STATE") or servers.LOCAL_DIR)
STACK_JSON = LOCAL / "stack.json"
DEFAULT_PORTS = {"api": 8000, "dynamodb": 8001, "moto": 8002, "bedrock": 8003, "lambda": 8004, "slack": 8005,
                 "ddb_faults": 8006, "dataplane": 8007}
DEMO_SLACK = {"slack_team_id": "TLOCALDEMO", "channel_ids": ["CDEMO"]}
APP_ENV = servers.local_stage_env()


def _ports() -> dict[str, int]:
    return {name: int(os.environ.get(f"LOCAL_PORT_{name.upper()}", port)) for name, port in DEFAULT_PORTS.items()}


def _http(method: str, url: str, token: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _demo_team(base_url: str, admin_key: str, previous: dict) -> tuple[str, str]:
    if previous.get("demo_key") and _http("GET", f"{base_url}/v1/me", previous["demo_key"])[0] == 200:
        return previous["demo_team_id"], previous["demo_key"]
    status, team = _http("POST", f"{base_url}/v1/admin/teams", admin_key, {"name": "demo"})
    if status != 201:
        raise RuntimeError(f"could not create the demo team: {status} {team}")
    status, key = _http("POST", f"{base_url}/v1/admin/teams/{team['id']}/keys", admin_key)
    if status != 201:
        raise RuntimeError(f"could not issue the demo key: {status} {key}")
    return team["id"], key["key"]


SAVE_SECONDS = 60    # the save on stop gives up after this: a stalled moto never keeps the servers up


def _sync_bucket(direction: str) -> None:
    import boto3
    from botocore.config import Config

    bucket, root = APP_ENV["RFT_DATASETS_BUCKET"], LOCAL / "s3"
    s3 = boto3.client("s3", region_name=servers.REGION, config=Config(
        connect_timeout=2, read_timeout=10, retries={"mode": "standard", "max_attempts": 2}))
    if direction == "restore":
        for path in root.rglob("*") if root.exists() else []:
            if path.is_file():
                s3.upload_file(str(path), bucket, str(path.relative_to(root)))
        return
    deadline = time.monotonic() + SAVE_SECONDS
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            if time.monotonic() > deadline:
                raise TimeoutError(f"saving took over {SAVE_SECONDS}s")
            target = root / obj["Key"]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))


def main() -> int:
    LOCAL.mkdir(parents=True, exist_ok=True)
    ports = _ports()
    previous = json.loads(STACK_JSON.read_text()) if STACK_JSON.exists() else {}
    admin_key = previous.get("admin_key") or "rfth_admin_" + secrets.token_urlsafe(32)
    signing_secret = previous.get("slack_signing_secret") or secrets.token_hex(16)
    # rft-hub reaches DynamoDB Local through the fault layer (pass-through until configured).
    env = {**servers.base_env(ports), **APP_ENV,
           "AWS_ENDPOINT_URL_DYNAMODB": f"http://127.0.0.1:{ports['ddb_faults']}"}
    os.environ.update(env)
    children = servers.Children(LOCAL / "children.json")
    # A signal raises KeyboardInterrupt, except while a child is being started and recorded, and once
    # the stop has begun (saving the bucket, stopping the children): then it is noted and the stop
    # goes on, so a Ctrl-C at any moment (make also passes a SIGTERM on) ends every child.
    signal.signal(signal.SIGTERM, children.on_signal)
    signal.signal(signal.SIGINT, children.on_signal)   # also when started from a script that ignores SIGINT
    try:
        with children.held():       # an earlier run's servers are all stopped, or still recorded
            stale = children.stop_stale()
        if stale:
            print(f"stopped {len(stale)} server(s) an earlier run left running: pids {stale}", flush=True)
        servers.refuse_busy(ports)
        print("rft-hub local stack: starting DynamoDB Local, moto, local Bedrock ...", flush=True)
        argv, cwd = servers.dynamodb_command(ports["dynamodb"], LOCAL / "ddb")
        dynamodb = children.start(argv, cwd=cwd, quiet=True)
        servers.wait_for_port(ports["dynamodb"], 60, dynamodb)
        children.module("local.ddb_faults", "--port", str(ports["ddb_faults"]),
                        "--upstream", f"http://127.0.0.1:{ports['dynamodb']}", env=env)
        # MOTO_PORT: where moto's Step Functions interpreter sends a state machine's service calls.
        children.module("moto.server", "-H", "127.0.0.1", "-p", str(ports["moto"]),
                        env={**env, "MOTO_PORT": str(ports["moto"])})
        children.module("local.bedrock_server", "--port", str(ports["bedrock"]),
                        "--state-dir", str(LOCAL / "bedrock"), env=env)
        children.module("local.slack_sink", "--port", str(ports["slack"]), "--log", str(LOCAL / "slack.log"),
                        "--interactions-url", f"http://127.0.0.1:{ports['api']}/slack/interactions",
                        env={**env, "LOCAL_SLACK_SIGNING_SECRET": signing_secret})   # not on the command line
        for name in ("ddb_faults", "moto", "bedrock", "slack"):
            servers.wait_for_port(ports[name], 60)

        from local.bootstrap import bootstrap
        bootstrap(admin_key, signing_secret)
        _sync_bucket("restore")

        children.module("local.event_pump", "--lambda-port", str(ports["lambda"]), env=env)
        # `chalice local --stage local --no-autoreload`, behind the local API Gateway's limits and
        # 404/405 answers (local/api_gateway.py).
        # The data plane on a port of its own too (services.dataplane in stack.json), so the gateway's cost
        # can be measured without the local API Gateway's hop.
        children.module("local.api_gateway", "--stage", "local", "--host", "127.0.0.1", "--port", str(ports["api"]),
                        "--dataplane-port", str(ports["dataplane"]), env=env)
        for name in ("lambda", "api", "dataplane"):
            servers.wait_for_port(ports[name], 60)

        base_url = f"http://127.0.0.1:{ports['api']}"
        team_id, demo_key = _demo_team(base_url, admin_key, previous)
        webhook = f"http://127.0.0.1:{ports['slack']}/services/TLOCALDEMO/BDEMO/demo"
        _http("PUT", f"{base_url}/v1/admin/teams/{team_id}/slack", admin_key,
              {**DEMO_SLACK, "webhook_url": webhook, "notify": ["job", "budget", "model", "pipeline"]})
        # Alarms go to the platform's own channel, on the same sink.
        from local.bootstrap import ops_channel
        ops_channel(f"http://127.0.0.1:{ports['slack']}/services/TLOCALOPS/BOPS/ops")
        for name in EXAMPLE_GRADERS:   # a team may use only Lambda graders an admin registered to it
            status, body = _http("POST", f"{base_url}/v1/admin/teams/{team_id}/lambda_graders", admin_key,
                                 {"function_arn": example_arn(name)})
            if status == 409:   # a demo team of an earlier .local/ has it: a function belongs to one team
                print(f"(example grader {name} stays with the team it is registered to)", flush=True)
            elif status not in (200, 201):
                raise RuntimeError(f"could not register the example grader {name}: {status} {body}")
        # The demo team's pipeline (docs/pipelines.md; examples/pipeline.py uploads data for it).
        sys.path.insert(0, str(servers.ROOT / "examples"))
        import pipeline as demo_pipeline
        demo_pipeline.ensure(base_url, demo_key)
        stack = {**previous, "base_url": base_url, "openai_base_url": f"{base_url}/v1", "admin_key": admin_key,
                 "demo_team_id": team_id, "demo_key": demo_key, "slack_signing_secret": signing_secret,
                 "slack_messages": f"http://127.0.0.1:{ports['slack']}/messages", "slack_log": str(LOCAL / "slack.log"),
                 "demo_slack": DEMO_SLACK,
                 "services": {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}}
        STACK_JSON.write_text(json.dumps(stack, indent=2))
        os.chmod(STACK_JSON, 0o600)
        print(f"\nrft-hub is up at {base_url}\n  console:   {base_url}/console (sign in with the demo key)\n"
              f"  demo team: {team_id}\n  demo key:  {demo_key}\n"
              f"  admin key: in {STACK_JSON}\n  Slack messages: http://127.0.0.1:{ports['slack']}/messages "
              f"(and {LOCAL / 'slack.log'})\n  try: OPENAI_BASE_URL={base_url}/v1 OPENAI_API_KEY=<demo key> "
              f"python examples/quickstart.py\nCtrl-C stops everything.", flush=True)
        while True:
            for child in children.procs:
                if child.poll() is not None:
                    children.stopping = True
                    print(f"a local server exited ({child.args[:3]} -> {child.returncode}); stopping", flush=True)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except RuntimeError as exc:     # a refused start (ports in use) or a failed step: said plainly
        print(f"make run: {exc}", flush=True)
        return 1
    finally:
        try:
            children.stopping = True    # from here on a signal is noted, never raised: the stop always ends
        except KeyboardInterrupt:       # one that came just before: on_signal set the flag as it raised
            pass
        if any(p.poll() is None for p in children.procs):
            print(f"saving the datasets bucket to {LOCAL / 's3'} ...", flush=True)
            try:
                _sync_bucket("save")
            except Exception as exc:  # noqa: BLE001 - moto may already be gone
                print(f"(datasets not saved: {exc!r})", flush=True)
        children.stop()


if __name__ == "__main__":
    sys.exit(main())
