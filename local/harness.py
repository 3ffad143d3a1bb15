"""The whole local stack inside one process, for the tests and the benchmarks.

DynamoDB Local (in-memory, a Java child process), moto in server mode (S3, SQS, EventBridge,
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
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.procs = []
        self.threads = []
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        ports = {"moto": self.moto.get_host_and_port()[1], "dynamodb": servers.free_port()}
        self.procs.append(servers.start_dynamodb(ports["dynamodb"], None))

        from local import bedrock_server
        self.bedrock_app = bedrock_server.create_app()
        self.bedrock = servers.ThreadServer(self.bedrock_app)
        ports["bedrock"] = self.bedrock.port
        ports["lambda"] = servers.free_port()
        os.environ.update(servers.base_env(ports))
        self.ports = ports

        from local import lambda_server
        self.lambda_app = lambda_server.create_app(lambda_server.app_functions())
        self.threads.append(servers.ThreadServer(self.lambda_app, ports["lambda"]))

        from local.bootstrap import bootstrap
        bootstrap(ADMIN_KEY, SLACK_SIGNING_SECRET)
        from local import slack_sink
        self.slack_app = slack_sink.create_app()
        self.slack = servers.ThreadServer(self.slack_app)
        self.api_port = self._serve_app()
        self.base_url = f"http://127.0.0.1:{self.api_port}"

    def _serve_app(self) -> int:
        from chalice.config import Config
        from chalice.local import LocalDevServer

        from app import app

        import socketserver
        # Chalice's local server listens with the stdlib's backlog of 5; the concurrency tests
        # open 50 connections at once, as API Gateway would.
        socketserver.TCPServer.request_queue_size = 256
        port = servers.free_port()
        config = Config.create(chalice_stage="local", app_name="rft-hub", chalice_app=app, project_dir=str(ROOT),
                               config_from_disk=json.loads((ROOT / ".chalice" / "config.json").read_text()))
        server = LocalDevServer(app, config, host="127.0.0.1", port=port)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.wait_for_port(port)
        return port

    @property
    def bedrock_state(self):
        return self.bedrock_app.config["state"]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        self.moto.stop()


