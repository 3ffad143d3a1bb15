"""The local Bedrock's state: what both its faces (the Mantle endpoint, local/bedrock_server.py,
and the native API, local/bedrock_native.py) read and change."""
from __future__ import annotations

import re
import threading
import time

RFT_MODELS = ["openai.gpt-oss-20b", "qwen.qwen3-32b-v1:0", "nvidia.nemotron-nano-3-30b"]
INFERENCE_MODELS = RFT_MODELS + ["openai.gpt-oss-120b"]
LAMBDA_ARN = re.compile(
    r"^arn:(aws[a-zA-Z-]*)?:lambda:[a-z]{2}(-gov)?-[a-z]+-\d{1}:\d{12}:function:[a-zA-Z0-9-_\.]+"
    r"(:(\$LATEST|[a-zA-Z0-9-_]+))?$")
HYPER = {"n_epochs": (int, 1, 50), "batch_size": (int, 1, 512), "learning_rate_multiplier": (float, 1e-6, 10.0)}
JOB_FIELDS = {"model", "training_file", "validation_file", "method", "metadata", "seed"}
STATE_TO_NATIVE = {"running": "InProgress", "succeeded": "Completed", "failed": "Failed", "cancelled": "Stopped"}
TERMINAL = {"succeeded", "failed", "cancelled"}

DEFAULT_CLOCK = {"validating_seconds": 0.3, "queued_seconds": 0.3, "step_seconds": 0.3, "total_steps": 6,
                 "samples_per_step": 8, "checkpoint_every": 3}
# How streamed answers are paced and broken (POST /_local/config; defaults small, for the tests).
DEFAULT_STREAM = {"stream_ttft_ms": 5, "stream_token_ms": 1, "stream_hold": False, "stream_error_after": None,
                  "stream_cut_after": None}
STREAM_HOLD_LIMIT_SECONDS = 120          # a held stream goes on by itself after this (a forgotten release)


class State:
    def __init__(self, account: str, region: str) -> None:
        self.lock = threading.RLock()
        self.account, self.region = account, region
        self.files: dict[str, dict] = {}
        self.file_bytes: dict[str, bytes] = {}
        self.jobs: dict[str, dict] = {}
        self.events: dict[str, list[dict]] = {}
        self.checkpoints: dict[str, list[dict]] = {}
        self.clock = dict(DEFAULT_CLOCK)
        self.faults: list[dict] = []
        self.latency_ms = 0
        self.stream = dict(DEFAULT_STREAM)
        self.stream_release = threading.Event()
        self.streams_held = 0            # streams waiting for /_local/stream/release now
        self.requests: list[dict] = []   # what was called, for tests to assert on
        self.published: list[dict] = []
        self.policies: dict[str, str] = {}         # bedrock job id -> policy URL (training rollouts)
        self.model_policies: dict[str, str] = {}   # model -> policy URL (chat completions, responses)
        # AWS documents no state-change events for OpenAI-compatible jobs: none unless a test asks.
        self.mantle_events = False
        # Projects (`OpenAI-Project`): each account has "default"; files and jobs belong to one.
        self.projects: dict[str, dict] = {"default": project_record("default", "Default project")}
        self.owners: dict[str, str] = {}     # file or job id -> project id

    def reset(self) -> None:
        with self.lock:
            self.__init__(self.account, self.region)


def project_record(project_id: str, name: str, tags: dict | None = None) -> dict:
    return {"id": project_id, "object": "organization.project", "name": name, "created_at": int(time.time()),
            "archived_at": None, "status": "active", "tags": dict(tags or {})}
