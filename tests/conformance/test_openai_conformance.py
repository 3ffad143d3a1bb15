"""Every OpenAI-shaped answer rft-hub gives is valid against OpenAI's published OpenAPI document
(issue #13), through the unmodified openai SDK, and the SDK's typed objects come back fully
populated: no typed field is None where the service sent a value.

Bodies are read raw (`with_raw_response`) and checked by tests/openai_spec.py against the schema the
document gives for the operation and status; error bodies against ErrorResponse. Answers that use one
of rft-hub's documented extensions (docs/api.md, "OpenAI API extensions": a `lambda` or saved grader, a
multi grader's named map) are checked with exactly those extensions allowed, and are shown to fail the
strict check only where the extension is."""
from __future__ import annotations

import json
import re
import urllib.request

import jsonschema
import openai
import openai_spec as spec
import pydantic
import pytest
from helpers import ADMIN_KEY, GRADER, http, register_graders, rft, wait_for, wait_submitted
from sample_data import arithmetic_rows, jsonl

MODEL = "openai.gpt-oss-20b"
EQ = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
      "reference": "{{item.reference_answer}}", "operation": "eq"}
FUZZY = {"type": "text_similarity", "name": "fuzzy", "input": "{{sample.output_text}}",
         "reference": "{{item.reference_answer}}", "evaluation_metric": "fuzzy_match"}
JUDGE = {"type": "score_model", "name": "judge", "model": "openai.gpt-oss-120b", "range": [0, 1],
         "input": [{"role": "user", "content": "Reference: {{item.reference_answer}}\nAnswer: {{sample.output_text}}"}]}
MULTI_OPENAI = {"type": "multi", "name": "one", "graders": EQ, "calculate_output": "exact * 0.5"}   # OpenAI's form
MULTI_MAP = {"type": "multi", "name": "combo", "graders": {"exact": EQ, "fuzzy": FUZZY},               # extension
             "calculate_output": "(exact + fuzzy) / 2"}
LAMBDA = {"type": "lambda", "name": "team", "lambda": {"function": GRADER}}                          # extension
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
           "required": ["city", "days"], "additionalProperties": False}


# ---- helpers ------------------------------------------------------------------------------------

def populated(obj, raw, where="", skip=()) -> list[str]:
    """Where the SDK's typed object lost what the service sent: a field the SDK types as required
    that the body lacks, or a typed field left None although the body has a value for it. `skip`:
    places holding an extension, which the SDK cannot type (it coerces a lambda grader into its
    first grader type, say)."""
    problems = []
    if any(where == s or where.startswith(s + ".") for s in skip):
        return problems
    if isinstance(obj, pydantic.BaseModel):
        if not isinstance(raw, dict):
            return [f"{where or '(body)'}: the SDK made an object of {raw!r}"]
        for name, field in type(obj).model_fields.items():
            key, value = field.alias or name, getattr(obj, name, None)
            here = f"{where}.{key}"
            if field.is_required() and key not in raw:
                problems.append(f"{here}: required by the SDK, missing from the body")
            elif raw.get(key) is not None and value is None:
                problems.append(f"{here}: None in the SDK object, {raw[key]!r} in the body")
            elif key in raw:
                problems += populated(value, raw[key], here, skip)
    elif isinstance(obj, list) and isinstance(raw, list):
        if len(obj) != len(raw):
            return [f"{where}: {len(obj)} items in the SDK object, {len(raw)} in the body"]
        for i, (o, r) in enumerate(zip(obj, raw)):
            problems += populated(o, r, f"{where}[{i}]", skip)
    return problems


def assert_populated(obj, raw, skip=()) -> None:
    problems = populated(obj, raw, skip=skip)
    assert not problems, f"{type(obj).__name__} from the SDK:\n  " + "\n  ".join(problems)


