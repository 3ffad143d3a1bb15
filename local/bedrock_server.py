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
native API (Nova jobs, deployments, Converse) is local/bedrock_native.py, on the same port. Both faces
share the state (local/bedrock_state.py), the stand-in model (local/bedrock_model.py) and the training
clock (local/bedrock_trainer.py); neither imports the other's module but to register the native blueprint.

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
import os
import threading
import time
import uuid
from typing import Any

from flask import Flask, Response, jsonify, request

from local import bedrock_native, guardrails
from local.bedrock_model import POLICY, BadRequest, chat_completion, paced, response_answer, sse_chat, sse_response
from local.bedrock_state import (
    DEFAULT_STREAM,
    HYPER,
    INFERENCE_MODELS,
    JOB_FIELDS,
    LAMBDA_ARN,
    RFT_MODELS,
    State,
    project_record,
)
from local.bedrock_trainer import add_event, call_policy, public_job, set_status, ticker


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> Response:
    resp = jsonify({"error": {"message": message, "type": type_, "code": code, "param": param}})
    resp.status_code = status
    return resp


def create_app(state: State | None = None) -> Flask:
    state = state or State(os.environ.get("LOCAL_ACCOUNT_ID", "123456789012"),
                           os.environ.get("AWS_DEFAULT_REGION", "us-west-2"))
    app = Flask("local-bedrock")
    app.config["state"] = state
    app.register_blueprint(bedrock_native.create_blueprint(state))   # the native API (SigV4): before the gate
    app.register_blueprint(guardrails.create_blueprint(state))       # ApplyGuardrail (SigV4), /_local/guardrails

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
        POLICY.text = None
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
            answer = call_policy(url, {"step": None, "total_steps": None, "model": body.get("model"),
                                        "prompts": [{"id": "inference", "messages": messages}],
                                        "samples_per_prompt": 1}, 1, 1)
        except Exception as exc:  # noqa: BLE001 - the policy is the model: its failure is a 500
            return _error(500, f"The model's policy failed: {exc}", "server_error")
        POLICY.text = answer[0][0]
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
            add_event(state, job, "Validating training file.")
        return jsonify(public_job(job))

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs():
        limit = int(request.args.get("limit", 20))
        after = request.args.get("after")
        with state.lock:
            jobs = sorted(state.jobs.values(), key=lambda j: j["created_at"], reverse=True)
        ids = [j["id"] for j in jobs]
        if after in ids:
            jobs = jobs[ids.index(after) + 1:]
        return jsonify({"object": "list", "data": [public_job(j) for j in jobs[:limit]],
                        "has_more": len(jobs) > limit})

    @app.get("/v1/fine_tuning/jobs/<job_id>")
    def get_job(job_id):
        with state.lock:
            job = state.jobs.get(job_id)
            return jsonify(public_job(job)) if job else _error(404, f"No such job: {job_id}")

    @app.post("/v1/fine_tuning/jobs/<job_id>/cancel")
    def cancel_job(job_id):
        with state.lock:
            job = state.jobs.get(job_id)
            if not job:
                return _error(404, f"No such job: {job_id}")
            if job["status"] in ("succeeded", "failed"):
                return _error(400, f"Job {job_id} has already {job['status']} and cannot be cancelled.")
            if job["status"] != "cancelled":
                set_status(state, job, "cancelled")
            return jsonify(public_job(job))

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
            answer = chat_completion(body)
        except BadRequest as bad:
            return _error(400, bad.message, param=bad.param)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return Response(paced(state, sse_chat(answer, include_usage), "chat"), mimetype="text/event-stream")
        return jsonify(answer)

    @app.post("/v1/responses")
    def responses():
        body = request.get_json(silent=True) or {}
        problem = _known_model(state, body.get("model"))
        if problem:
            return problem
        try:
            answer = response_answer(body)
        except BadRequest as bad:
            return _error(400, bad.message, param=bad.param)
        if body.get("stream"):
            return Response(paced(state, sse_response(answer), "responses"), mimetype="text/event-stream")
        return jsonify(answer)

    _add_projects(app, state)   # per-project files, jobs and models (after the gate: authenticated first)
    threading.Thread(target=ticker, args=(state,), daemon=True, name="local-bedrock-clock").start()
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

def _policy_url(body: Any):
    """The `url` of a policy request (None removes the policy), or the 400 answer."""
    url = body.get("url") if isinstance(body, dict) else None
    if url is None or (isinstance(url, str) and url.startswith(("http://127.0.0.1:", "http://localhost:",
                                                                "http://[::1]:"))):
        return url
    return _error(400, "url must be an http:// URL on this machine (127.0.0.1, localhost or [::1]), or null.",
                  param="url")


def _known_model(state: State, model: Any) -> Response | None:
    with state.lock:
        tuned = {j["fine_tuned_model"] for j in state.jobs.values() if j.get("fine_tuned_model")}
        tuned |= {c["fine_tuned_model_checkpoint"] for cks in state.checkpoints.values() for c in cks}
    if model in INFERENCE_MODELS or model in tuned:
        return None
    return _error(404, f"The model `{model}` does not exist or you do not have access to it.",
                  code="model_not_found", param="model")


# ---- projects (issue #15): per-application isolation on the Mantle endpoint ----------------------
# `GET`/`POST /v1/organization/projects`, `GET`/`POST .../{id}`, `POST .../{id}/archive` (shared docs
# §1.5). A request's project is its `OpenAI-Project` header (UNCONFIRMED on AWS: a third-party
# repository sends it; AWS documents projects as IAM resources), "default" without one. Files and
# jobs belong to the project that created them, a tuned model or checkpoint to its job's; another
# project gets a 404 for them, as if they did not exist, and lists show each project its own.

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
            mine = lambda rid: state.owners.get(rid, "default") == project   # noqa: E731 - a one-line predicate, local to this route
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
        record = project_record("proj_" + uuid.uuid4().hex[:24], body["name"].strip(), tags)
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
