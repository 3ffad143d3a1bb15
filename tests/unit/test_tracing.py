"""Traces (chalicelib/tracing.py, app.py's middleware) with the real X-Ray SDK, as inside Lambda: a
fresh interpreter with Lambda's trace environment sends its subsegments to an "X-Ray daemon" that is
a UDP socket on loopback here. Each handler is a `## <function>` subsegment annotated with its name
and cold start only (never a key the event carried), and a botocore call is a subsegment of its own."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEY = "rfth_0123456789abcdef_" + "s3cr3t" * 6
PROBE = f'''
import sys, boto3, app
class Ctx:
    function_name = "rft-hub-local-alarm_notifier"
    aws_request_id = "r1"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-west-2:123456789012:function:rft-hub-local-alarm_notifier"
    def get_remaining_time_in_millis(self):
        return 30000
event = {{"Records": [{{"Sns": {{"Message": "{KEY}"}}}}]}}
print(app.app.handler_map["alarm_notifier"](event, Ctx()))
from chalicelib import tracing
with tracing.handler("probe"):
    try:   # a botocore call (nothing listens on port 9): a subsegment of its own
        boto3.client("sqs", endpoint_url="http://127.0.0.1:9", region_name="us-west-2").list_queues()
    except Exception:
        pass
print(app.app.handler_map["alarm_notifier"](event, Ctx()))
'''


def test_a_lambda_handler_is_traced_with_its_name_and_cold_start_only():
    daemon = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    daemon.bind(("127.0.0.1", 0))
    daemon.settimeout(10)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RFT_", "POWERTOOLS_"))}
    env.update({"AWS_LAMBDA_FUNCTION_NAME": "rft-hub-local-alarm_notifier", "LAMBDA_TASK_ROOT": str(ROOT),
                "_X_AMZN_TRACE_ID": "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
                "AWS_XRAY_DAEMON_ADDRESS": f"127.0.0.1:{daemon.getsockname()[1]}", "RFT_STAGE": "local",
                "AWS_DEFAULT_REGION": "us-west-2", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                "AWS_MAX_ATTEMPTS": "1", "POWERTOOLS_LOG_LEVEL": "ERROR"})
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["['dropped']", "['dropped']"]
    docs = []
    while True:                 # the process has ended: every datagram it sent is queued already
        daemon.settimeout(0.5)
        try:
            data = daemon.recv(65536).decode()
        except TimeoutError:
            break
        assert KEY not in data and "rfth_" not in data
        docs += [json.loads(part) for part in data.split("\n") if part.startswith("{") and '"format"' not in part]
    handlers = [d for d in docs if d["name"] == "## rft-hub-local-alarm_notifier"]
    assert [d["annotations"] for d in handlers] == [{"ColdStart": True, "Function": "rft-hub-local-alarm_notifier"},
                                                    {"ColdStart": False, "Function": "rft-hub-local-alarm_notifier"}]
    probe = next(d for d in docs if d["name"] == "## probe")
    calls = [s for d in docs for s in [d, *d.get("subsegments", [])] if s.get("namespace") == "aws"]
    assert any(s["name"].lower() == "sqs" for s in calls), [d["name"] for d in docs]
    assert probe["annotations"] == {"ColdStart": False, "Function": "probe"}


def test_traces_are_recorded_only_inside_lambda_and_never_behind_the_web_adapter(monkeypatch):
    from chalicelib import tracing

    for name in ("AWS_LAMBDA_FUNCTION_NAME", "POWERTOOLS_TRACE_DISABLED", "AWS_LWA_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.enabled()                              # locally, in tests: never
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "rft-hub-prod-api_handler")
    assert tracing.enabled()
    monkeypatch.setenv("AWS_LWA_PORT", "8080")                # the data plane (deploy/template.py sets it)
    assert not tracing.enabled()
    monkeypatch.delenv("AWS_LWA_PORT")
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    assert not tracing.enabled()
