"""The whole local stack inside one process, for the tests and the benchmarks.

DynamoDB Local (in-memory, a Java child process) behind the DynamoDB fault layer
(local/ddb_faults.py, pass-through until configured), moto in server mode (S3, SQS, EventBridge,
Secrets Manager), the local Bedrock, the local Lambda Invoke API, and rft-hub served over
HTTP by Chalice's local server. Call `configure_environment()` before importing the app.
"""
from __future__ import annotations

import json
import os
import secrets
import threading

from local import servers
from local.servers import ROOT

ADMIN_KEY = "rfth_admin_" + secrets.token_urlsafe(24)
SLACK_SIGNING_SECRET = secrets.token_hex(16)
def configure_environment(**overrides: str) -> None:
    """The `local` stage's settings (.chalice/config.json), before the app is imported."""
    os.environ.update({**servers.local_stage_env(), **overrides})


class Stack:
    def __init__(self, fault_layer: bool = True) -> None:
        """fault_layer=False: straight to DynamoDB Local (latency benchmarks: the proxy is Python
        in this same process and would be measured as rft-hub's cost)."""
        from moto.server import ThreadedMotoServer

        self.procs = []
        self.threads = []
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        ports = {"moto": self.moto.get_host_and_port()[1], "dynamodb_local": servers.free_port()}
        os.environ["MOTO_PORT"] = str(ports["moto"])     # moto's Step Functions calls back into itself there
        self.procs.append(servers.start_dynamodb(ports["dynamodb_local"], None))
        # Everything talks to DynamoDB through the fault layer (pass-through until a test configures it).
        from local import ddb_faults
        self.ddb_faults = self.ddb_faults_server = None
        ports["dynamodb"] = ports["dynamodb_local"]
        if fault_layer:
            self.ddb_faults = ddb_faults.FaultProxy(f"http://127.0.0.1:{ports['dynamodb_local']}")
            self.ddb_faults_server = servers.ThreadServer(self.ddb_faults)
            self.ddb_faults_server.server.RequestHandlerClass = ddb_faults.QuietHandler  # before anyone knows the port
            ports["dynamodb"] = self.ddb_faults_server.port
        self.ddb_faults_url = f"http://127.0.0.1:{ports['dynamodb']}"

        from local import bedrock_server
        self.bedrock_app = bedrock_server.create_app()
        self.bedrock = servers.ThreadServer(self.bedrock_app)
        ports["bedrock"] = self.bedrock.port
        ports["lambda"] = servers.free_port()
        os.environ.update(servers.base_env(ports))
        self.ports = ports
        # CloudWatch Logs' part: the EMF lines the app writes become moto's metrics (local/cloudwatch.py),
        # for the tests that read them (tests/stack/operating installs it): for every other test, putting
        # each call's metrics into moto would only load the machine.
        from local import cloudwatch
        self.cloudwatch = cloudwatch.Collector()

        from local import lambda_server
        self.lambda_app = lambda_server.create_app(lambda_server.app_functions())
        self.threads.append(servers.ThreadServer(self.lambda_app, ports["lambda"]))

        from local.bootstrap import bootstrap
        bootstrap(ADMIN_KEY, SLACK_SIGNING_SECRET)
        from local import slack_sink
        self.slack_app = slack_sink.create_app()
        self.slack = servers.ThreadServer(self.slack_app)
        from local.bootstrap import ops_channel
        ops_channel(f"http://127.0.0.1:{self.slack.port}/services/TLOCALOPS/BOPS/ops")
        self.api_port = self._serve_app()
        self.base_url = f"http://127.0.0.1:{self.api_port}"
        self.slack_app.config.update(signing_secret=SLACK_SIGNING_SECRET,
                                     interactions_url=f"{self.base_url}/slack/interactions")
        # The job and eval workers' queues, drained as Lambda's SQS trigger would (make run's pump drives all
        # handlers; here the other queues and schedules are driven by the tests that need them).
        from app import app
        from local.event_pump import Pump
        self.pump = Pump(app, schedule_seconds=3600, only={"job_worker", "eval_worker", "pipeline_worker",
                                                                "pipeline_triggers"})
        self.pump.start()

    def _serve_app(self) -> int:
        """rft-hub behind the local API Gateway (local/api_gateway.py: Chalice's local server with
        API Gateway's payload limits, 404/405 in the OpenAI envelope, a listen backlog of 256), and
        the data plane's ASGI app (uvicorn, another loopback port) behind it for the inference
        routes, streamed through: one base URL."""
        from chalice.config import Config

        from app import app
        from local.api_gateway import create_server, serve_dataplane

        port = servers.free_port()
        config = Config.create(chalice_stage="local", app_name="rft-hub", chalice_app=app, project_dir=str(ROOT),
                               config_from_disk=json.loads((ROOT / ".chalice" / "config.json").read_text()))
        self.dataplane, self.dataplane_port = serve_dataplane("127.0.0.1", 0)
        server = create_server(app, config, host="127.0.0.1", port=port, dataplane=("127.0.0.1", self.dataplane_port))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.wait_for_port(port)
        return port

    @property
    def bedrock_state(self):
        return self.bedrock_app.config["state"]

    def stop(self) -> None:
        self.pump.stop()
        if self.ddb_faults_server:
            self.ddb_faults_server.stop()
        for proc in self.procs:
            proc.terminate()
        self.moto.stop()


