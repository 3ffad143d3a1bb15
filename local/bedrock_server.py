"""A local Amazon Bedrock "Mantle" endpoint: the OpenAI-compatible subset rft-hub uses.

Strict where Bedrock is (shared/docs/bedrock-rft.md): bearer tokens must be
`bedrock-api-key-...`; purpose must be fine-tune; `suffix` is refused; only
reinforcement jobs with a `lambda` grader whose ARN matches Bedrock's pattern;
only n_epochs, batch_size and learning_rate_multiplier. Jobs advance
validating_files -> queued -> running -> succeeded on a configurable clock; each
training step samples responses, scores them by invoking the job's grader Lambda
with the reward contract (bare list in, list out) through the Lambda Invoke API
(AWS_ENDPOINT_URL_LAMBDA), and emits a `metrics` event from those real scores.
AWS documents no EventBridge event for these OpenAI-compatible jobs, so by default none is
published; `POST /_local/config {"mantle_events": true}` publishes their state changes as native
"Model Customization Job State Change" events (when AWS_ENDPOINT_URL_EVENTS is set). Bedrock's
native API (Nova jobs, deployments, Converse) is local/bedrock_native.py, on the same port.

Control endpoints under /_local/ set the clock and inject failures per test.

The simulated policy is replaceable (the training watch's tests drive it): `POST
/_local/jobs/{bedrock job id}/policy {"url": ...}` makes each training step POST {"step",
"total_steps", "prompts": [{"id", "messages", "reference_answer", ...}], "samples_per_prompt": k} to
that URL and use its {"responses": [[k texts] per prompt]} as the rollouts sent to the grader (k is
the clock's `samples_per_prompt`, default 4; `samples_per_step // k` prompts a step); `POST
/_local/models/{model}/policy {"url": ...}` answers chat completions and responses for that model
from the same kind of URL (one prompt, one response). `{"url": null}` removes a policy.

Streamed answers (chat completions and responses) come event by event like a real endpoint's:
the first after `stream_ttft_ms`, the next ones `stream_token_ms` apart (`POST /_local/config`).
`stream_hold: true` stops every stream that starts after it right after its first event, until
`POST /_local/stream/release`; `stream_error_after: N` ends the next streams with an error event
after N events, `stream_cut_after: N` drops their connection after N events.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import threading
import time
import urllib.request
import uuid
from typing import Any

import boto3
from flask import Flask, Response, jsonify, request

from local import bedrock_native

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


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> Response:
    resp = jsonify({"error": {"message": message, "type": type_, "code": code, "param": param}})
    resp.status_code = status
    return resp


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
        self.projects: dict[str, dict] = {"default": _project_record("default", "Default project")}
        self.owners: dict[str, str] = {}     # file or job id -> project id

    def reset(self) -> None:
        with self.lock:
            self.__init__(self.account, self.region)


def create_app(state: State | None = None) -> Flask:
    state = state or State(os.environ.get("LOCAL_ACCOUNT_ID", "123456789012"),
                           os.environ.get("AWS_DEFAULT_REGION", "us-west-2"))
    app = Flask("local-bedrock")
    app.config["state"] = state
    app.register_blueprint(bedrock_native.create_blueprint(state))   # the native API (SigV4): before the gate

    @app.before_request
    def gate():
        if request.path.startswith("/_local/"):
            return None
        with state.lock:
            state.requests.append({"method": request.method, "path": request.path,
                                   "body": request.get_json(silent=True) if request.is_json else None,
                                   "project": request.headers.get("OpenAI-Project")})
            fault = next((f for f in state.faults if f["count"] > 0 and request.path.startswith(f.get("path", "/"))
                          and f.get("method", request.method) == request.method), None)
            if fault:
                fault["count"] -= 1
            latency = state.latency_ms
        if latency:
            time.sleep(latency / 1000)
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer bedrock-api-key-"):
            return _error(401, "Missing or invalid Bedrock API key.", "authentication_error", "invalid_api_key")
        if fault:
            return _error(fault["status"], f"Injected failure ({fault['status']}).",
                          "rate_limit_error" if fault["status"] == 429 else "server_error")
        return None

    # ---- control -------------------------------------------------------------------------
    @app.post("/_local/reset")
    def reset():
        state.reset()
        return jsonify({"ok": True})

    @app.post("/_local/config")
    def configure():
        body = request.get_json(force=True)
        with state.lock:
            state.clock.update(body.get("clock", {}))
            if "mantle_events" in body:
                state.mantle_events = bool(body["mantle_events"])
            if "latency_ms" in body:
                state.latency_ms = int(body["latency_ms"])
            if "faults" in body:
                state.faults = [dict(f) for f in body["faults"]]
            for name in DEFAULT_STREAM:
                if name in body:
                    state.stream[name] = body[name]
            if body.get("stream_hold"):
                state.stream_release = threading.Event()   # streams from now on wait for the next release
        return jsonify({"clock": state.clock, "faults": state.faults, "latency_ms": state.latency_ms,
                        **state.stream, "streams_held": state.streams_held})

    @app.post("/_local/stream/release")
    def release_streams():
        with state.lock:
            state.stream["stream_hold"] = False
            state.stream_release.set()
        return jsonify({"released": True})

    @app.get("/_local/requests")
    def recorded():
        with state.lock:
            return jsonify({"requests": state.requests, "published": state.published})

    @app.post("/_local/jobs/<job_id>/policy")
    def set_job_policy(job_id):
        url = _policy_url(request.get_json(silent=True))
        if isinstance(url, Response):
            return url
        with state.lock:
            if job_id not in state.jobs:
                return _error(404, f"No such job: {job_id}")
            if url:
                state.policies[job_id] = url
            else:
                state.policies.pop(job_id, None)
        return jsonify({"job_id": job_id, "url": url})

    @app.post("/_local/models/<path:model>/policy")
    def set_model_policy(model):
        url = _policy_url(request.get_json(silent=True))
        if isinstance(url, Response):
            return url
        with state.lock:
            if url:
                state.model_policies[model] = url
            else:
                state.model_policies.pop(model, None)
        return jsonify({"model": model, "url": url})

    @app.before_request
    def model_policy():
        """A model with a policy answers chat completions and responses from it (see `_generate`)."""
        _POLICY.text = None
        if request.method != "POST" or request.path not in ("/v1/chat/completions", "/v1/responses"):
            return None
        body = request.get_json(silent=True)
        with state.lock:
            url = state.model_policies.get(body.get("model")) if isinstance(body, dict) else None
        if not url:
            return None
        if request.path == "/v1/chat/completions":
            messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        else:
            given = body.get("input")
            messages = [{"role": "user", "content": given}] if isinstance(given, str) else \
                [m for m in given or [] if isinstance(m, dict)] if isinstance(given, list) else []
            if isinstance(body.get("instructions"), str):
                messages = [{"role": "system", "content": body["instructions"]}] + messages
        try:
            answer = _call_policy(url, {"step": None, "total_steps": None, "model": body.get("model"),
                                        "prompts": [{"id": "inference", "messages": messages}],
                                        "samples_per_prompt": 1}, 1, 1)
        except Exception as exc:  # noqa: BLE001 - the policy is the model: its failure is a 500
            return _error(500, f"The model's policy failed: {exc}", "server_error")
        _POLICY.text = answer[0][0]
        return None

    @app.post("/_local/jobs/<job_id>/fail")
    def force_fail(job_id):
        with state.lock:
            job = state.jobs.get(job_id)
            if not job:
                return _error(404, "no such job")
            job["_force_fail"] = request.get_json(silent=True) or {"message": "Injected training failure."}
        return jsonify({"ok": True})

    # ---- files ---------------------------------------------------------------------------
    @app.post("/v1/files")
    def create_file():
        purpose = request.form.get("purpose")
        if purpose != "fine-tune":
            return _error(400, f"Invalid purpose '{purpose}'. Supported: fine-tune.", param="purpose")
        upload = request.files.get("file")
        if upload is None:
            return _error(400, "Missing file.", param="file")
        data = upload.read()
        file_id = str(uuid.uuid4())  # Bedrock returns bare UUIDs
        record = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                  "filename": upload.filename or "file.jsonl", "purpose": purpose, "status": "processed"}
        with state.lock:
            state.files[file_id] = record
            state.file_bytes[file_id] = data
        return jsonify(record)

    @app.get("/v1/files")
    def list_files():
        with state.lock:
            return jsonify({"object": "list", "data": list(state.files.values()), "has_more": False})

    @app.get("/v1/files/<file_id>")
    def get_file(file_id):
        with state.lock:
            record = state.files.get(file_id)
        return jsonify(record) if record else _error(404, f"No such file: {file_id}")

    @app.delete("/v1/files/<file_id>")
    def delete_file(file_id):
        with state.lock:
            if state.files.pop(file_id, None) is None:
                return _error(404, f"No such file: {file_id}")
            state.file_bytes.pop(file_id, None)
        return jsonify({"id": file_id, "object": "file", "deleted": True})

    # ---- fine-tuning jobs ----------------------------------------------------------------
    @app.post("/v1/fine_tuning/jobs")
    def create_job():
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return _error(400, "Body must be a JSON object.")
        if "suffix" in body:
            return _error(400, "Suffix field is not supported.", param="suffix")
        unknown = set(body) - JOB_FIELDS
        if unknown:
            return _error(400, f"Unrecognized request argument(s): {sorted(unknown)}.", param=sorted(unknown)[0])
        if body.get("model") not in RFT_MODELS:
            return _error(400, f"Model {body.get('model')!r} does not support reinforcement fine-tuning.",
                          param="model")
        with state.lock:
            if body.get("training_file") not in state.files:
                return _error(400, f"Training file {body.get('training_file')!r} not found.", param="training_file")
            if body.get("validation_file") and body["validation_file"] not in state.files:
                return _error(400, "Validation file not found.", param="validation_file")
        problem = _check_method(body.get("method"))
        if problem:
            return _error(400, problem, param="method")
        job_id = "ftjob-" + uuid.uuid4().hex[:24]
        now = int(time.time())
        hp = body["method"]["reinforcement"].get("hyperparameters") or {}
        job = {"id": job_id, "object": "fine_tuning.job", "created_at": now, "error": None,
               "fine_tuned_model": None, "finished_at": None,
               "hyperparameters": {"n_epochs": hp.get("n_epochs", 1), "batch_size": hp.get("batch_size", 4),
                                   "learning_rate_multiplier": hp.get("learning_rate_multiplier", 1.0)},
               "model": body["model"], "organization_id": state.account, "result_files": [],
               "seed": body.get("seed", 0), "status": "validating_files", "trained_tokens": None,
               "training_file": body["training_file"], "validation_file": body.get("validation_file"),
               "method": body["method"], "metadata": body.get("metadata"),
               "_t0": time.monotonic(), "_phase_at": time.monotonic(), "_step": 0}
        with state.lock:
            state.jobs[job_id] = job
            state.events[job_id] = []
            state.checkpoints[job_id] = []
            _event(state, job, "Validating training file.")
        return jsonify(_public(job))

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs():
        limit = int(request.args.get("limit", 20))
        after = request.args.get("after")
        with state.lock:
            jobs = sorted(state.jobs.values(), key=lambda j: j["created_at"], reverse=True)
        ids = [j["id"] for j in jobs]
        if after in ids:
            jobs = jobs[ids.index(after) + 1:]
        return jsonify({"object": "list", "data": [_public(j) for j in jobs[:limit]],
                        "has_more": len(jobs) > limit})

    @app.get("/v1/fine_tuning/jobs/<job_id>")
    def get_job(job_id):
        with state.lock:
            job = state.jobs.get(job_id)
            return jsonify(_public(job)) if job else _error(404, f"No such job: {job_id}")

    @app.post("/v1/fine_tuning/jobs/<job_id>/cancel")
    def cancel_job(job_id):
        with state.lock:
            job = state.jobs.get(job_id)
            if not job:
                return _error(404, f"No such job: {job_id}")
            if job["status"] in ("succeeded", "failed"):
                return _error(400, f"Job {job_id} has already {job['status']} and cannot be cancelled.")
            if job["status"] != "cancelled":
                _set_status(state, job, "cancelled")
            return jsonify(_public(job))

    @app.get("/v1/fine_tuning/jobs/<job_id>/events")
    def job_events(job_id):
        return _page(state.events, job_id)

    @app.get("/v1/fine_tuning/jobs/<job_id>/checkpoints")
    def job_checkpoints(job_id):
        return _page(state.checkpoints, job_id)

    def _page(store: dict, job_id: str):
        limit = int(request.args.get("limit", 20))
        after = request.args.get("after")
        with state.lock:
            if job_id not in state.jobs:
                return _error(404, f"No such job: {job_id}")
            items = list(reversed(store[job_id]))  # newest first
        ids = [i["id"] for i in items]
        if after in ids:
            items = items[ids.index(after) + 1:]
        return jsonify({"object": "list", "data": items[:limit], "has_more": len(items) > limit})

    # ---- inference -----------------------------------------------------------------------
    @app.get("/v1/models")
    def models():
        with state.lock:
            tuned = [j["fine_tuned_model"] for j in state.jobs.values() if j.get("fine_tuned_model")]
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "bedrock"} for m in INFERENCE_MODELS + tuned]
        return jsonify({"object": "list", "data": data})

    @app.post("/v1/chat/completions")
    def chat():
        body = request.get_json(silent=True) or {}
        problem = _known_model(state, body.get("model"))
        if problem:
            return problem
        try:
            answer = _chat_completion(body)
        except BadRequest as bad:
            return _error(400, bad.message, param=bad.param)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return Response(_paced(state, _sse_chat(answer, include_usage), "chat"), mimetype="text/event-stream")
        return jsonify(answer)

    @app.post("/v1/responses")
    def responses():
        body = request.get_json(silent=True) or {}
        problem = _known_model(state, body.get("model"))
        if problem:
            return problem
        try:
            answer = _response(body)
        except BadRequest as bad:
            return _error(400, bad.message, param=bad.param)
        if body.get("stream"):
            return Response(_paced(state, _sse_response(answer), "responses"), mimetype="text/event-stream")
        return jsonify(answer)

    _add_projects(app, state)   # per-project files, jobs and models (after the gate: authenticated first)
    threading.Thread(target=_ticker, args=(state,), daemon=True, name="local-bedrock-clock").start()
    return app


def _check_method(method: Any) -> str | None:
    if not isinstance(method, dict) or method.get("type") != "reinforcement":
        return "method.type must be 'reinforcement'."
    rft = method.get("reinforcement")
    if not isinstance(rft, dict) or set(rft) - {"grader", "hyperparameters"}:
        return "method.reinforcement must hold only 'grader' and 'hyperparameters'."
    grader = rft.get("grader")
    if not isinstance(grader, dict) or grader.get("type") != "lambda":
        return f"Unsupported grader type {grader.get('type') if isinstance(grader, dict) else grader!r}; " \
               "only 'lambda' is supported."
    arn = (grader.get("lambda") or {}).get("function", "")
    if not isinstance(arn, str) or not LAMBDA_ARN.match(arn):
        return f"Invalid Lambda function ARN {arn!r}."
    for name, value in (rft.get("hyperparameters") or {}).items():
        if name not in HYPER:
            return f"Unsupported hyperparameter '{name}'."
        kind, lo, hi = HYPER[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi \
                or (kind is int and not float(value).is_integer()):
            return f"Hyperparameter '{name}' must be {kind.__name__} in [{lo}, {hi}]."
    return None


def _known_model(state: State, model: Any) -> Response | None:
    with state.lock:
        tuned = {j["fine_tuned_model"] for j in state.jobs.values() if j.get("fine_tuned_model")}
        tuned |= {c["fine_tuned_model_checkpoint"] for cks in state.checkpoints.values() for c in cks}
    if model in INFERENCE_MODELS or model in tuned:
        return None
    return _error(404, f"The model `{model}` does not exist or you do not have access to it.",
                  code="model_not_found", param="model")


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _judge_reply(prompt: str) -> str | None:
    """A stand-in LLM judge: prompts with "Reference:" and "Answer:" lines get {"score": similarity}."""
    import difflib

    ref = re.search(r"Reference:\s*(.*)", prompt)
    ans = re.search(r"Answer:\s*(.*)", prompt)
    if not ref or not ans:
        return None
    if "REFUSE" in prompt:
        return "I'm sorry, I can't grade this."
    ratio = difflib.SequenceMatcher(None, ref.group(1).strip().lower(), ans.group(1).strip().lower()).ratio()
    return json.dumps({"score": round(ratio, 3)})


_POLICY = threading.local()     # this request's answer from the model's policy, if it has one


def _generate(prompt: str, model: str, max_tokens: int | None) -> tuple[str, dict, bool]:
    """(text, usage, cut short by max_tokens) of one plain completion."""
    chosen = getattr(_POLICY, "text", None)
    if chosen is not None:         # POST /_local/models/{model}/policy
        return chosen, _usage(prompt, len(_pieces(chosen))), False
    judged = _judge_reply(prompt)
    if judged is not None:
        return judged, _usage(prompt, 8), False
    words = (f"[{model}] " + (prompt[-200:] if prompt else "ok")).split()
    truncated = bool(max_tokens) and len(words) > int(max_tokens)
    if max_tokens:
        words = words[: max(1, int(max_tokens))]
    return " ".join(words), _usage(prompt, len(words)), truncated


def _usage(prompt: str, completion_tokens: int) -> dict:
    p = _tokens(prompt)
    return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}


# ---- inference: complete answers, as Bedrock's OpenAI-compatible endpoint gives them -------------
# Every body carries what OpenAI's API reference requires (choices[].logprobs, message.refusal; on a
# response: error, incomplete_details, instructions, metadata, temperature, top_p, usage details ...),
# and honours what the request asks for: `n` choices, a tool call when `tool_choice` requires one,
# JSON matching a `json_schema` response format, logprobs.

class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def _int_in(body: dict, name: str, lo: int, hi: int, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be an integer from {lo} to {hi}.", name)
    return value


def _schema_instance(schema: Any, root: Any, depth: int = 0) -> Any:
    """A value valid against a (JSON Schema) response format or tool parameters: what a model
    constrained to the schema answers (required properties, and all of them when none are)."""
    if not isinstance(schema, dict) or depth > 12:
        return {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return _schema_instance(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = [o for o in schema.get(key) or [] if not (isinstance(o, dict) and o.get("type") == "null")]
        if options:
            return _schema_instance(options[0], root, depth + 1)
    if isinstance(schema.get("allOf"), list):
        merged: dict = {}
        for part in schema["allOf"]:
            value = _schema_instance(part, root, depth + 1)
            if isinstance(value, dict):
                merged.update(value)
        return merged
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        props = schema.get("properties") or {}
        names = schema.get("required") or list(props)
        return {n: _schema_instance(props.get(n, {}), root, depth + 1) for n in names}
    if kind == "array":
        return [_schema_instance(schema.get("items") or {}, root, depth + 1)
                for _ in range(max(1, int(schema.get("minItems") or 0)))]
    if kind in ("integer", "number"):
        lo = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        value = lo + (1 if "exclusiveMinimum" in schema else 0)
        hi = schema.get("maximum")
        value = min(value, hi) if hi is not None else value
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    text = "ok" * max(1, int(schema.get("minLength") or 1))
    return text[: schema["maxLength"]] if schema.get("maxLength") else text


def _pieces(text: str) -> list[str]:
    """The text as the tokens it is streamed and scored in (they add up to the text)."""
    return re.findall(r"\S+\s*|\s+", text) or [text]


def _logprobs(text: str, top: int) -> list[dict]:
    out = []
    for i, token in enumerate(_pieces(text)):
        logprob = -round(0.01 + 0.03 * (i % 7), 4)
        alternatives = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
        alternatives += [{"token": f"{token.strip()}{k}", "logprob": round(logprob - 1.5 * k, 4),
                          "bytes": list(f"{token.strip()}{k}".encode())} for k in range(1, top)]
        out.append({"token": token, "logprob": logprob, "bytes": list(token.encode()),
                    "top_logprobs": alternatives[:top]})
    return out


def _chat_tools(body: dict) -> tuple[list[dict], dict | None]:
    """(offered function tools, the tool the model must call or None)."""
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array.", "tools")
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str):
            raise BadRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}.",
                             f"tools[{i}]")
        names.append(fn["name"])
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none"):
        return tools, None
    if not tools:
        raise BadRequest("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
    if choice == "required":
        return tools, tools[0]["function"]
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise BadRequest(f"tool_choice names function {name!r}, which is not in 'tools'.", "tool_choice")
        return tools, tools[names.index(name)]["function"]
    raise BadRequest("'tool_choice' must be 'none', 'auto', 'required' or a function.", "tool_choice")


def _json_format(fmt: Any, param: str) -> dict | None:
    """The JSON schema a response format asks for ({} for json_object), None for text."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest(f"'{param}.type' must be 'text', 'json_object' or 'json_schema'.", param)
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {}
    spec = fmt.get("json_schema") if param == "response_format" else fmt
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise BadRequest(f"'{param}' of type json_schema needs a 'name'.", param)
    schema = spec.get("schema") or {}
    if not isinstance(schema, dict):
        raise BadRequest(f"'{param}' schema must be an object.", param)
    return schema