def checked(raw_call, *args, extensions=False, **kwargs):
    """Calls an SDK method's `with_raw_response` form: checks the status, the body against OpenAI's
    document and the typed object against the body. Returns (SDK object, body)."""
    raw = raw_call(*args, **kwargs)
    body = json.loads(raw.content)
    assert raw.status_code == 200, (raw.status_code, body)
    spec.validate(raw.method, raw.url.path, raw.status_code, body, raw.headers.get("content-type", ""),
                  extensions=extensions)
    parsed = raw.parse()
    extended = {f.split(":", 1)[0] for f in spec.errors(raw.method, raw.url.path, 200, body)} if extensions else ()
    assert_populated(parsed, body, skip=extended)
    return parsed, body


def refused(status, call, *args, **kwargs) -> openai.APIStatusError:
    """The SDK's typed error for `status`, whose body is OpenAI's ErrorResponse."""
    with pytest.raises(openai.APIStatusError) as caught:
        call(*args, **kwargs)
    err = caught.value
    assert err.status_code == status, (err.status_code, err.response.text)
    request = err.response.request
    spec.validate(request.method, request.url.path, status, err.response.json())
    return err


def sse(raw: bytes) -> list[dict]:
    events = [line[5:].strip() for line in raw.decode().splitlines() if line.startswith("data:")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def strict_errors_only_at(method, path, body, *where: str) -> None:
    """An answer using an extension fails the strict check, and only at the extension's places."""
    found = spec.errors(method, path, 200, body)
    assert found and {f.split(":", 1)[0] for f in found} <= set(where), found


@pytest.fixture
def training(client):
    register_graders(client)
    return client.files.create(file=("train.jsonl", jsonl(arithmetic_rows(120))), purpose="fine-tune")


# ---- files and uploads ------------------------------------------------------------------------

def test_files_match_openais_document(client, stack, make_team):
    data = jsonl(arithmetic_rows(110))
    created, body = checked(client.files.with_raw_response.create, file=("t.jsonl", data), purpose="fine-tune")
    assert "expires_at" not in body and "status_details" not in body          # unset: left out, never null
    got, _ = checked(client.files.with_raw_response.retrieve, created.id)
    assert got == created
    page, body = checked(client.files.with_raw_response.list)
    assert body["first_id"] == created.id == body["last_id"] and [f.id for f in page.data] == [created.id]
    assert client.files.content(created.id).read() == data                    # raw bytes, as uploaded
    deleted, _ = checked(client.files.with_raw_response.delete, created.id)
    assert deleted.deleted and deleted.id == created.id

    _, key = make_team("no-files")
    empty = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    _, body = checked(empty.files.with_raw_response.list)
    assert body["data"] == [] and body["first_id"] == "" and body["last_id"] == ""   # strings, as required
    _, body = checked(empty.files.with_raw_response.list, purpose="batch")
    assert body["data"] == []


def test_uploads_match_openais_document(client):
    data = jsonl(arithmetic_rows(105))
    upload, body = checked(client.uploads.with_raw_response.create, bytes=len(data), filename="u.jsonl",
                           mime_type="application/jsonl", purpose="fine-tune")
    assert upload.status == "pending" and "file" not in body                   # no file yet: left out
    half = len(data) // 2
    first, _ = checked(client.uploads.parts.with_raw_response.create, upload.id, data=data[:half])
    second, _ = checked(client.uploads.parts.with_raw_response.create, upload.id, data=data[half:])
    done, body = checked(client.uploads.with_raw_response.complete, upload.id, part_ids=[first.id, second.id])
    assert done.status == "completed" and done.file.bytes == len(data) and "expires_at" not in body["file"]

    other, _ = checked(client.uploads.with_raw_response.create, bytes=10, filename="c.jsonl",
                       mime_type="application/jsonl", purpose="fine-tune")
    cancelled, _ = checked(client.uploads.with_raw_response.cancel, other.id)
    assert cancelled.status == "cancelled"


def test_expires_after_and_evals_files_match_openais_document(client):
    """expires_after is accepted (issue #23): the file carries expires_at, as OpenAI's File does; an
    evals file's purpose is rft-hub's one documented extension on the File object."""
    policy = {"anchor": "created_at", "seconds": 3600}
    created, body = checked(client.files.with_raw_response.create, file=("t.jsonl", jsonl(arithmetic_rows(100))),
                            purpose="fine-tune", expires_after=policy)
    assert body["expires_at"] == body["created_at"] + 3600 and created.expires_at == body["expires_at"]
    checked(client.files.with_raw_response.retrieve, created.id)
    upload, _ = checked(client.uploads.with_raw_response.create, bytes=10, filename="x.jsonl",
                        mime_type="application/jsonl", purpose="fine-tune", expires_after=policy)
    assert upload.status == "pending"
    rows = jsonl([{"item": r} for r in arithmetic_rows(3)])
    evals, body = checked(client.files.with_raw_response.create, file=("e.jsonl", rows), purpose="evals",
                          extensions=True)
    assert evals.purpose == "evals"
    strict_errors_only_at("post", "/v1/files", body, ".purpose")
    refused(400, client.files.create, file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune",
            expires_after={"anchor": "created_at", "seconds": 60})


# ---- fine-tuning jobs -------------------------------------------------------------------------

def test_jobs_events_and_checkpoints_match_openais_document(client, training, bedrock):
    method = {"type": "reinforcement", "reinforcement": {"grader": EQ, "hyperparameters": {"n_epochs": 1,
                                                                                          "batch_size": 8}}}
    job, body = checked(client.fine_tuning.jobs.with_raw_response.create, model=MODEL, training_file=training.id,
                        suffix="conform", metadata={"team": "qa"}, seed=3, extra_body={"method": method})
    assert body["method"] == method                                            # echoed as sent
    wait_submitted(client, job.id)
    done = wait_for(client, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error
    got, body = checked(client.fine_tuning.jobs.with_raw_response.retrieve, job.id)
    assert got.fine_tuned_model and got.finished_at and body["method"] == method
    listed, _ = checked(client.fine_tuning.jobs.with_raw_response.list, limit=5)
    assert job.id in [j.id for j in listed.data]

    events, body = checked(client.fine_tuning.jobs.with_raw_response.list_events, job.id, limit=100)
    assert all(isinstance(e["data"], dict) for e in body["data"])             # never null
    ours = [e for e in body["data"] if e["rft_source"] == "rft-hub"]
    assert ours and any(e["data"] == {} for e in ours)
    assert {e.type for e in events.data} == {"message", "metrics"}

    checkpoints, body = checked(client.fine_tuning.jobs.checkpoints.with_raw_response.list, job.id)
    assert body["data"] and body["first_id"] == body["data"][0]["id"]
    for ck in body["data"]:
        assert None not in ck["metrics"].values() and ck["metrics"]["step"] == ck["step_number"]
        assert "train_loss" not in ck["metrics"]                               # Bedrock did not send it
        assert ck["metrics"]["train_reward_mean"] >= 0                         # what it sent is kept
    empty_page, body = checked(client.fine_tuning.jobs.checkpoints.with_raw_response.list, job.id,
                               after=body["data"][-1]["id"])
    assert body["data"] == [] and not body["has_more"]


def test_a_lambda_grader_job_is_openais_shape_but_its_grader(client, training, bedrock):
    bedrock.clock.update({"step_seconds": 5, "total_steps": 50})
    job, body = checked(client.fine_tuning.jobs.with_raw_response.create, model=MODEL, training_file=training.id,
                        extra_body={"method": rft(batch_size=512)}, extensions=True)
    assert body["method"] == rft(batch_size=512)
    extended = (".method.reinforcement.grader", ".method.reinforcement.hyperparameters.batch_size",
                ".hyperparameters.batch_size")
    strict_errors_only_at("post", "/v1/fine_tuning/jobs", body, *extended)
    wait_for(client, job.id, {"running"})
    cancelled, body = checked(client.fine_tuning.jobs.with_raw_response.cancel, job.id, extensions=True)
    assert cancelled.status == "cancelled" and body["hyperparameters"]["batch_size"] == 512
    strict_errors_only_at("post", f"/v1/fine_tuning/jobs/{job.id}/cancel", body, *extended)


def test_a_failed_job_has_openais_error_shape(client, training, bedrock):
    bedrock.clock.update({"step_seconds": 5, "total_steps": 50})
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=training.id, extra_body={
        "method": {"type": "reinforcement", "reinforcement": {"grader": EQ}}})
    bid = wait_submitted(client, job.id).model_extra["rft_bedrock_job_id"]
    with bedrock.lock:
        bedrock.jobs[bid]["_force_fail"] = {"message": "Injected training failure."}
    wait_for(client, job.id, {"failed"})
    failed, body = checked(client.fine_tuning.jobs.with_raw_response.retrieve, job.id)
    assert body["error"]["code"] and body["error"]["message"] == "Injected training failure."
    _, body = checked(client.fine_tuning.jobs.with_raw_response.list_events, job.id, limit=100)
    assert any(e["level"] == "error" for e in body["data"])


# ---- graders ----------------------------------------------------------------------------------

@pytest.mark.parametrize("grader, extended", [(EQ, False), (FUZZY, False), (JUDGE, False), (MULTI_OPENAI, False),
                                              (MULTI_MAP, True), (LAMBDA, True)],
                         ids=["string_check", "text_similarity", "score_model", "multi", "multi-map", "lambda"])
def test_graders_validate_and_run_match_openais_document(client, grader, extended):
    if grader is LAMBDA:
        register_graders(client)
    graders = client.fine_tuning.alpha.graders
    validated, body = checked(graders.with_raw_response.validate, grader=grader, extensions=extended)
    assert body["grader"] == grader                                            # echoed unchanged
    if extended:
        strict_errors_only_at("post", "/v1/fine_tuning/alpha/graders/validate", body, ".grader")
    run, body = checked(graders.with_raw_response.run, grader=grader, model_sample="42",
                        item={"reference_answer": "42"})
    assert 0 <= run.reward <= 1 and body["metadata"]["type"] == grader["type"]


def test_a_job_echoes_either_multi_form_unchanged(client, training):
    for grader, extended in ((MULTI_OPENAI, False), (MULTI_MAP, True)):
        method = {"type": "reinforcement", "reinforcement": {"grader": grader}}
        job, body = checked(client.fine_tuning.jobs.with_raw_response.create, model=MODEL, training_file=training.id,
                            extra_body={"method": method, "preflight": "warn"}, extensions=extended)
        assert body["method"] == method
        if extended:
            strict_errors_only_at("post", "/v1/fine_tuning/jobs", body, ".method.reinforcement.grader")
        client.fine_tuning.jobs.cancel(job.id)


# ---- models -----------------------------------------------------------------------------------

def test_models_match_openais_document_and_agree_with_the_list(client, bedrock):
    register_graders(client)
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=f.id, suffix="modelcheck",
                                         extra_body={"method": rft()})
    tuned = wait_for(client, job.id, {"succeeded"}).fine_tuned_model    # registered, and aliased, by then
    listed, body = checked(client.models.with_raw_response.list)
    by_id = {m["id"]: m for m in body["data"]}
    for name in (MODEL, tuned, "modelcheck"):
        model, raw = checked(client.models.with_raw_response.retrieve, name)
        assert raw == by_id[name], name                                        # the same object, `created` too
    assert by_id[tuned]["created"] > 0 and by_id["modelcheck"]["created"] > 0
    versioned, raw = checked(client.models.with_raw_response.retrieve, "modelcheck@1")
    assert raw["created"] > 0 and raw["rft_target"] == tuned
    step = client.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    checkpoint, raw = checked(client.models.with_raw_response.retrieve, step.fine_tuned_model_checkpoint)
    assert raw["created"] == step.created_at
    refused(404, client.models.retrieve, "no-such-model")


