"""Lambda graders are owned (issue #19): a team may use only functions an admin registered to it,
named rft-grader-*, in rft-hub's own account and region; never rft-hub's own functions."""
import json

import openai
import pytest
from helpers import register_graders, rft
from sample_data import arithmetic_rows, jsonl

from local.example_graders import arn

EXACT = "rft-grader-example-exact-match"
HOSTED = "arn:aws:lambda:us-west-2:123456789012:function:rft-hub-local-hosted_grader"
JOB_PARAM = "method.reinforcement.grader.lambda.function"


def lam(function_arn):
    return {"type": "lambda", "name": "team", "lambda": {"function": function_arn}}


@pytest.fixture
def teams(make_team, stack, bedrock):
    """Two teams as SDK clients; only team A has the exact-match example grader registered."""
    def sdk(name):
        _, key = make_team(name)
        return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    a, b = sdk("lambda-a"), sdk("lambda-b")
    register_graders(a, EXACT)
    return a, b


def _refused(call, param, text):
    with pytest.raises(openai.BadRequestError) as err:
        call()
    body = err.value.body
    assert body["param"] == param and body["code"] == "invalid_grader", body
    assert text in body["message"], body["message"]


def test_registered_grader_runs_end_to_end(teams):
    a, _ = teams
    item = {"reference_answer": "42"}
    assert a.fine_tuning.alpha.graders.run(grader=lam(arn(EXACT)), model_sample="42", item=item).reward == 1.0
    # A version or alias of a registered function is the same team's code: accepted.
    assert a.fine_tuning.alpha.graders.run(grader=lam(arn(EXACT) + ":prod"), model_sample="41", item=item).reward == 0
    assert a.fine_tuning.alpha.graders.validate(grader=lam(arn(EXACT) + ":$LATEST")).grader


def test_a_team_cannot_use_another_teams_grader(teams):
    a, b = teams
    training = b.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    _refused(lambda: b.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=training.id,
                                               method=rft(arn(EXACT))), JOB_PARAM, "an rft-hub admin must register it")
    nested = {"type": "multi", "graders": {"theirs": lam(arn(EXACT))}, "calculate_output": "theirs"}
    _refused(lambda: b.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=training.id, extra_body={
        "method": {"type": "reinforcement", "reinforcement": {"grader": nested}}}),
        "method.reinforcement.grader.graders.theirs.lambda.function", "must register it")


def test_saved_graders_need_a_registered_lambda(api, teams):
    a, b = teams
    for client, status in ((b, 400), (a, 201)):
        r = api.http.post("/v1/graders", body=json.dumps({"name": "mine", "grader": lam(arn(EXACT))}),
                          headers={"Authorization": f"Bearer {client.api_key}", "Content-Type": "application/json"})
        assert r.status_code == status, r.json_body
    assert r.json_body["version"] == 1
    refused = api.http.post("/v1/graders", body=json.dumps({"name": "x", "grader": lam(arn(EXACT))}),
                            headers={"Authorization": f"Bearer {b.api_key}", "Content-Type": "application/json"})
    assert refused.json_body["error"]["param"] == "grader.lambda.function"
    # Using A's saved grader by id from B is a 404 (another team's grader), never a run of A's Lambda.
    training = b.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        b.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=training.id, extra_body={
            "method": {"type": "reinforcement", "reinforcement": {"grader": {"type": "saved",
                                                                             "id": r.json_body["id"]}}}})


@pytest.mark.parametrize("function_arn, text", [
    (arn(EXACT) + "\n", "exactly a Lambda function ARN"),                        # `$` would let this through
    (" " + arn(EXACT), "exactly a Lambda function ARN"),
    (arn(EXACT).replace("123456789012", "123456789\u0661\u0662\u0663"), "exactly a Lambda function ARN"),
    (arn(EXACT).replace("123456789012", "210987654321"), "rft-hub's account 123456789012"),
    (arn(EXACT).replace("us-west-2", "us-east-1"), "region us-west-2"),
    (HOSTED, "rft-hub's own functions"),
    (arn("rft-hub-local-api_handler"), "rft-hub's own functions"),
    (arn("my-grader"), "named rft-grader-"),
])
def test_arns_outside_the_rules_are_refused_everywhere(teams, function_arn, text):
    a, _ = teams
    _refused(lambda: a.fine_tuning.alpha.graders.run(grader=lam(function_arn), model_sample="42", item={}),
             "grader.lambda.function", text)
    _refused(lambda: a.fine_tuning.alpha.graders.validate(grader=lam(function_arn)), "grader.lambda.function", text)
    training = a.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    _refused(lambda: a.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=training.id,
                                               method=rft(function_arn)), JOB_PARAM, text)