def _json_text(schema: dict, text: str) -> str:
    value = _schema_instance(schema, schema) if schema else {"answer": text}
    return json.dumps(value)


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _chat_completion(body: dict) -> dict:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list.", "messages")
    n = _int_in(body, "n", 1, 128, 1)
    want_logprobs = body.get("logprobs")
    if want_logprobs is not None and not isinstance(want_logprobs, bool):
        raise BadRequest("'logprobs' must be a boolean.", "logprobs")
    top = _int_in(body, "top_logprobs", 0, 20, 0)
    if body.get("top_logprobs") is not None and not want_logprobs:
        raise BadRequest("'logprobs' must be true when 'top_logprobs' is set.", "top_logprobs")
    _, forced = _chat_tools(body)
    schema = _json_format(body.get("response_format"), "response_format")
    prompt_text = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    text, usage, truncated = _generate(prompt_text, body.get("model"), body.get("max_tokens") or
                                       body.get("max_completion_tokens"))
    choices, completion_tokens = [], 0
    for index in range(n):
        message: dict = {"role": "assistant", "content": None, "refusal": None}
        if forced is not None:
            message["tool_calls"] = [{"id": _call_id(), "type": "function", "function": {
                "name": forced["name"], "arguments": _json_text(forced.get("parameters") or {"type": "object"}, "")}}]
            finish, scored = "tool_calls", None
            completion_tokens += _tokens(message["tool_calls"][0]["function"]["arguments"])
        else:
            content = _json_text(schema, text) if schema is not None else text
            message["content"] = content
            finish, scored = ("length" if truncated and schema is None else "stop"), content
            completion_tokens += len(_pieces(content))
        logprobs = {"content": _logprobs(scored, top) if scored is not None else None, "refusal": None} \
            if want_logprobs else None
        choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
    usage = {**usage, "completion_tokens": completion_tokens,
             "total_tokens": usage["prompt_tokens"] + completion_tokens}
    return {"id": "chatcmpl-" + uuid.uuid4().hex[:20], "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "choices": choices, "usage": usage, "service_tier": "default"}


def _sse_chat(answer: dict, include_usage: bool):
    """The same answer as `chat.completion.chunk`s: per choice a role chunk, its content (or tool
    call) piece by piece with its logprobs, a finish chunk; then the usage chunk if asked for."""
    base = {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"],
            "model": answer["model"], "service_tier": answer["service_tier"]}

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
        return "data: " + json.dumps({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                                            "finish_reason": finish}]}) + "\n\n"

    for choice in answer["choices"]:
        i, message = choice["index"], choice["message"]
        if message.get("tool_calls"):
            call = message["tool_calls"][0]
            yield chunk(i, {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                {"index": 0, "id": call["id"], "type": "function",
                 "function": {"name": call["function"]["name"], "arguments": ""}}]})
            for piece in _pieces(call["function"]["arguments"]):
                yield chunk(i, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        else:
            yield chunk(i, {"role": "assistant", "content": "", "refusal": None})
            scored = (choice["logprobs"] or {}).get("content") or []
            for k, piece in enumerate(_pieces(message["content"])):
                logprobs = {"content": scored[k:k + 1], "refusal": None} if choice["logprobs"] else None
                yield chunk(i, {"content": piece}, logprobs=logprobs)
        yield chunk(i, {}, choice["finish_reason"])
    if include_usage:
        yield "data: " + json.dumps({**base, "choices": [], "usage": answer["usage"]}) + "\n\n"
    yield "data: [DONE]\n\n"


def _sse_response(answer: dict):
    """The same response as the Responses API streams it: response.created and .in_progress,
    then per output item its added / delta / done events, then response.completed (or
    .incomplete) carrying the whole response with its usage."""
    seq = -1

    def event(kind: str, **fields) -> str:
        nonlocal seq
        seq += 1
        return f"event: {kind}\ndata: " + json.dumps({"type": kind, **fields, "sequence_number": seq}) + "\n\n"

    # In progress: no output yet and no usage (OpenAI's document has no null usage).
    started = {**{k: v for k, v in answer.items() if k != "usage"}, "status": "in_progress", "output": [],
               "completed_at": None, "incomplete_details": None}
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    for i, item in enumerate(answer["output"]):
        if item["type"] == "message":
            yield event("response.output_item.added", output_index=i,
                        item={**item, "status": "in_progress", "content": []})
            for c, part in enumerate(item["content"]):
                ids = {"item_id": item["id"], "output_index": i, "content_index": c}
                scored = part.get("logprobs") or []
                yield event("response.content_part.added", **ids, part={**part, "text": "", "logprobs": []})
                for k, piece in enumerate(_pieces(part["text"])):
                    yield event("response.output_text.delta", **ids, delta=piece, logprobs=scored[k:k + 1])
                yield event("response.output_text.done", **ids, text=part["text"], logprobs=scored)
                yield event("response.content_part.done", **ids, part=part)
        elif item["type"] == "function_call":
            yield event("response.output_item.added", output_index=i,
                        item={**item, "status": "in_progress", "arguments": ""})
            for piece in _pieces(item["arguments"]):
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=i, delta=piece)
            yield event("response.function_call_arguments.done", item_id=item["id"], name=item["name"],
                        output_index=i, arguments=item["arguments"])
        else:
            yield event("response.output_item.added", output_index=i, item=item)
        yield event("response.output_item.done", output_index=i, item=item)
    final = "response.completed" if answer["status"] == "completed" else "response.incomplete"
    yield event(final, response=answer)