# ---- inference --------------------------------------------------------------------------------

def chat(client, **kwargs):
    return checked(client.chat.completions.with_raw_response.create, model=MODEL,
                   messages=[{"role": "user", "content": "What is the weather in Paris?"}], **kwargs)


def test_chat_completions_match_openais_document(client, bedrock):
    plain, body = chat(client, max_tokens=50)
    choice = body["choices"][0]
    assert choice["logprobs"] is None and choice["message"]["refusal"] is None and plain.choices[0].message.content

    several, body = chat(client, n=3)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]

    tool = {"type": "function", "function": {"name": "weather", "parameters": WEATHER}}
    called, body = chat(client, tools=[tool], tool_choice="required")
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    named, _ = chat(client, tools=[tool, {"type": "function", "function": {"name": "other"}}],
                    tool_choice={"type": "function", "function": {"name": "other"}})
    assert named.choices[0].message.tool_calls[0].function.name == "other"

    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": WEATHER, "strict": True}}
    structured, _ = chat(client, response_format=fmt)
    jsonschema.validate(json.loads(structured.choices[0].message.content), WEATHER)

    scored, body = chat(client, logprobs=True, top_logprobs=2)
    tokens = scored.choices[0].logprobs.content
    assert "".join(t.token for t in tokens) == scored.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 for t in tokens)

    truncated, _ = chat(client, max_tokens=2)
    assert truncated.choices[0].finish_reason == "length"


