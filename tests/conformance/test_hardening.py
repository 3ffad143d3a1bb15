"""Issue #19: hostile inputs get a clear error in the OpenAI envelope, never a 500 and never a long stall."""
import json
import time

import openai
import pytest
from sample_data import arithmetic_rows
from slack_sdk.signature import SignatureVerifier

from chalicelib.domain import datasets
from local.harness import SLACK_SIGNING_SECRET

EQ = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
      "reference": "{{item.reference_answer}}", "operation": "eq"}
DEEP = "[" * 100_000 + "]" * 100_000
PROMPT = [{"role": "user", "content": "6*7?"}]


@pytest.fixture
def headers(make_team):
    _, key = make_team("hardening")
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def envelope(r, status: int, param=None) -> dict:
    assert r.status_code == status, (r.status_code, r.body[:300])
    error = r.json_body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


# ---- 1. CPU exhaustion in multi grader formulas -------------------------------------------------

def test_validate_refuses_formulas_that_would_burn_cpu(api, headers):
    for formula in ["4000000**4000000", "9**9**9**9"]:
        grader = {"type": "multi", "graders": {"exact": EQ}, "calculate_output": formula}
        r = api.http.post("/v1/fine_tuning/alpha/graders/validate", headers=headers,
                          body=json.dumps({"grader": grader}))
        error = envelope(r, 400, "grader.calculate_output")
        assert "exponent" in error["message"], formula            # refused from its operands, never computed


# ---- 2. inputs that used to be a 500 ------------------------------------------------------------

def test_deeply_nested_request_bodies_are_400(api, headers):
    for path in ["/v1/fine_tuning/alpha/graders/validate", "/v1/chat/completions", "/v1/fine_tuning/jobs"]:
        for nested in [DEEP, "[" * 65 + "]" * 65]:
            r = api.http.post(path, headers=headers, body='{"grader": ' + nested + "}")
            error = envelope(r, 400)
            assert "Request body" in error["message"] and "64 levels" in error["message"], error
    ok = api.http.post("/v1/fine_tuning/alpha/graders/validate", headers=headers,
                       body=json.dumps({"grader": {**EQ, "name": "x"}, "_": [[[[1]]]]}))
    envelope(ok, 400, "_")                    # shallow nesting is parsed as before (and the field is unknown)
    nan = api.http.post("/v1/fine_tuning/alpha/graders/validate", headers=headers, body='{"grader": NaN}')
    assert "NaN" in envelope(nan, 400)["message"]


def test_dataset_lines_that_are_not_json_or_nest_too_deep_name_the_line():
    rows = [json.dumps(r) for r in arithmetic_rows(8)]
    rows[1] = rows[1][:-1] + ', "depth": ' + DEEP + "}"
    rows[2] = rows[2][:-1] + ', "depth": ' + "[" * 70 + "]" * 70 + "}"
    rows[3] = rows[3][:-1] + ', "score": NaN}'
    rows[4] = rows[4][:-1] + ', "score": Infinity}'
    rows[5] = rows[5][:-1] + ', "score": -Infinity}'
    rows[6] = rows[6][:-1] + ', "depth": ' + "[" * 60 + "]" * 60 + "}"      # within the limit
    report = datasets.validate([("\n".join(rows) + "\n").encode()])
    assert [e["line"] for e in report["errors"]] == [2, 3, 4, 5, 6], report["errors"]
    assert all("64 levels" in e["message"] for e in report["errors"][:2])
    assert [e["message"].split()[2] for e in report["errors"][2:]] == ["NaN", "Infinity", "-Infinity"]
    assert report["rows"] == 3


def test_uploaded_file_with_a_deep_line_is_400_naming_it(client):
    rows = [json.dumps(r) for r in arithmetic_rows(120)]
    rows[41] = rows[41][:-1] + ', "depth": ' + DEEP + "}"
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("deep.jsonl", ("\n".join(rows) + "\n").encode()), purpose="fine-tune")
    assert "line 42" in err.value.message and err.value.body["param"] == "file"