class StreamCut(Exception):
    """Raised inside a streamed body: the server drops the connection mid-answer."""


def _paced(state: State, events, style: str):
    """Streams `events` as a real endpoint does: spaced in time, held, failed or cut as configured
    (the settings in force when the stream starts)."""
    with state.lock:
        settings = dict(state.stream)
        release = state.stream_release
    sequence = -1
    for count, chunk in enumerate(events):
        time.sleep((settings["stream_ttft_ms"] if count == 0 else settings["stream_token_ms"]) / 1000)
        if count and count == settings["stream_cut_after"]:
            raise StreamCut(f"stream cut after {count} events (stream_cut_after)")
        if count and count == settings["stream_error_after"]:
            if style == "chat":
                yield "data: " + json.dumps({"error": {"message": "Injected stream failure.", "type": "server_error",
                                                       "param": None, "code": "internal_error"}}) + "\n\n"
            else:
                yield "event: error\ndata: " + json.dumps({"type": "error", "code": "internal_error",
                                                           "message": "Injected stream failure.", "param": None,
                                                           "sequence_number": sequence + 1}) + "\n\n"
            return
        found = re.search(r'"sequence_number": (\d+)', chunk)
        sequence = int(found.group(1)) if found else sequence
        yield chunk
        if count == 0 and settings["stream_hold"]:
            with state.lock:
                state.streams_held += 1
            try:
                release.wait(STREAM_HOLD_LIMIT_SECONDS)
            finally:
                with state.lock:
                    state.streams_held -= 1