@pytest.mark.parametrize("options", [{}, {"n": 2, "stream_options": {"include_usage": True}},
                                     {"tools": [{"type": "function", "function": {"name": "weather",
                                                                                  "parameters": WEATHER}}],
                                      "tool_choice": "required"},
                                     {"logprobs": True, "top_logprobs": 1}],
                         ids=["plain", "n-usage", "tool-call", "logprobs"])
def test_every_streamed_chunk_matches_openais_document(client, bedrock, options):
    messages = [{"role": "user", "content": "stream it"}]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, stream=True, **options)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    chunks = sse(raw.http_response.read())
    for chunk in chunks:
        spec.validate("post", "/v1/chat/completions", 200, chunk, "text/event-stream")
    finished = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
                if c["choices"] and c["choices"][0]["finish_reason"]}
    assert finished == {i: "tool_calls" if "tools" in options else "stop" for i in range(options.get("n", 1))}
    assert bool(chunks[-1].get("usage")) == ("stream_options" in options)
    typed = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, **options))
    assert len(typed) == len(chunks)                                           # the same answer, typed
    for obj, chunk in zip(typed, chunks):
        assert_populated(obj, chunk)


def test_the_gateway_passes_bedrocks_answers_through_untouched(client, bedrock, stack):
    """rft-hub's answer is the local Bedrock's answer to the same request, byte for byte but for
    the fields that differ per call."""
    request = {"model": MODEL, "messages": [{"role": "user", "content": "same"}], "n": 2, "logprobs": True}
    status, direct = http("POST", f"http://127.0.0.1:{stack.ports['bedrock']}/v1/chat/completions",
                          "bedrock-api-key-local", request)
    assert status == 200
    spec.validate("post", "/v1/chat/completions", 200, direct)
    through = json.loads(client.chat.completions.with_raw_response.create(**request).content)
    volatile = re.compile(r'"(id|created)": ?("[^"]*"|\d+)')

    def same(a, b):
        assert volatile.sub("", json.dumps(a, sort_keys=True)) == volatile.sub("", json.dumps(b, sort_keys=True))

    same(through, direct)
    streamed = {**request, "stream": True, "stream_options": {"include_usage": True}}
    direct_req = urllib.request.Request(f"http://127.0.0.1:{stack.ports['bedrock']}/v1/chat/completions",
                                        data=json.dumps(streamed).encode(), method="POST",
                                        headers={"Authorization": "Bearer bedrock-api-key-local",
                                                 "Content-Type": "application/json"})
    with urllib.request.urlopen(direct_req, timeout=30) as resp:
        direct_chunks = sse(resp.read())
    raw = client.chat.completions.with_raw_response.create(**streamed)
    through_chunks = sse(raw.http_response.read())
    assert len(through_chunks) == len(direct_chunks)
    for a, b in zip(through_chunks, direct_chunks):
        same(a, b)