def test_ids_too_long_or_strange_for_any_key_are_404(api, headers):
    for bad in ["f" * 2000, "x" * 257, "a\"b", "a<b>"]:
        for method, path in [("get", "/v1/files/{}"), ("get", "/v1/files/{}/content"), ("delete", "/v1/files/{}"),
                             ("get", "/v1/fine_tuning/jobs/{}"), ("post", "/v1/fine_tuning/jobs/{}/cancel"),
                             ("get", "/v1/fine_tuning/jobs/{}/events"), ("get", "/v1/models/{}"),
                             ("get", "/v1/models/aliases/{}/history"), ("post", "/v1/uploads/{}/cancel"),
                             ("get", "/v1/graders/{}")]:
            r = getattr(api.http, method)(path.format(bad), headers=headers)
            error = envelope(r, 404)
            assert bad not in error["message"], path
    long_model = "m" * 2000
    for path, body in [("/v1/chat/completions", {"model": long_model, "messages": PROMPT}),
                       ("/v1/responses", {"model": long_model, "input": "hi"}),
                       ("/v1/fine_tuning/jobs", {"model": long_model, "training_file": "file-x",
                                                 "method": {"type": "reinforcement"}})]:
        envelope(api.http.post(path, headers=headers, body=json.dumps(body)), 400, "model")


def test_admin_path_ids_are_bounded_too(api, admin_headers):
    for path in ["/v1/admin/teams/{}", "/v1/admin/teams/{}/keys", "/v1/admin/teams/{}/budget"]:
        envelope(api.http.get(path.format("t" * 3000), headers=admin_headers), 404)


def test_job_list_metadata_filter_must_be_an_object_of_strings(api, headers):
    for raw in ["%5B1%5D", "123", "%22x%22", "NaN", "%7B%22a%22%3A1%7D", "0"]:
        r = api.http.get(f"/v1/fine_tuning/jobs?metadata={raw}", headers=headers)
        envelope(r, 400, "metadata")
    ok = api.http.get("/v1/fine_tuning/jobs?metadata=%7B%22a%22%3A%22b%22%7D", headers=headers)
    assert ok.status_code == 200 and ok.json_body["data"] == []


def test_oversized_grader_specs_are_refused_before_anything_is_written(api, headers):
    big = {**EQ, "name": "n" * 420_000}
    r = api.http.post("/v1/graders", headers=headers, body=json.dumps({"name": "big", "grader": big}))
    error = envelope(r, 400, "grader")
    assert "65,536 bytes" in error["message"]
    assert api.http.get("/v1/graders", headers=headers).json_body["data"] == []
    prompt = {**EQ, "reference": "{{item.reference_answer}}" + "x" * 70_000}
    envelope(api.http.post("/v1/fine_tuning/alpha/graders/validate", headers=headers,
                           body=json.dumps({"grader": prompt})), 400, "grader")


def test_slack_timestamps_that_are_not_unix_seconds_are_401(api):
    body = "team_id=TTEST1&channel_id=C1&text=help"
    for ts in ["abc", "1e9", "9" * 5000, "", " ", "-1", "١٢٣"]:
        sig = SignatureVerifier(SLACK_SIGNING_SECRET).generate_signature(timestamp=ts, body=body)
        r = api.http.post("/slack/commands", body=body, headers={
            "X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig,
            "Content-Type": "application/x-www-form-urlencoded"})
        assert envelope(r, 401)["code"] == "invalid_signature", ts
    ts = str(int(time.time()))
    bad_body = b"text=\xff\xfe"
    r = api.http.post("/slack/commands", body=bad_body, headers={
        "X-Slack-Request-Timestamp": ts, "X-Slack-Signature": "v0=" + "0" * 64,
        "Content-Type": "application/x-www-form-urlencoded"})
    envelope(r, 401)