def _response_tools(body: dict) -> tuple[list[dict], dict | None]:
    """(the tools as a response echoes them, the function the model must call or None)."""
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array.", "tools")
    echoed = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            raise BadRequest(f"tools[{i}]: only function tools ({{'type': 'function', 'name': ...}}) are "
                             "supported.", f"tools[{i}]")
        echoed.append({"type": "function", "name": tool["name"], "description": tool.get("description"),
                       "parameters": tool.get("parameters"),
                       "strict": tool.get("strict") if tool.get("strict") is not None else True})
    choice = body.get("tool_choice", "auto")
    if choice in ("auto", "none"):
        return echoed, None
    if not echoed:
        raise BadRequest("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
    if choice == "required":
        return echoed, echoed[0]
    if isinstance(choice, dict) and choice.get("type") == "function":
        found = next((t for t in echoed if t["name"] == choice.get("name")), None)
        if found is None:
            raise BadRequest(f"tool_choice names function {choice.get('name')!r}, which is not in 'tools'.",
                             "tool_choice")
        return echoed, found
    raise BadRequest("'tool_choice' must be 'none', 'auto', 'required' or a function.", "tool_choice")


def _number_in(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise BadRequest(f"'{name}' must be a number from {lo} to {hi}.", name)
    return value


def _response(body: dict) -> dict:
    given = body.get("input")
    if given is None:
        raise BadRequest("'input' is required.", "input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise BadRequest("'instructions' must be a string.", "instructions")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise BadRequest("'metadata' must be an object of strings.", "metadata")
    temperature = _number_in(body, "temperature", 0, 2, 1.0)
    top_p = _number_in(body, "top_p", 0, 1, 1.0)
    max_output = _int_in(body, "max_output_tokens", 1, 10**7, None)
    top = _int_in(body, "top_logprobs", 0, 20, 0)
    include = body.get("include") or []
    tools, forced = _response_tools(body)
    text_param = body.get("text") or {"format": {"type": "text"}}
    if not isinstance(text_param, dict):
        raise BadRequest("'text' must be an object.", "text")
    schema = _json_format(text_param.get("format"), "text.format")
    prompt_text = given if isinstance(given, str) else json.dumps(given)
    if instructions:
        prompt_text = f"{instructions}\n{prompt_text}"
    text, usage, truncated = _generate(prompt_text, body.get("model"), max_output)
    rid = "resp_" + uuid.uuid4().hex[:24]
    if forced is not None:
        arguments = _json_text(forced.get("parameters") or {"type": "object"}, "")
        output = [{"type": "function_call", "id": "fc_" + rid[5:], "call_id": _call_id(), "name": forced["name"],
                   "arguments": arguments, "status": "completed"}]
        output_tokens, truncated = _tokens(arguments), False
    else:
        content = _json_text(schema, text) if schema is not None else text
        truncated = truncated and schema is None
        logprobs = _logprobs(content, top) if "message.output_text.logprobs" in include else []
        output = [{"type": "message", "id": "msg_" + rid[5:], "role": "assistant",
                   "status": "incomplete" if truncated else "completed",
                   "content": [{"type": "output_text", "text": content, "annotations": [], "logprobs": logprobs}]}]
        output_tokens = len(_pieces(content))
    now = int(time.time())
    return {"id": rid, "object": "response", "created_at": now,
            "status": "incomplete" if truncated else "completed", "completed_at": None if truncated else now,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
            "instructions": instructions, "max_output_tokens": max_output, "max_tool_calls": body.get("max_tool_calls"),
            "model": body["model"], "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
            "service_tier": "default", "store": body.get("store", True), "temperature": temperature,
            "text": {"format": {"type": "text"}, "verbosity": "medium", **text_param}, "tool_choice": body.get(
                "tool_choice", "auto"), "tools": tools, "top_logprobs": top, "top_p": top_p, "truncation": "disabled",
            "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": output_tokens,
                      "total_tokens": usage["prompt_tokens"] + output_tokens,
                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}},
            "metadata": metadata or {}}


# ---- the training clock ----------------------------------------------------------------------

def _public(job: dict) -> dict:
    return {k: v for k, v in job.items() if not k.startswith("_")}


def _event(state: State, job: dict, message: str, type_: str = "message", data: dict | None = None,
           level: str = "info") -> None:
    state.events[job["id"]].append({"id": "ftevent-" + uuid.uuid4().hex, "object": "fine_tuning.job.event",
                                    "created_at": int(time.time()), "level": level, "message": message,
                                    "type": type_, "data": data or {}})


def _set_status(state: State, job: dict, status: str, error: dict | None = None) -> None:
    job["status"] = status
    job["_phase_at"] = time.monotonic()
    if status in TERMINAL:
        job["finished_at"] = int(time.time())
    if error:
        job["error"] = error
    _event(state, job, f"Job {status.replace('_', ' ')}.", level="error" if status == "failed" else "info")
    _publish(state, job)


def _publish(state: State, job: dict) -> None:
    native = STATE_TO_NATIVE.get(job["status"])
    if not native or not state.mantle_events:   # /_local/config {"mantle_events": true} turns them on
        return
    arn = f"arn:aws:bedrock:{state.region}:{state.account}:model-customization-job/{job['id']}"
    detail = {"version": "0.0", "jobName": job["id"], "jobArn": arn, "outputModelName": job.get("fine_tuned_model"),
              "outputModelArn": None, "roleArn": f"arn:aws:iam::{state.account}:role/BedrockRFT",
              "jobStatus": native, "creationTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job["created_at"])),
              "lastModifiedTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "baseModelArn": f"arn:aws:bedrock:{state.region}::foundation-model/{job['model']}"}
    if job.get("error"):
        detail["failureMessage"] = job["error"]["message"]
    if job["status"] in TERMINAL:
        detail["endTime"] = detail["lastModifiedTime"]
    entry = {"Source": "aws.bedrock", "DetailType": "Model Customization Job State Change",
             "Detail": json.dumps(detail), "Resources": [arn]}
    put_event(state.published, entry, state.region)


def put_event(published: list, entry: dict, region: str) -> None:
    """Records `entry` and puts it on the local EventBridge (moto) when there is one: best
    effort, as AWS's own events are."""
    published.append(entry)
    if os.environ.get("AWS_ENDPOINT_URL_EVENTBRIDGE") or os.environ.get("AWS_ENDPOINT_URL_EVENTS"):
        try:
            boto3.client("events", region_name=region).put_events(Entries=[entry])
        except Exception:  # noqa: BLE001 - EventBridge is best effort, as on AWS
            pass


def _ticker(state: State) -> None:
    while True:
        time.sleep(0.05)
        with state.lock:
            jobs = [j for j in state.jobs.values() if j["status"] not in TERMINAL]
            clock = dict(state.clock)
        for job in jobs:
            try:
                _advance(state, job, clock)
            except Exception as exc:  # noqa: BLE001 - a broken job must not stop the clock
                with state.lock:
                    _set_status(state, job, "failed", {"code": "internal", "message": str(exc), "param": None})


def _advance(state: State, job: dict, clock: dict) -> None:
    elapsed = time.monotonic() - job["_phase_at"]
    if job.get("_force_fail"):
        with state.lock:
            _set_status(state, job, "failed", {"code": "training_failed",
                                               "message": job["_force_fail"].get("message"), "param": None})
        return
    if job["status"] == "validating_files" and elapsed >= clock["validating_seconds"]:
        rows = _rows(state, job["training_file"])
        with state.lock:
            if not 100 <= len(rows) <= 20000:
                _set_status(state, job, "failed", {"code": "invalid_training_file", "param": "training_file",
                            "message": f"Training file has {len(rows)} valid rows; 100-20000 are required."})
            else:
                _set_status(state, job, "queued")
    elif job["status"] == "queued" and elapsed >= clock["queued_seconds"]:
        with state.lock:
            _set_status(state, job, "running")
    elif job["status"] == "running" and elapsed >= clock["step_seconds"] * (job["_step"] + 1):
        _train_step(state, job, clock)


def _rows(state: State, file_id: str) -> list[dict]:
    rows = []
    for line in state.file_bytes.get(file_id, b"").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            rows.append(row)
    return rows


def _reference_text(ref: Any) -> str:
    if isinstance(ref, str):
        return ref
    if isinstance(ref, dict):
        for key in ("text", "answer", "final_answer", "solution"):
            if isinstance(ref.get(key), str):
                return ref[key]
        return json.dumps(ref)
    return ""


def _train_step(state: State, job: dict, clock: dict) -> None:
    step = job["_step"] + 1
    total = int(clock["total_steps"])
    rng = random.Random(f"{job['id']}:{step}")
    rows = _rows(state, job["training_file"])
    with state.lock:
        policy = state.policies.get(job["id"])
    if policy:
        samples = _policy_samples(job, clock, step, total, rng, rows, policy)
    else:
        quality = 0.15 + 0.8 * step / total  # the policy improves as it trains
        samples = []
        for i in range(int(clock["samples_per_step"])):
            row = rows[rng.randrange(len(rows))]
            answer = _reference_text(row.get("reference_answer")) if rng.random() < quality else "I am not sure."
            sample = {k: v for k, v in row.items() if k not in ("messages", "id")}
            sample.update({"id": f"{job['id']}-s{step}-{i}",
                           "messages": row["messages"] + [{"role": "assistant", "content": answer}]})
            samples.append(sample)
    arn = job["method"]["reinforcement"]["grader"]["lambda"]["function"]
    scores, problem = _invoke_grader(state, arn, samples)
    if problem:
        with state.lock:
            _set_status(state, job, "failed", {"code": "reward_function_error", "param": None,
                                               "message": f"Reward function {arn} failed: {problem}"})
        return
    mean = sum(scores) / len(scores)
    lengths = [len(s["messages"][-1]["content"]) / 4 for s in samples]
    with state.lock:
        if job["status"] != "running":
            return  # cancelled meanwhile
        job["_step"] = step
        job["trained_tokens"] = (job.get("trained_tokens") or 0) + int(sum(lengths))
        _event(state, job, f"Step {step}/{total}: training metrics", "metrics", {
            "step": step, "total_steps": total, "critic_rewards_mean": round(mean, 4),
            "critic_rewards_max": max(scores), "critic_rewards_min": min(scores),
            "actor_pg_loss": round(0.2 / step, 5), "actor_entropy": round(0.9 - 0.5 * step / total, 4),
            "actor_grad_norm": 0.001, "critic_advantages_mean": 0.01,
            "response_length_mean": round(sum(lengths) / len(lengths), 2)})
        if step % int(clock["checkpoint_every"]) == 0 or step == total:
            ck_id = "ftckpt-" + uuid.uuid4().hex[:20]
            state.checkpoints[job["id"]].append({
                "id": ck_id, "object": "fine_tuning.job.checkpoint", "created_at": int(time.time()),
                "fine_tuned_model_checkpoint": f"{job['model']}:ft:{job['id'][6:18]}:ckpt-step-{step}",
                "fine_tuning_job_id": job["id"], "step_number": step,
                "metrics": {"step": step, "train_reward_mean": round(mean, 4)}})
            _event(state, job, f"Checkpoint created at step {step}.")
        if step >= total:
            job["fine_tuned_model"] = f"{job['model']}:ft:{job['id'][6:18]}"
            _set_status(state, job, "succeeded")


def _policy_url(body: Any):
    """The `url` of a policy request (None removes the policy), or the 400 answer."""
    url = body.get("url") if isinstance(body, dict) else None
    if url is None or (isinstance(url, str) and url.startswith(("http://127.0.0.1:", "http://localhost:",
                                                                "http://[::1]:"))):
        return url
    return _error(400, "url must be an http:// URL on this machine (127.0.0.1, localhost or [::1]), or null.",
                  param="url")


def _call_policy(url: str, payload: dict, prompts: int, k: int) -> list[list[str]]:
    """POSTs to a policy URL; its {"responses": [[k texts] per prompt]}, checked."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.loads(resp.read() or b"null")
    responses = answer.get("responses") if isinstance(answer, dict) else None
    if not (isinstance(responses, list) and len(responses) == prompts and all(
            isinstance(r, list) and len(r) == k and all(isinstance(t, str) for t in r) for r in responses)):
        raise ValueError(f"the policy must answer {{\"responses\": [[{k} texts] x {prompts} prompts]}}")
    return responses


def _policy_samples(job: dict, clock: dict, step: int, total: int, rng: random.Random, rows: list[dict],
                    url: str) -> list[dict]:
    """One step's rollouts from a replaceable policy: `samples_per_step // k` distinct prompts, k
    samples each. Bedrock "adds a unique id" per rollout (UNCONFIRMED which form): here each gets
    a suffixed id; the row's own fields (rft_prompt among them) go with it, as on Bedrock."""
    k = max(1, int(clock.get("samples_per_prompt", 4)))
    picked = rng.sample(range(len(rows)), min(len(rows), max(1, int(clock["samples_per_step"]) // k)))
    prompts = [{**{key: v for key, v in rows[r].items() if not key.startswith("rft_")},
                "id": str(rows[r].get("id") or f"row-{r}")} for r in picked]
    responses = _call_policy(url, {"step": step, "total_steps": total, "prompts": prompts,
                                   "samples_per_prompt": k}, len(prompts), k)
    samples = []
    for j, (r, texts) in enumerate(zip(picked, responses)):
        for m, text in enumerate(texts):
            sample = {key: v for key, v in rows[r].items() if key not in ("messages", "id")}
            sample.update({"id": f"{job['id']}-s{step}-p{j}-{m}",
                           "messages": rows[r]["messages"] + [{"role": "assistant", "content": text}]})
            samples.append(sample)
    return samples


def _invoke_grader(state: State, arn: str, samples: list[dict]) -> tuple[list[float], str | None]:
    """Calls the grader with Bedrock's reward contract; returns (scores, problem)."""
    client = boto3.client("lambda", region_name=state.region)
    try:
        resp = client.invoke(FunctionName=arn, Payload=json.dumps(samples).encode())
    except client.exceptions.ResourceNotFoundException:
        return [], "function not found"
    except Exception as exc:  # noqa: BLE001
        return [], f"invoke failed: {type(exc).__name__}"
    payload = resp["Payload"].read()
    if resp.get("FunctionError"):
        return [], f"function error: {payload[:300]!r}"
    try:
        out = json.loads(payload)
    except ValueError:
        return [], "response is not JSON"
    if not isinstance(out, list):
        return [], "response is not a list"
    by_id = {o.get("id"): o for o in out if isinstance(o, dict)}
    scores = []
    for sample in samples:
        item = by_id.get(sample["id"])
        if item is None:
            return [], f"no score for sample id {sample['id']}"
        score = item.get("aggregate_reward_score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            return [], f"aggregate_reward_score for {sample['id']} is not a finite number"
        scores.append(float(score))
    return scores, None


# ---- projects (issue #15): per-application isolation on the Mantle endpoint ----------------------
# `GET`/`POST /v1/organization/projects`, `GET`/`POST .../{id}`, `POST .../{id}/archive` (shared docs
# §1.5). A request's project is its `OpenAI-Project` header (UNCONFIRMED on AWS: a third-party
# repository sends it; AWS documents projects as IAM resources), "default" without one. Files and
# jobs belong to the project that created them, a tuned model or checkpoint to its job's; another
# project gets a 404 for them, as if they did not exist, and lists show each project its own.

def _project_record(project_id: str, name: str, tags: dict | None = None) -> dict:
    return {"id": project_id, "object": "organization.project", "name": name, "created_at": int(time.time()),
            "archived_at": None, "status": "active", "tags": dict(tags or {})}


def _add_projects(app: Flask, state: State) -> None:
    from flask import g

    def current() -> str:
        return request.headers.get("OpenAI-Project") or "default"

    def owner_of_model(model: Any) -> str | None:
        for job in state.jobs.values():
            checkpoints = {c["fine_tuned_model_checkpoint"] for c in state.checkpoints.get(job["id"], [])}
            if model == job.get("fine_tuned_model") or model in checkpoints:
                return state.owners.get(job["id"], "default")
        return None

    @app.before_request
    def project_scope():
        path = request.path
        if path.startswith("/_local/") or not path.startswith("/v1/"):
            return None
        project = current()
        with state.lock:
            known = state.projects.get(project)
            if known is None or known["status"] != "active":
                return _error(404, f"No active project {project!r}.", code="project_not_found")
            g.project = project
            mine = lambda rid: state.owners.get(rid, "default") == project   # noqa: E731
            parts = path.split("/")
            if path.startswith("/v1/files/") and len(parts) >= 4 and parts[3] in state.files and not mine(parts[3]):
                return _error(404, f"No such file: {parts[3]}")
            if path.startswith("/v1/fine_tuning/jobs/") and len(parts) >= 5 and parts[4] in state.jobs \
                    and not mine(parts[4]):
                return _error(404, f"No such job: {parts[4]}")
            body = request.get_json(silent=True) if request.method == "POST" else None
            if path == "/v1/fine_tuning/jobs" and isinstance(body, dict):
                for field in ("training_file", "validation_file"):
                    if body.get(field) in state.files and not mine(body[field]):
                        return _error(400, f"{field.replace('_', ' ').capitalize()} {body[field]!r} not found.",
                                      param=field)
            if path in ("/v1/chat/completions", "/v1/responses") and isinstance(body, dict):
                owner = owner_of_model(body.get("model"))
                if owner is not None and owner != project:
                    return _error(404, f"The model `{body.get('model')}` does not exist or you do not have access "
                                       "to it.", code="model_not_found", param="model")
        return None

    @app.after_request
    def project_records(response: Response) -> Response:
        project = getattr(g, "project", None)
        if project is None or response.status_code != 200 or response.mimetype != "application/json":
            return response
        path = request.path
        if request.method == "POST" and path in ("/v1/files", "/v1/fine_tuning/jobs"):
            created = response.get_json(silent=True) or {}
            with state.lock:
                if created.get("id"):
                    state.owners[created["id"]] = project
        elif request.method == "GET" and path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/models"):
            listed = response.get_json(silent=True) or {}
            with state.lock:
                keep = [item for item in listed.get("data", [])
                        if (state.owners.get(item["id"], "default") if path != "/v1/models"
                            else (owner_of_model(item["id"]) or project)) == project]
            response.set_data(json.dumps({**listed, "data": keep}))
        return response

    @app.post("/v1/organization/projects")
    def create_project():
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"].strip():
            return _error(400, "'name' is required.", param="name")
        tags = body.get("tags") or {}
        if not isinstance(tags, dict) or set(body) - {"name", "tags"}:
            return _error(400, "Only 'name' and 'tags' may be given.", param=sorted(set(body) - {"name"})[0])
        record = _project_record("proj_" + uuid.uuid4().hex[:24], body["name"].strip(), tags)
        with state.lock:
            state.projects[record["id"]] = record
        return jsonify(record)

    @app.get("/v1/organization/projects")
    def list_projects():
        # Paged as OpenAI pages projects: `limit` (default 20, at most 100) and `after` an id.
        try:
            limit = int(request.args.get("limit", 20))
        except ValueError:
            return _error(400, "'limit' must be an integer.", param="limit")
        if not 1 <= limit <= 100:
            return _error(400, "'limit' must be from 1 to 100.", param="limit")
        with state.lock:
            data = [p for p in state.projects.values() if request.args.get("include_archived") == "true"
                    or p["status"] == "active"]
        after = request.args.get("after")
        if after:
            at = next((i for i, p in enumerate(data) if p["id"] == after), None)
            if at is None:
                return _error(400, f"No such project: {after}", param="after")
            data = data[at + 1:]
        return jsonify({"object": "list", "data": data[:limit], "has_more": len(data) > limit,
                        "first_id": data[0]["id"] if data else None,
                        "last_id": data[:limit][-1]["id"] if data else None})

    @app.get("/v1/organization/projects/<project_id>")
    def get_project(project_id):
        with state.lock:
            record = state.projects.get(project_id)
        return jsonify(record) if record else _error(404, f"No such project: {project_id}", code="project_not_found")

    @app.post("/v1/organization/projects/<project_id>")
    def update_project(project_id):
        body = request.get_json(silent=True) or {}
        with state.lock:
            record = state.projects.get(project_id)
            if record is None:
                return _error(404, f"No such project: {project_id}", code="project_not_found")
            if isinstance(body.get("name"), str) and body["name"].strip():
                record["name"] = body["name"].strip()
            if isinstance(body.get("tags"), dict):
                record["tags"] = dict(body["tags"])
            record["tags"].update(body.get("add_tags") or {})
            for key in body.get("remove_tag_keys") or []:
                record["tags"].pop(key, None)
            return jsonify(record)

    @app.post("/v1/organization/projects/<project_id>/archive")
    def archive_project(project_id):
        with state.lock:
            record = state.projects.get(project_id)
            if record is None or project_id == "default":
                return _error(404 if record is None else 400, f"Project {project_id} cannot be archived.",
                              code="project_not_found" if record is None else None)
            record.update(status="archived", archived_at=record["archived_at"] or int(time.time()))
            return jsonify(record)


def save(state: State, directory: str) -> None:
    """Snapshot for `make run` restarts (jobs, events, checkpoints; file bytes on disk)."""
    from pathlib import Path

    root = Path(directory)
    (root / "files").mkdir(parents=True, exist_ok=True)
    with state.lock:
        for file_id, data in state.file_bytes.items():
            path = root / "files" / file_id
            if not path.exists():
                path.write_bytes(data)
        jobs = {k: {kk: vv for kk, vv in j.items() if kk not in ("_t0", "_phase_at")} for k, j in state.jobs.items()}
        snapshot = {"files": state.files, "jobs": jobs, "events": state.events, "checkpoints": state.checkpoints,
                    "projects": state.projects, "owners": state.owners}
    tmp = root / "state.json.tmp"
    tmp.write_text(json.dumps(snapshot))
    tmp.replace(root / "state.json")


def load(state: State, directory: str) -> None:
    from pathlib import Path

    root = Path(directory)
    if not (root / "state.json").exists():
        return
    snapshot = json.loads((root / "state.json").read_text())
    with state.lock:
        state.files = snapshot["files"]
        state.file_bytes = {fid: (root / "files" / fid).read_bytes() for fid in state.files
                            if (root / "files" / fid).exists()}
        for job in snapshot["jobs"].values():
            job["_t0"] = job["_phase_at"] = time.monotonic()
        state.jobs, state.events, state.checkpoints = snapshot["jobs"], snapshot["events"], snapshot["checkpoints"]
        state.projects = snapshot.get("projects") or state.projects
        state.owners = snapshot.get("owners") or {}


def main() -> None:
    import argparse

    from werkzeug.serving import make_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--step-seconds", type=float, default=2.0)
    parser.add_argument("--total-steps", type=int, default=10)
    parser.add_argument("--state-dir", default=None)
    args = parser.parse_args()
    app = create_app()
    state = app.config["state"]
    state.clock.update({"step_seconds": args.step_seconds, "total_steps": args.total_steps,
                        "validating_seconds": 2.0, "queued_seconds": 2.0})
    if args.state_dir:
        load(state, args.state_dir)

        def autosave() -> None:
            while True:
                time.sleep(2)
                save(state, args.state_dir)
        threading.Thread(target=autosave, daemon=True).start()
    make_server("127.0.0.1", args.port, app, threaded=True).serve_forever()


if __name__ == "__main__":
    main()