def test_responses_match_openais_document(client, bedrock):
    responses = client.responses.with_raw_response
    plain, body = checked(responses.create, model=MODEL, input="say hi", instructions="Be brief.",
                          metadata={"k": "v"}, temperature=0.5, top_p=0.9)
    assert body["instructions"] == "Be brief." and body["metadata"] == {"k": "v"} and body["temperature"] == 0.5
    assert body["error"] is None and body["incomplete_details"] is None and plain.output_text
    tool = {"type": "function", "name": "weather", "parameters": WEATHER, "strict": True}
    called, _ = checked(responses.create, model=MODEL, input="weather?", tools=[tool], tool_choice="required")
    assert called.output[0].type == "function_call" and called.output[0].name == "weather"
    jsonschema.validate(json.loads(called.output[0].arguments), WEATHER)
    fmt = {"format": {"type": "json_schema", "name": "forecast", "schema": WEATHER, "strict": True}}
    structured, _ = checked(responses.create, model=MODEL, input="forecast", text=fmt)
    jsonschema.validate(json.loads(structured.output_text), WEATHER)
    scored, _ = checked(responses.create, model=MODEL, input="score me", include=["message.output_text.logprobs"],
                        top_logprobs=2)
    assert scored.output[0].content[0].logprobs
    cut, body = checked(responses.create, model=MODEL, input="a long answer please", max_output_tokens=2)
    assert cut.status == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}


