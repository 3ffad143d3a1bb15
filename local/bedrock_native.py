"""The local Bedrock's native API: what rft-hub calls through boto3 for Amazon Nova.

A Flask Blueprint registered on local/bedrock_server.py's app (`create_blueprint(state)`), serving
on the same port the routes botocore's service models give:

* `bedrock` (control plane): CreateModelCustomizationJob (`POST /model-customization-jobs`), Get,
  List, Stop (`.../{jobIdentifier}/stop`), GetCustomModel (`/custom-models/{id}`), and custom model
  deployments (`/model-customization/custom-model-deployments`: Create, Get, List, Delete);
* `bedrock-runtime`: Converse (`POST /model/{modelId}/converse`) and ConverseStream
  (`.../converse-stream`, answered in the binary AWS event-stream framing botocore decodes:
  prelude, headers, payload, CRC32s -- botocore has a decoder only, so frames are built here).

Strict as AWS is: requests are SigV4-signed (the `Authorization` header, signing name `bedrock`),
and every request is checked against botocore's service model for its operation (required
members, types, enums, lengths, ranges, patterns, unions): an invalid one is a 400
`ValidationException` in AWS's rest-json error shape (`x-amzn-ErrorType`), as AWS would answer.
Then what the model cannot say: only Nova 2 Lite trains with REINFORCEMENT_FINE_TUNING, which
needs an `rftConfig`; a deployment needs a custom model; Converse needs alternating roles
starting with the user, a `toolConfig` when the conversation holds tool blocks, tool results
answering the previous turn's tool uses, an Active deployment.

Native jobs run on the Mantle endpoint's clock (`state.clock`): validation, data processing,
then `total_steps` training steps. Each step samples rollouts from the training rows (read from
S3, i.e. moto), scores them by invoking the job's grader Lambda with Bedrock's reward contract,
and appends a row to `<output>/model-customization-job-<id>/training_artifacts/
step_wise_training_metrics.csv` in S3. State changes are published to the default EventBridge
bus as "Model Customization Job State Change" (`detail.jobStatus`). Deployments move
Creating -> Active after `clock.deployment_seconds` (default 0.3).

Test controls (under /_local/native): `POST .../jobs/{id}/fail`, `POST .../deployments/{id}/fail`,
`GET /_local/native` (requests, published events, jobs, deployments), `POST .../reset`.
"""
from __future__ import annotations

import binascii
import csv
import io
import json
import random
import re
import secrets
import struct
import threading
import time
from typing import Any
from urllib.parse import unquote

import boto3
from flask import Blueprint, Response, current_app, jsonify, request

from local import bedrock_model as model
from local import bedrock_trainer as trainer

NOVA_RFT_BASE = ("amazon.nova-2-lite-v1:0:256k",)
DETAIL_TYPE = "Model Customization Job State Change"
NATIVE_PREFIXES = ("/model-customization-jobs", "/model-customization/", "/custom-models", "/model/")
TERMINAL = {"Completed", "Failed", "Stopped"}
METRICS_PATH = "training_artifacts/step_wise_training_metrics.csv"
DEFAULT_DEPLOYMENT_SECONDS = 0.3

# (method, route) -> (service, operation): the REST routes of botocore's models.
OPERATIONS = {
    ("POST", "create_job"): ("bedrock", "CreateModelCustomizationJob"),
    ("GET", "get_job"): ("bedrock", "GetModelCustomizationJob"),
    ("GET", "list_jobs"): ("bedrock", "ListModelCustomizationJobs"),
    ("POST", "stop_job"): ("bedrock", "StopModelCustomizationJob"),
    ("GET", "get_custom_model"): ("bedrock", "GetCustomModel"),
    ("POST", "create_deployment"): ("bedrock", "CreateCustomModelDeployment"),
    ("GET", "get_deployment"): ("bedrock", "GetCustomModelDeployment"),
    ("GET", "list_deployments"): ("bedrock", "ListCustomModelDeployments"),
    ("DELETE", "delete_deployment"): ("bedrock", "DeleteCustomModelDeployment"),
    ("POST", "converse"): ("bedrock-runtime", "Converse"),
    ("POST", "converse_stream"): ("bedrock-runtime", "ConverseStream"),
}


class AwsError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def aws_error(status: int, code: str, message: str) -> Response:
    """An error as AWS's rest-json services send it (botocore reads the code from the header)."""
    resp = jsonify({"message": message})
    resp.status_code = status
    resp.headers["x-amzn-ErrorType"] = f"{code}:http://internal.amazon.com/coral/com.amazon.bedrock/"
    resp.headers["x-amzn-RequestId"] = secrets.token_hex(16)
    return resp


_aws_error = aws_error


def _now_iso(at: float | None = None) -> str:
    at = time.time() if at is None else at
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


def _id12() -> str:
    return "".join(random.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))


# ---- the AWS event-stream framing (application/vnd.amazon.eventstream) ---------------------------

