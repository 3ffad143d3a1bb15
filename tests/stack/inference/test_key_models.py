"""A key's model list applies wherever its caller names a model (issue #29): grader judges (validate,
run, save, preflight, a job's grader, an eval's criteria), a fine-tuning job's base model, base-model
sampling and an eval run's model. A model outside the list is answered exactly as a model the team
cannot see is answered on that route (another team's model resolves as an unknown one does), so
the answer tells the caller nothing about whether it exists."""
import json

import pytest

BASE = "openai.gpt-oss-20b"          # the key's one model
OTHER = "openai.gpt-oss-120b"        # a base model every team may call, outside the key's list
UNKNOWN = "no-such-model"            # what another team's model is to this team: not found
TRAINABLE = "qwen.qwen3-32b-v1:0"    # a model the team could train, outside the key's list

JUDGE = {"type": "score_model", "name": "judge", "model": BASE, "range": [0, 1],
         "input": [{"role": "user", "content": "Answer: {{sample.output_text}}"}]}
CHECK = {"type": "string_check", "name": "eq", "input": "{{sample.output_text}}", "reference": "4", "operation": "eq"}
ITEM_SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}}}


def _h(key):
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


@pytest.fixture
def keys(api, admin_headers, make_team):
    """(a key limited to BASE, the same team's unlimited key)."""
    team_id, full = make_team("key-models")
    r = api.http.post(f"/v1/admin/teams/{team_id}/keys", headers=admin_headers, body=json.dumps({"models": [BASE]}))
    assert r.status_code == 201, r.json_body
    return r.json_body["key"], full


def _answer(api, key, path, body):
    r = api.http.post(path, headers=_h(key), body=json.dumps(body))
    error = (r.json_body or {}).get("error") or {}
    return r.status_code, error.get("code"), error.get("param"), (error.get("message") or "").replace(UNKNOWN, "<m>")


def _same_as_unknown(api, key, path, make_body, outside=OTHER):
    """The answer for a model outside the key's list is the answer for a model the team cannot see."""
    hidden = _answer(api, key, path, make_body(outside))
    unknown = _answer(api, key, path, make_body(UNKNOWN))
    assert hidden[0] in (400, 404) and hidden == (unknown[0], unknown[1], unknown[2],
                                                  unknown[3].replace("<m>", outside)), (hidden, unknown)
    return hidden


GRADER_ROUTES = [
    ("/v1/fine_tuning/alpha/graders/validate", lambda m: {"grader": {**JUDGE, "model": m}}, "grader.model"),
    ("/v1/fine_tuning/alpha/graders/run", lambda m: {"grader": {**JUDGE, "model": m}, "model_sample": "4"},
     "grader.model"),
    ("/v1/graders", lambda m: {"name": "judged", "grader": {**JUDGE, "model": m}}, "grader.model"),
    ("/v1/graders/preflight", lambda m: {"grader": {**JUDGE, "model": m}, "file_id": "file-none"}, "grader.model"),
    ("/v1/graders/preflight", lambda m: {"grader": CHECK, "file_id": "file-none", "sample_base": {"model": m}},
     "sample_base.model"),
    ("/v1/fine_tuning/jobs", lambda m: {"model": BASE, "training_file": "file-none", "method": {
        "type": "reinforcement", "reinforcement": {"grader": {**JUDGE, "model": m}}}},
     "method.reinforcement.grader.model"),
    ("/v1/evals", lambda m: {"data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA},
                             "testing_criteria": [{**JUDGE, "model": m}]}, "testing_criteria[0].model"),
]


@pytest.mark.parametrize("path, make_body, param", GRADER_ROUTES, ids=[f"{p}:{b}" for p, _, b in GRADER_ROUTES])
def test_a_judge_outside_the_keys_list_is_refused_as_an_unknown_one(api, keys, bedrock, path, make_body, param):
    limited, full = keys
    status, code, got, _ = _same_as_unknown(api, limited, path, make_body)
    assert got == param
    assert _answer(api, full, path, make_body(OTHER))[2] != param      # the same team's full key: no objection
    assert _answer(api, limited, path, make_body(BASE))[2] != param    # the key's own model: no objection


def test_a_fine_tuning_base_model_outside_the_keys_list_is_refused_as_an_untrainable_one(api, keys):
    limited, full = keys
    path = "/v1/fine_tuning/jobs"

    def body(model):
        return {"model": model, "training_file": "file-none",
                "method": {"type": "reinforcement", "reinforcement": {"grader": CHECK}}}
    status, code, param, message = _same_as_unknown(api, limited, path, body, outside=TRAINABLE)
    assert (status, code, param) == (400, "model_not_allowed", "model")
    assert TRAINABLE not in message.replace(f"'{TRAINABLE}'", "")        # the list shown: only the key's
    assert _answer(api, full, path, body(TRAINABLE))[2] != "model"       # a full key may train it
    assert _answer(api, limited, path, body(BASE))[2] != "model"


def test_an_eval_runs_model_outside_the_keys_list_is_refused_as_an_unknown_one(api, keys, bedrock):
    limited, full = keys
    created = api.http.post("/v1/evals", headers=_h(full), body=json.dumps({
        "data_source_config": {"type": "custom", "item_schema": ITEM_SCHEMA}, "testing_criteria": [CHECK]}))
    assert created.status_code in (200, 201), created.json_body
    path = f"/v1/evals/{created.json_body['id']}/runs"

    def body(model):
        return {"data_source": {"type": "completions", "model": model, "source": {
            "type": "file_content", "content": [{"item": {"q": "2 + 2"}}]}, "input_messages": {
            "type": "template", "template": [{"role": "user", "content": "{{item.q}}"}]},
            "sampling_params": {"max_completion_tokens": 8}}}
    status, code, param, _ = _same_as_unknown(api, limited, path, body)
    assert (status, code, param) == (400, "model_not_found", "data_source.model")
    assert _answer(api, limited, path, body(BASE))[0] in (200, 201)