# ---- errors -----------------------------------------------------------------------------------

def test_error_bodies_match_openais_document(client, stack, make_team):
    refused(400, client.files.create, file=("t.jsonl", b"{}\n"), purpose="assistants")
    refused(400, client.chat.completions.create, model=MODEL, messages=[])
    bad_key = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="rfth_nope_nope", max_retries=0)
    refused(401, bad_key.models.list)
    refused(404, client.files.retrieve, "file-nope")
    refused(404, client.fine_tuning.jobs.retrieve, "ftjob-nope")

    upload = client.uploads.create(bytes=10, filename="x.jsonl", mime_type="application/jsonl", purpose="fine-tune")
    client.uploads.cancel(upload.id)
    err = refused(409, client.uploads.parts.create, upload.id, data=b"x")
    assert err.response.headers["x-should-retry"] == "false"                   # the SDK would resend a 409

    team_id, key = make_team("broke")
    status, answer = http("PUT", f"{stack.base_url}/v1/admin/teams/{team_id}/budget", ADMIN_KEY,
                          {"limit_usd": "0.000001"})
    assert status == 200, answer
    broke = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    err = refused(429, broke.chat.completions.create, model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert err.code == "insufficient_quota" and err.response.headers["x-should-retry"] == "false"


# ---- the SDK's typed objects ------------------------------------------------------------------

def test_the_sdks_typed_objects_are_fully_populated(client, training, bedrock):
    """A job, file, event, checkpoint, model, chat completion and response as the SDK types them:
    every field the SDK requires is sent, and no typed field is None where the body has a value."""
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=training.id, extra_body={
        "method": {"type": "reinforcement", "reinforcement": {"grader": EQ}}})
    wait_for(client, job.id, {"succeeded"})
    objects = {
        "job": client.fine_tuning.jobs.with_raw_response.retrieve(job.id),
        "file": client.files.with_raw_response.retrieve(training.id),
        "events": client.fine_tuning.jobs.with_raw_response.list_events(job.id),
        "checkpoints": client.fine_tuning.jobs.checkpoints.with_raw_response.list(job.id),
        "model": client.models.with_raw_response.retrieve(client.fine_tuning.jobs.retrieve(job.id).fine_tuned_model),
        "chat": client.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user",
                                                                                         "content": "hi"}]),
        "response": client.responses.with_raw_response.create(model=MODEL, input="hi"),
    }
    for kind, raw in objects.items():
        parsed, body = raw.parse(), json.loads(raw.content)
        items = list(zip(parsed.data, body["data"])) if kind in ("events", "checkpoints") else [(parsed, body)]
        assert items, kind
        for obj, item in items:
            assert_populated(obj, item)
            for name, field in type(obj).model_fields.items():         # what the SDK requires is set
                if field.is_required():
                    assert getattr(obj, name) is not None, (kind, name)
    job_obj = objects["job"].parse()
    assert job_obj.method.reinforcement.grader.name == "exact"            # typed, not a dict
    assert objects["checkpoints"].parse().data[0].metrics.step is not None
    assert objects["response"].parse().usage.input_tokens_details.cached_tokens == 0