def test_dry_runs_and_preflight_refuse_another_teams_grader(api, teams):
    a, b = teams
    training = b.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    _refused(lambda: b.fine_tuning.alpha.graders.run(grader=lam(arn(EXACT)), model_sample="42", item={}),
             "grader.lambda.function", "must register it")
    _refused(lambda: b.fine_tuning.alpha.graders.validate(grader=lam(arn(EXACT))), "grader.lambda.function",
             "must register it")
    r = api.http.post("/v1/graders/preflight", headers={"Authorization": f"Bearer {b.api_key}",
                                                        "Content-Type": "application/json"},
                      body=json.dumps({"grader": lam(arn(EXACT)), "file_id": training.id, "sample_size": 2}))
    assert r.status_code == 400 and r.json_body["error"]["param"] == "grader.lambda.function"


def test_dry_runs_refuse_a_function_registered_to_no_team(teams):
    a, _ = teams
    _refused(lambda: a.fine_tuning.alpha.graders.run(grader=lam(arn("rft-grader-nobodys")), model_sample="42",
                                                     item={}), "grader.lambda.function", "must register it")


def test_admin_routes_validate_input_and_are_admin_only(api, admin_headers, make_team):
    team_a, key_a = make_team("lambda-admin-a")
    team_b, _ = make_team("lambda-admin-b")
    url = f"/v1/admin/teams/{team_a}/lambda_graders"
    name = "rft-grader-admin-test"

    def post(body, team=team_a, headers=admin_headers):
        return api.http.post(f"/v1/admin/teams/{team}/lambda_graders", headers=headers, body=json.dumps(body))

    team_headers = {"Authorization": f"Bearer {key_a}", "Content-Type": "application/json"}
    assert post({"function_arn": arn(name)}, headers=team_headers).status_code == 401
    assert api.http.get(url, headers=team_headers).status_code == 401
    assert api.http.delete(f"{url}/{name}", headers=team_headers).status_code == 401

    for body, text in [({}, "field required"), ({"function_arn": 5}, "function_arn"),
                       ({"function_arn": arn(name), "team": "x"}, "unknown field"),
                       ({"function_arn": arn(name) + "\n"}, "exactly a Lambda function ARN"),
                       ({"function_arn": arn(name) + ":prod"}, "register the function itself"),
                       ({"function_arn": arn(name).replace("123456789012", "210987654321")}, "account"),
                       ({"function_arn": HOSTED}, "own functions"),
                       ({"function_arn": arn("other-grader")}, "named rft-grader-")]:
        r = post(body)
        param = "team" if "team" in body else "function_arn"
        assert r.status_code == 400 and r.json_body["error"]["param"] == param, (body, r.json_body)
        assert text in r.json_body["error"]["message"], (body, r.json_body)
    assert post({"function_arn": arn(name)}, team="team-doesnotexist").status_code == 404

    first = post({"function_arn": arn(name)})
    assert first.status_code == 201 and first.json_body["name"] == name and first.json_body["team_id"] == team_a
    again = post({"function_arn": arn(name)})                              # a retried registration
    assert again.status_code == 200 and again.json_body == first.json_body
    taken = post({"function_arn": arn(name)}, team=team_b)                 # one function, one team
    assert taken.status_code == 409 and taken.json_body["error"]["param"] == "function_arn"
    listed = api.http.get(url, headers=admin_headers).json_body["data"]
    assert [g["name"] for g in listed] == [name]

    assert api.http.delete(f"{url}/not.a.name", headers=admin_headers).status_code == 400
    assert api.http.delete(f"{url}/rft-grader-never", headers=admin_headers).status_code == 404
    gone = api.http.delete(f"{url}/{name}", headers=admin_headers)
    assert gone.status_code == 200 and gone.json_body["deleted"]
    assert api.http.get(url, headers=admin_headers).json_body["data"] == []
    assert post({"function_arn": arn(name)}, team=team_b).status_code == 201   # free for another team now