def _header(name: str, value: str) -> bytes:
    key, raw = name.encode(), value.encode()
    return struct.pack("B", len(key)) + key + b"\x07" + struct.pack(">H", len(raw)) + raw   # 7: string


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: [total length][headers length][prelude CRC32][headers][payload]
    [message CRC32 of everything before it]."""
    encoded = b"".join(_header(k, v) for k, v in headers.items())
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", binascii.crc32(prelude) & 0xFFFFFFFF) + encoded + payload
    return message + struct.pack(">I", binascii.crc32(message) & 0xFFFFFFFF)


def event_frame(event_type: str, body: dict) -> bytes:
    return frame({":event-type": event_type, ":content-type": "application/json", ":message-type": "event"},
                 json.dumps(body, separators=(",", ":")).encode())


def exception_frame(exception_type: str, message: str) -> bytes:
    return frame({":exception-type": exception_type, ":content-type": "application/json",
                  ":message-type": "exception"}, json.dumps({"message": message}).encode())


# ---- requests checked against botocore's service model -------------------------------------------

_MODELS: dict[str, Any] = {}


def operation_model(service: str, operation: str):
    if service not in _MODELS:
        from botocore.session import get_session
        _MODELS[service] = get_session().get_service_model(service)
    return _MODELS[service].operation_model(operation)


def _pattern_ok(pattern: str, value: str) -> bool:
    """Smithy's `pattern` is not implicitly anchored (AWS searches it), so neither is this."""
    try:
        return re.search(pattern, value) is not None
    except re.error:
        return True