# ---- the oracle itself ------------------------------------------------------------------------

def test_the_oracle_refuses_what_issue_13_found():
    """The bodies rft-hub and the local Bedrock gave before issue #13, each refused."""
    file = {"id": "file-1", "object": "file", "bytes": 1, "created_at": 1, "filename": "t.jsonl",
            "purpose": "fine-tune", "status": "processed"}
    spec.validate("get", "/v1/files/file-1", 200, file)
    for field in ("expires_at", "status_details"):
        assert spec.errors("get", "/v1/files/file-1", 200, {**file, field: None})
    empty = {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
    assert spec.errors("get", "/v1/files", 200, empty)
    event = {"id": "ftevent-1", "object": "fine_tuning.job.event", "created_at": 1, "level": "info",
             "message": "m", "type": "message", "data": None}
    assert spec.errors("get", "/v1/fine_tuning/jobs/j/events", 200, {"object": "list", "data": [event],
                                                                        "has_more": False})
    checkpoint = {"id": "ftckpt-1", "object": "fine_tuning.job.checkpoint", "created_at": 1, "step_number": 3,
                  "fine_tuned_model_checkpoint": "m:ckpt", "fine_tuning_job_id": "j",
                  "metrics": {"step": 3, "train_loss": None}}
    assert spec.errors("get", "/v1/fine_tuning/jobs/j/checkpoints", 200, {"object": "list", "data": [checkpoint],
                                                                             "has_more": False})
    chat_body = {"id": "c", "object": "chat.completion", "created": 1, "model": MODEL, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}]}
    assert {e.split(":")[0] for e in spec.errors("post", "/v1/chat/completions", 200, chat_body)} == {
        ".choices[0]", ".choices[0].message"}
    response = {"id": "r", "object": "response", "created_at": 1, "model": MODEL, "status": "completed",
                "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}
    missing = " ".join(spec.errors("post", "/v1/responses", 200, response))
    for field in ("error", "incomplete_details", "instructions", "metadata", "temperature", "top_p"):
        assert f"'{field}' is a required property" in missing
    error = {"error": {"message": "m", "type": "invalid_request_error"}}
    assert spec.errors("get", "/v1/files/x", 404, error)                # param and code are required
    assert spec.errors("post", "/v1/fine_tuning/alpha/graders/validate", 200, {"grader": LAMBDA})
    assert not spec.errors("post", "/v1/fine_tuning/alpha/graders/validate", 200, {"grader": LAMBDA},
                           extensions=True)


def test_every_extension_the_oracle_allows_is_documented():
    api_doc = (spec.TRIMMED_PATH.parents[2] / "docs" / "api.md").read_text()
    section = api_doc.split("## OpenAI API extensions", 1)[1].split("\n## ", 1)[0]
    for name in spec.EXTENSIONS:
        assert f"\n| {name} |" in section, name