def validate_shape(shape, value: Any, path: str, problems: list[str]) -> None:
    """AWS's own checks of one value against its shape (what a ValidationException lists)."""
    kind = shape.type_name
    meta = shape.metadata
    where = path or "request"

    def bad(constraint: str) -> None:
        shown = json.dumps(value)[:80] if not isinstance(value, (dict, list)) else kind
        problems.append(f"Value {shown} at '{where}' failed to satisfy constraint: {constraint}")

    if kind == "structure":
        if meta.get("document"):
            return
        if not isinstance(value, dict):
            return bad("Member must be a structure")
        for name in meta.get("required", []):
            if value.get(name) is None:
                problems.append(f"Value null at '{path + '.' if path else ''}{name}' failed to satisfy constraint: "
                                "Member must not be null")
        unknown = set(value) - set(shape.members)
        for name in sorted(unknown):
            problems.append(f"Unknown member '{path + '.' if path else ''}{name}'")
        present = [n for n in shape.members if value.get(n) is not None]
        if meta.get("union") and len(present) != 1:
            problems.append(f"Value at '{where}' failed to satisfy constraint: Member must have exactly one "
                            f"member set (union), got {len(present)}")
        for name in present:
            validate_shape(shape.members[name], value[name], f"{path}.{name}" if path else name, problems)
    elif kind == "list":
        if not isinstance(value, list):
            return bad("Member must be a list")
        if "min" in meta and len(value) < meta["min"]:
            bad(f"Member must have length greater than or equal to {meta['min']}")
        if "max" in meta and len(value) > meta["max"]:
            bad(f"Member must have length less than or equal to {meta['max']}")
        for i, item in enumerate(value):
            validate_shape(shape.member, item, f"{where}.{i + 1}", problems)
    elif kind == "map":
        if not isinstance(value, dict):
            return bad("Member must be a map")
        if "min" in meta and len(value) < meta["min"]:
            bad(f"Member must have length greater than or equal to {meta['min']}")
        if "max" in meta and len(value) > meta["max"]:
            bad(f"Member must have length less than or equal to {meta['max']}")
        for key, item in value.items():
            validate_shape(shape.value, item, f"{where}.{key}", problems)
    elif kind == "string":
        if not isinstance(value, str):
            return bad("Member must be a string")
        if "min" in meta and len(value) < meta["min"]:
            bad(f"Member must have length greater than or equal to {meta['min']}")
        if "max" in meta and len(value) > meta["max"]:
            bad(f"Member must have length less than or equal to {meta['max']}")
        if shape.enum and value not in shape.enum:
            bad(f"Member must satisfy enum value set: [{', '.join(shape.enum)}]")
        if "pattern" in meta and not _pattern_ok(meta["pattern"], value):
            bad(f"Member must satisfy regular expression pattern: {meta['pattern']}")
    elif kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            return bad("Member must be an integer")
        if "min" in meta and value < meta["min"]:
            bad(f"Member must have value greater than or equal to {meta['min']}")
        if "max" in meta and value > meta["max"]:
            bad(f"Member must have value less than or equal to {meta['max']}")
    elif kind in ("float", "double"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return bad("Member must be a number")
        if "min" in meta and value < meta["min"]:
            bad(f"Member must have value greater than or equal to {meta['min']}")
        if "max" in meta and value > meta["max"]:
            bad(f"Member must have value less than or equal to {meta['max']}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            bad("Member must be a boolean")


def request_params(service: str, operation: str, view_args: dict) -> dict:
    """A rest-json request as the operation's input: URI labels, query string and JSON body."""
    model = operation_model(service, operation)
    shape = model.input_shape
    params: dict = {}
    body = request.get_json(silent=True) if request.data else {}
    if request.data and not isinstance(body, dict):
        raise AwsError(400, "SerializationException", "The request body is not a JSON object.")
    for name, member in (shape.members.items() if shape else []):
        location = member.serialization.get("location")
        wire = member.serialization.get("name", name)
        if location == "uri":
            if wire in view_args:
                params[name] = unquote(view_args[wire])
        elif location == "querystring":
            if wire in request.args:
                raw = request.args.get(wire)
                params[name] = int(raw) if member.type_name == "integer" and raw.lstrip("-").isdigit() else raw
        elif location == "header":
            if wire in request.headers:
                params[name] = request.headers[wire]
        elif name in (body or {}):
            params[name] = body[name]
    unknown = set(body or {}) - {n for n, m in (shape.members.items() if shape else [])
                                 if not m.serialization.get("location")}
    problems: list[str] = []
    for name in sorted(unknown):
        problems.append(f"Unknown member '{name}'")
    if shape is not None:
        validate_shape(shape, params, "", problems)
    if problems:
        raise AwsError(400, "ValidationException", f"{len(problems)} validation error"
                       f"{'s' if len(problems) > 1 else ''} detected: " + "; ".join(problems[:10]))
    return params


# ---- state -------------------------------------------------------------------------------------

class NativeState:
    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}            # job ARN -> job
        self.names: dict[str, str] = {}            # job name -> ARN
        self.tokens: dict[str, str] = {}           # clientRequestToken -> ARN (jobs and deployments)
        self.models: dict[str, dict] = {}          # custom model ARN -> model
        self.deployments: dict[str, dict] = {}     # deployment ARN -> deployment
        self.deleted: set[str] = set()
        self.requests: list[dict] = []
        self.published: list[dict] = []


def native(state) -> NativeState:
    if not isinstance(getattr(state, "native", None), NativeState):
        state.native = NativeState()
    return state.native


def _job_view(job: dict) -> dict:
    return {k: v for k, v in job.items() if not k.startswith("_") and v is not None}


def _find_job(nat: NativeState, ident: str) -> dict:
    ident = unquote(ident)
    arn = ident if ident in nat.jobs else nat.names.get(ident)
    if not arn:
        raise AwsError(404, "ResourceNotFoundException", f"Could not find job {ident}.")
    return nat.jobs[arn]


def _find_deployment(nat: NativeState, ident: str) -> dict:
    ident = unquote(ident)
    found = nat.deployments.get(ident) or next((d for d in nat.deployments.values()
                                                 if d["modelDeploymentName"] == ident), None)
    if not found:
        raise AwsError(404, "ResourceNotFoundException", f"Could not find custom model deployment {ident}.")
    return found


def _s3_location(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


# ---- EventBridge -------------------------------------------------------------------------------

def publish(state, job: dict) -> None:
    """A native "Model Customization Job State Change" on the default bus (as the AWS sample)."""
    nat = native(state)
    detail = {"version": "0.0", "jobName": job["jobName"], "jobArn": job["jobArn"],
              "outputModelName": job.get("outputModelName"), "outputModelArn": job.get("outputModelArn"),
              "roleArn": job["roleArn"], "jobStatus": job["status"], "creationTime": job["creationTime"],
              "lastModifiedTime": job["lastModifiedTime"], "baseModelArn": job["baseModelArn"],
              "hyperParameters": {}, "trainingDataConfig": job["trainingDataConfig"],
              "validationDataConfig": job.get("validationDataConfig") or {"validators": []},
              "outputDataConfig": job["outputDataConfig"]}
    if job.get("failureMessage"):
        detail["failureMessage"] = job["failureMessage"]
    if job.get("endTime"):
        detail["endTime"] = job["endTime"]
    entry = {"Source": "aws.bedrock", "DetailType": DETAIL_TYPE, "Detail": json.dumps(detail),
             "Resources": [job["jobArn"]]}

    trainer.put_event(nat.published, entry, state.region)


def set_status(state, job: dict, status: str, message: str | None = None) -> None:
    now = time.time()
    job["status"] = status
    job["lastModifiedTime"] = _now_iso(now)
    job["_phase_at"] = time.monotonic()
    if message:
        job["failureMessage"] = message
    if status in TERMINAL:
        job["endTime"] = _now_iso(now)
        for detail in job["statusDetails"].values():
            if detail["status"] == "InProgress":     # the phase that was running ends as the job does
                detail.update(status=status, lastModifiedTime=_now_iso(now))
    publish(state, job)


def _phase(job: dict, key: str, status: str) -> None:
    job["statusDetails"][key]["status"] = status
    job["statusDetails"][key]["lastModifiedTime"] = _now_iso()


# ---- the clock ---------------------------------------------------------------------------------

def ticker(state) -> None:
    while True:
        time.sleep(0.05)
        nat = native(state)
        with state.lock:
            jobs = [j for j in nat.jobs.values() if j["status"] not in TERMINAL]
            deployments = [d for d in nat.deployments.values() if d["status"] == "Creating"]
            clock = dict(state.clock)
        for job in jobs:
            try:
                _advance(state, job, clock)
            except Exception as exc:  # noqa: BLE001 - a broken job must not stop the clock
                with state.lock:
                    set_status(state, job, "Failed", f"Internal error: {exc}")
        for dep in deployments:
            if dep.get("_fail"):
                with state.lock:
                    dep.update(status="Failed", failureMessage=dep["_fail"], lastUpdatedAt=_now_iso())
            elif time.monotonic() - dep["_at"] >= float(clock.get("deployment_seconds", DEFAULT_DEPLOYMENT_SECONDS)):
                with state.lock:
                    if dep["status"] == "Creating":
                        dep.update(status="Active", lastUpdatedAt=_now_iso())


def _advance(state, job: dict, clock: dict) -> None:
    elapsed = time.monotonic() - job["_phase_at"]
    details = job["statusDetails"]
    if job.get("_force_fail"):
        with state.lock:
            set_status(state, job, "Failed", job.pop("_force_fail"))
        return
    if job["status"] == "Stopping":
        with state.lock:
            set_status(state, job, "Stopped")
        return
    if details["validationDetails"]["status"] == "InProgress":
        if elapsed < clock["validating_seconds"]:
            return
        rows, problem = _training_rows(state, job)
        with state.lock:
            if problem:
                _phase(job, "validationDetails", "Failed")
                set_status(state, job, "Failed", problem)
                return
            job["_rows"] = rows
            _phase(job, "validationDetails", "Completed")
            _phase(job, "dataProcessingDetails", "InProgress")
            job["_phase_at"] = time.monotonic()
    elif details["dataProcessingDetails"]["status"] == "InProgress":
        if elapsed < clock["queued_seconds"]:
            return
        with state.lock:
            _phase(job, "dataProcessingDetails", "Completed")
            _phase(job, "trainingDetails", "InProgress")
            job["_phase_at"] = time.monotonic()
    elif details["trainingDetails"]["status"] == "InProgress" and \
            elapsed >= clock["step_seconds"] * (job["_step"] + 1):
        _train_step(state, job, clock)


def _training_rows(state, job: dict) -> tuple[list[dict], str | None]:
    uri = job["trainingDataConfig"].get("s3Uri")
    if not uri:
        return [], "Training data must be given as an S3 URI for reinforcement fine-tuning."
    bucket, key = _s3_location(uri)
    try:
        raw = boto3.client("s3", region_name=state.region).get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:  # noqa: BLE001 - as Bedrock reports it: a failed validation
        return [], f"Unable to read training data at {uri}: {type(exc).__name__}."
    rows = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            return [], f"Training data line {number} is not valid JSON."
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            return [], f"Training data line {number} has no messages."
        rows.append(row)
    if not 100 <= len(rows) <= 20000:
        return [], f"Training data has {len(rows)} records; reinforcement fine-tuning needs 100 to 20000."
    return rows, None


def _train_step(state, job: dict, clock: dict) -> None:

    step = job["_step"] + 1
    total = int(clock["total_steps"])
    rng = random.Random(f"{job['jobArn']}:{step}")
    rows = job["_rows"]
    hp = job["_rft"].get("hyperParameters") or {}
    k = int(hp.get("trainingSamplePerPrompt") or 4)
    prompts = max(1, int(clock["samples_per_step"]) // k)
    quality = 0.15 + 0.8 * step / total
    samples = []
    for p in range(prompts):
        row = rows[rng.randrange(len(rows))]
        for m in range(k):
            answer = trainer.reference_text(row.get("reference_answer")) if rng.random() < quality \
                else "I am not sure."
            sample = {key: v for key, v in row.items() if key not in ("messages", "id")}
            sample.update({"id": f"{job['_tail']}-s{step}-p{p}-{m}",
                           "messages": row["messages"] + [{"role": "assistant", "content": answer}]})
            samples.append(sample)
    arn = job["_rft"]["graderConfig"]["lambdaGrader"]["lambdaArn"]
    scores, problem = trainer.invoke_grader(state, arn, samples)
    if problem:
        with state.lock:
            set_status(state, job, "Failed", f"Reward function {arn} failed: {problem}")
        return
    lengths = [len(s["messages"][-1]["content"]) / 4 for s in samples]
    mean = sum(scores) / len(scores)
    row = {"step_number": step, "epoch_number": (step - 1) * int(hp.get("epochCount") or 1) // total,
           "train_reward_mean": round(mean, 4), "train_reward_max": max(scores), "train_reward_min": min(scores),
           "policy_entropy": round(0.9 - 0.5 * step / total, 4),
           "response_length_mean": round(sum(lengths) / len(lengths), 2),
           "kl_divergence": round(0.01 * step, 4)}     # a column rft-hub knows no name for: kept as it is
    with state.lock:
        if job["status"] != "InProgress":
            return     # stopped meanwhile
        job["_step"] = step
        job["_metrics"].append(row)
    _write_metrics(state, job)
    if step >= total:
        with state.lock:
            model_arn = f"arn:aws:bedrock:{state.region}:{state.account}:custom-model/{job['_base']}/{_id12()}"
            native(state).models[model_arn] = {
                "modelArn": model_arn, "modelName": job["outputModelName"], "jobName": job["jobName"],
                "jobArn": job["jobArn"], "baseModelArn": job["baseModelArn"],
                "customizationType": job["customizationType"], "creationTime": _now_iso(), "modelStatus": "Active",
                "trainingDataConfig": job["trainingDataConfig"], "outputDataConfig": job["outputDataConfig"],
                "customizationConfig": {"rftConfig": job["_rft"]}}
            job["outputModelArn"] = model_arn
            _phase(job, "trainingDetails", "Completed")
            set_status(state, job, "Completed")


def _write_metrics(state, job: dict) -> None:
    out = io.StringIO()
    columns = list(job["_metrics"][0])
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(job["_metrics"])
    bucket, prefix = _s3_location(job["outputDataConfig"]["s3Uri"])
    key = f"{prefix.rstrip('/') + '/' if prefix else ''}model-customization-job-{job['_tail']}/{METRICS_PATH}"
    boto3.client("s3", region_name=state.region).put_object(Bucket=bucket, Key=key, Body=out.getvalue().encode())


# ---- Converse: a stand-in model ---------------------------------------------------------------

def _texts(blocks: list[dict]) -> list[str]:
    out = []
    for block in blocks:
        if isinstance(block.get("text"), str):
            out.append(block["text"])
        elif isinstance(block.get("toolResult"), dict):
            out += [c.get("text", "") for c in block["toolResult"].get("content") or [] if isinstance(c, dict)]
    return out


def _check_conversation(params: dict) -> None:
    """What Converse refuses beyond the shapes (ValidationException, AWS's wording)."""
    messages = params.get("messages") or []
    if not messages:
        raise AwsError(400, "ValidationException", "A conversation must start with a user message. Try again "
                                                    "with a conversation that starts with a user message.")
    uses_tools = False
    previous_uses: set[str] = set()
    for i, message in enumerate(messages):
        role = message["role"]
        if i == 0 and role != "user":
            raise AwsError(400, "ValidationException", "A conversation must start with a user message. Try again "
                                                        "with a conversation that starts with a user message.")
        if i and role == messages[i - 1]["role"]:
            raise AwsError(400, "ValidationException", "A conversation must alternate between user and assistant "
                                                        "roles. Make sure the conversation alternates between user "
                                                        "and assistant roles and try again.")
        if role == "system":
            raise AwsError(400, "ValidationException", "Use the system field for system prompts.")
        if not message["content"]:
            raise AwsError(400, "ValidationException", f"The content field in the Message object at messages.{i} "
                                                        "is empty. Add a ContentBlock object to the content field "
                                                        "and try again.")
        results = set()
        for j, block in enumerate(message["content"]):
            if "text" in block and not str(block["text"]).strip():
                raise AwsError(400, "ValidationException", f"The text field in the ContentBlock object at "
                                                            f"messages.{i}.content.{j} is blank. Add text to the "
                                                            "text field, and try again.")
            if "toolUse" in block or "toolResult" in block:
                uses_tools = True
            if "toolResult" in block:
                results.add(block["toolResult"]["toolUseId"])
        if results - previous_uses:
            raise AwsError(400, "ValidationException", "The number of toolResult blocks at messages."
                                                        f"{i}.content exceeds the number of toolUse blocks of "
                                                        "previous turn.")
        previous_uses = {b["toolUse"]["toolUseId"] for b in message["content"] if "toolUse" in b} \
            if role == "assistant" else set()
    config = params.get("toolConfig")
    if uses_tools and not config:
        raise AwsError(400, "ValidationException", "The toolConfig field must be defined when using toolUse "
                                                    "and toolResult content blocks.")
    if config:
        names = [t["toolSpec"]["name"] for t in config["tools"] if "toolSpec" in t]
        forced = (config.get("toolChoice") or {}).get("tool")
        if forced and forced["name"] not in names:
            raise AwsError(400, "ValidationException", f"The tool {forced['name']} in toolChoice is not in tools.")


def _answer(params: dict, label: str) -> tuple[list[dict], str, dict]:
    """(content blocks, stopReason, usage) of the stand-in model for a Converse request."""

    messages = params["messages"]
    system = " ".join(b.get("text", "") for b in params.get("system") or [])
    prompt = "\n".join(t for m in messages for t in _texts(m["content"]))
    last = messages[-1]["content"]
    inference = params.get("inferenceConfig") or {}
    config = params.get("toolConfig") or {}
    tools = [t["toolSpec"] for t in config.get("tools") or [] if "toolSpec" in t]
    choice = config.get("toolChoice") or {"auto": {}}
    input_tokens = max(1, len(system + prompt) // 4)
    chosen = None
    if tools and "any" in choice:
        chosen = tools[0]
    elif tools and "tool" in choice:
        chosen = next(t for t in tools if t["name"] == choice["tool"]["name"])
    elif tools and not any("toolResult" in b for b in last):
        said = " ".join(_texts(last)).lower()
        chosen = next((t for t in tools if t["name"].lower() in said), None)
    if chosen is not None:
        schema = (chosen.get("inputSchema") or {}).get("json") or {"type": "object"}
        tool_input = model.schema_instance(schema, schema)
        blocks = [{"toolUse": {"toolUseId": "tooluse_" + secrets.token_hex(11),
                               "name": chosen["name"], "input": tool_input}}]
        out = max(1, len(json.dumps(tool_input)) // 4)
        return blocks, "tool_use", {"inputTokens": input_tokens, "outputTokens": out,
                                    "totalTokens": input_tokens + out}
    fmt = ((params.get("outputConfig") or {}).get("textFormat") or {}).get("structure", {}).get("jsonSchema")
    if fmt:
        schema = json.loads(fmt["schema"])
        text, stop = json.dumps(model.schema_instance(schema, schema)), "end_turn"
    else:
        judged = model.judge_reply(prompt)
        text = judged if judged is not None else f"[{label}] " + (prompt[-200:] if prompt else "ok")
        stop = "end_turn"
        for sequence in inference.get("stopSequences") or []:
            if sequence in text:
                text, stop = text[: text.index(sequence)] or "…", "stop_sequence"
        words = text.split()
        cap = inference.get("maxTokens")
        if cap and len(words) > cap:
            text, stop = " ".join(words[:cap]), "max_tokens"
    out = len(model.pieces(text))
    return [{"text": text}], stop, {"inputTokens": input_tokens, "outputTokens": out,
                                    "totalTokens": input_tokens + out}


def _stream_frames(state, blocks: list[dict], stop: str, usage: dict, started: float):

    pace = float(state.stream.get("stream_token_ms") or 0) / 1000
    yield event_frame("messageStart", {"role": "assistant"})
    for index, block in enumerate(blocks):
        if "toolUse" in block:
            use = block["toolUse"]
            yield event_frame("contentBlockStart", {"start": {"toolUse": {"toolUseId": use["toolUseId"],
                                                                          "name": use["name"]}},
                                                    "contentBlockIndex": index})
            raw = json.dumps(use["input"], separators=(",", ":"))
            for at in range(0, len(raw), 8):
                time.sleep(pace)
                yield event_frame("contentBlockDelta", {"delta": {"toolUse": {"input": raw[at:at + 8]}},
                                                        "contentBlockIndex": index})
        else:
            for piece in model.pieces(block["text"]):
                time.sleep(pace)
                yield event_frame("contentBlockDelta", {"delta": {"text": piece}, "contentBlockIndex": index})
        yield event_frame("contentBlockStop", {"contentBlockIndex": index})
    yield event_frame("messageStop", {"stopReason": stop})
    yield event_frame("metadata", {"usage": usage, "metrics": {"latencyMs": int((time.time() - started) * 1000)}})


# ---- the blueprint -----------------------------------------------------------------------------

def create_blueprint(state) -> Blueprint:
    """The native routes, answered before the Mantle endpoint's bearer-token gate (they are
    SigV4-signed); register it before that gate is declared."""
    bp = Blueprint("bedrock_native", __name__)
    nat = native(state)

    @bp.before_app_request
    def native_first():
        path = request.path
        if not path.startswith(NATIVE_PREFIXES):
            return None
        rule = request.url_rule
        if rule is None or not rule.endpoint.startswith("bedrock_native."):
            return _aws_error(404, "UnknownOperationException", "Unknown operation.")
        with state.lock:
            nat.requests.append({"method": request.method, "path": path, "operation": rule.endpoint.split(".", 1)[1],
                                 "body": request.get_json(silent=True) if request.data else None})
            fault = next((f for f in state.faults if f["count"] > 0 and path.startswith(f.get("path", "/"))
                          and f.get("method", request.method) == request.method), None)
            if fault:
                fault["count"] -= 1
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("AWS4-HMAC-SHA256 ") or "/bedrock/aws4_request" not in auth:
            return _aws_error(403, "AccessDeniedException", "Missing or invalid SigV4 signature (signing name "
                                                            "'bedrock').")
        if fault:
            code = {429: "ThrottlingException", 503: "ServiceUnavailableException"}.get(fault["status"],
                                                                                         "InternalServerException")
            return _aws_error(fault["status"], code, f"Injected failure ({fault['status']}).")
        view = current_app.view_functions[rule.endpoint]
        try:
            return view(**(request.view_args or {}))
        except AwsError as err:
            return _aws_error(err.status, err.code, err.message)

    def params_for(name: str, view_args: dict) -> dict:
        service, operation = OPERATIONS[(request.method, name)]
        return request_params(service, operation, view_args)

    # ---- model customization jobs ---------------------------------------------------------------
    @bp.post("/model-customization-jobs")
    def create_job():
        p = params_for("create_job", {})
        token = p.get("clientRequestToken")
        with state.lock:
            if token and token in nat.tokens:
                return jsonify({"jobArn": nat.tokens[token]}), 201
            if p["jobName"] in nat.names:
                raise AwsError(400, "ConflictException", f"A model customization job named {p['jobName']} "
                                                         "already exists.")
        base = p["baseModelIdentifier"].rsplit("/", 1)[-1] if p["baseModelIdentifier"].startswith("arn:") \
            else p["baseModelIdentifier"]
        if p.get("customizationType") != "REINFORCEMENT_FINE_TUNING":
            raise AwsError(400, "ValidationException", "This local Bedrock runs REINFORCEMENT_FINE_TUNING jobs only.")
        if base not in NOVA_RFT_BASE:
            raise AwsError(400, "ValidationException", f"The base model {base} does not support customization type "
                                                       "REINFORCEMENT_FINE_TUNING.")
        rft = (p.get("customizationConfig") or {}).get("rftConfig")
        if not rft or not (rft.get("graderConfig") or {}).get("lambdaGrader"):
            raise AwsError(400, "ValidationException", "customizationConfig.rftConfig with a graderConfig is required "
                                                       "for REINFORCEMENT_FINE_TUNING.")
        if p.get("hyperParameters"):
            raise AwsError(400, "ValidationException", "hyperParameters are not supported for "
                                                       "REINFORCEMENT_FINE_TUNING; use rftConfig.hyperParameters.")
        if not p["trainingDataConfig"].get("s3Uri"):
            raise AwsError(400, "ValidationException", "trainingDataConfig.s3Uri is required.")
        tail = _id12()
        arn = f"arn:aws:bedrock:{state.region}:{state.account}:model-customization-job/{base}/{tail}"
        now = _now_iso()
        job = {"jobArn": arn, "jobName": p["jobName"], "outputModelName": p["customModelName"],
               "clientRequestToken": token, "roleArn": p["roleArn"], "status": "InProgress",
               "statusDetails": {"validationDetails": {"status": "InProgress", "creationTime": now,
                                                       "lastModifiedTime": now},
                                 "dataProcessingDetails": {"status": "NotStarted", "creationTime": now,
                                                           "lastModifiedTime": now},
                                 "trainingDetails": {"status": "NotStarted", "creationTime": now,
                                                     "lastModifiedTime": now}},
               "creationTime": now, "lastModifiedTime": now,
               "baseModelArn": f"arn:aws:bedrock:{state.region}::foundation-model/{base}",
               "trainingDataConfig": p["trainingDataConfig"],
               "validationDataConfig": p.get("validationDataConfig") or {"validators": []},
               "outputDataConfig": p["outputDataConfig"], "customizationType": p["customizationType"],
               "customizationConfig": p["customizationConfig"],
               "_rft": rft, "_base": base, "_tail": tail, "_step": 0, "_metrics": [],
               "_phase_at": time.monotonic()}
        with state.lock:
            nat.jobs[arn] = job
            nat.names[p["jobName"]] = arn
            if token:
                nat.tokens[token] = arn
            publish(state, job)
        return jsonify({"jobArn": arn}), 201

    @bp.get("/model-customization-jobs/<path:job_identifier>")
    def get_job(job_identifier):
        params_for("get_job", {"jobIdentifier": job_identifier})
        with state.lock:
            return jsonify(_job_view(_find_job(nat, job_identifier)))

    @bp.post("/model-customization-jobs/<path:job_identifier>/stop")
    def stop_job(job_identifier):
        params_for("stop_job", {"jobIdentifier": job_identifier})
        with state.lock:
            job = _find_job(nat, job_identifier)
            if job["status"] in TERMINAL or job["status"] == "Stopping":
                raise AwsError(400, "ValidationException", f"Job {job['jobName']} is {job['status']} and cannot be "
                                                           "stopped.")
            set_status(state, job, "Stopping")
        return jsonify({})

    @bp.get("/model-customization-jobs")
    def list_jobs():
        p = params_for("list_jobs", {})
        with state.lock:
            jobs = sorted(nat.jobs.values(), key=lambda j: j["creationTime"], reverse=True)
        if p.get("statusEquals"):
            jobs = [j for j in jobs if j["status"] == p["statusEquals"]]
        if p.get("nameContains"):
            jobs = [j for j in jobs if p["nameContains"] in j["jobName"]]
        summaries = [{k: v for k, v in {
            "jobArn": j["jobArn"], "baseModelArn": j["baseModelArn"], "jobName": j["jobName"], "status": j["status"],
            "lastModifiedTime": j["lastModifiedTime"], "creationTime": j["creationTime"], "endTime": j.get("endTime"),
            "customModelArn": j.get("outputModelArn"), "customModelName": j["outputModelName"],
            "customizationType": j["customizationType"]}.items() if v is not None}
            for j in jobs[: int(p.get("maxResults") or 100)]]
        return jsonify({"modelCustomizationJobSummaries": summaries})

    @bp.get("/custom-models/<path:model_identifier>")
    def get_custom_model(model_identifier):
        params_for("get_custom_model", {"modelIdentifier": model_identifier})
        ident = unquote(model_identifier)
        with state.lock:
            model = nat.models.get(ident) or next((m for m in nat.models.values() if m["modelName"] == ident), None)
        if not model:
            raise AwsError(404, "ResourceNotFoundException", f"Could not find model {ident}.")
        return jsonify(model)

    # ---- custom model deployments ---------------------------------------------------------------
    @bp.post("/model-customization/custom-model-deployments")
    def create_deployment():
        p = params_for("create_deployment", {})
        token = p.get("clientRequestToken")
        with state.lock:
            if token and token in nat.tokens:
                return jsonify({"customModelDeploymentArn": nat.tokens[token]}), 202
            model = nat.models.get(p["modelArn"])
            if model is None:
                raise AwsError(404, "ResourceNotFoundException", f"Could not find model {p['modelArn']}.")
            if any(d["modelDeploymentName"] == p["modelDeploymentName"] for d in nat.deployments.values()):
                raise AwsError(400, "ValidationException", f"A deployment named {p['modelDeploymentName']} "
                                                           "already exists.")
            arn = f"arn:aws:bedrock:{state.region}:{state.account}:custom-model-deployment/{_id12()}"
            now = _now_iso()
            nat.deployments[arn] = {"customModelDeploymentArn": arn, "modelDeploymentName": p["modelDeploymentName"],
                                    "modelArn": p["modelArn"], "createdAt": now, "lastUpdatedAt": now,
                                    "status": "Creating", "description": p.get("description"),
                                    "_at": time.monotonic()}
            if token:
                nat.tokens[token] = arn
        return jsonify({"customModelDeploymentArn": arn}), 202

    @bp.get("/model-customization/custom-model-deployments/<path:deployment_identifier>")
    def get_deployment(deployment_identifier):
        params_for("get_deployment", {"customModelDeploymentIdentifier": deployment_identifier})
        with state.lock:
            return jsonify(_job_view(_find_deployment(nat, deployment_identifier)))

    @bp.get("/model-customization/custom-model-deployments")
    def list_deployments():
        params_for("list_deployments", {})
        with state.lock:
            summaries = [{"customModelDeploymentArn": d["customModelDeploymentArn"],
                          "customModelDeploymentName": d["modelDeploymentName"], "modelArn": d["modelArn"],
                          "createdAt": d["createdAt"], "status": d["status"], "lastUpdatedAt": d["lastUpdatedAt"]}
                         for d in nat.deployments.values()]
        return jsonify({"modelDeploymentSummaries": summaries})

    @bp.delete("/model-customization/custom-model-deployments/<path:deployment_identifier>")
    def delete_deployment(deployment_identifier):
        params_for("delete_deployment", {"customModelDeploymentIdentifier": deployment_identifier})
        with state.lock:
            found = _find_deployment(nat, deployment_identifier)
            del nat.deployments[found["customModelDeploymentArn"]]
            nat.deleted.add(found["customModelDeploymentArn"])
        return jsonify({})

    # ---- the runtime ----------------------------------------------------------------------------
    def _serving(model_id: str) -> str:
        """The model answering `model_id`, or the error AWS gives."""
        with state.lock:
            dep = nat.deployments.get(model_id)
        if ":custom-model-deployment/" in model_id:
            if dep is None:
                raise AwsError(404, "ResourceNotFoundException", f"The deployment {model_id} does not exist.")
            if dep["status"] != "Active":
                raise AwsError(429, "ModelNotReadyException", f"Deployment {model_id} is {dep['status']}; it cannot "
                                                              "serve requests yet.")
            return "nova-custom:" + dep["modelArn"].rsplit("/", 1)[-1]
        if ":custom-model/" in model_id:
            raise AwsError(400, "ValidationException", "Invoking a custom model needs a deployment (on-demand) or "
                                                       "provisioned throughput: use its ARN as the modelId.")
        if model_id.startswith("amazon.nova") or model_id.startswith(("us.amazon.nova", "global.amazon.nova")):
            return model_id
        raise AwsError(400, "ValidationException", "The provided model identifier is invalid.")

    def _converse(model_id: str, operation: str):
        model_id = unquote(model_id)
        p = params_for(operation, {"modelId": model_id})
        label = _serving(model_id)
        _check_conversation(p)
        blocks, stop, usage = _answer(p, label)
        return p, blocks, stop, usage

    @bp.post("/model/<path:model_id>/converse")
    def converse(model_id):
        started = time.time()
        _, blocks, stop, usage = _converse(model_id, "converse")
        return jsonify({"output": {"message": {"role": "assistant", "content": blocks}}, "stopReason": stop,
                        "usage": usage, "metrics": {"latencyMs": int((time.time() - started) * 1000)}})

    @bp.post("/model/<path:model_id>/converse-stream")
    def converse_stream(model_id):
        started = time.time()
        _, blocks, stop, usage = _converse(model_id, "converse_stream")
        return Response(_stream_frames(state, blocks, stop, usage, started),
                        mimetype="application/vnd.amazon.eventstream")

    # ---- test controls --------------------------------------------------------------------------
    @bp.post("/_local/native/jobs/<path:job_identifier>/fail")
    def fail_job(job_identifier):
        with state.lock:
            try:
                job = _find_job(nat, job_identifier)
            except AwsError as err:
                return _aws_error(err.status, err.code, err.message)
            job["_force_fail"] = (request.get_json(silent=True) or {}).get("message") or "Injected training failure."
        return jsonify({"ok": True})

    @bp.post("/_local/native/deployments/<path:deployment_identifier>/fail")
    def fail_deployment(deployment_identifier):
        with state.lock:
            try:
                dep = _find_deployment(nat, deployment_identifier)
            except AwsError as err:
                return _aws_error(err.status, err.code, err.message)
            dep["_fail"] = (request.get_json(silent=True) or {}).get("message") or "Injected deployment failure."
        return jsonify({"ok": True})

    @bp.get("/_local/native")
    def inspect():
        with state.lock:
            return jsonify({"requests": nat.requests[-200:], "published": nat.published[-200:],
                            "jobs": {a: _job_view(j) for a, j in nat.jobs.items()},
                            "deployments": {a: _job_view(d) for a, d in nat.deployments.items()}})

    @bp.post("/_local/native/reset")
    def reset():
        nonlocal nat
        with state.lock:
            nat = state.native = NativeState()
        return jsonify({"ok": True})

    threading.Thread(target=ticker, args=(state,), daemon=True, name="local-bedrock-native-clock").start()
    return bp
