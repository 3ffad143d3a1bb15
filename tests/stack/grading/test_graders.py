"""Graders: each type, templates, the reward contract, the hosted Lambda, dry runs and preflight."""
import json
import math

import openai
import pytest
from helpers import register_graders, wait_submitted
from hypothesis import given, settings
from hypothesis import strategies as st
from sample_data import arithmetic_rows, jsonl

from chalicelib.domain.graders import Deps, GraderSpecError, build, run_text
from chalicelib.domain.graders.contract import check_response
from chalicelib.training import hosted_grader

ITEM = {"reference_answer": "42", "extra": {"unit": "kg"}, "messages": [{"role": "user", "content": "6*7?"}]}
EQ = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
      "reference": "{{item.reference_answer}}", "operation": "eq"}
FUZZY = {"type": "text_similarity", "name": "fuzzy", "input": "{{sample.output_text}}",
         "reference": "{{item.reference_answer}}", "evaluation_metric": "fuzzy_match"}
JUDGE = {"type": "score_model", "name": "judge", "model": "openai.gpt-oss-120b", "range": [0, 1],
         "input": [{"role": "system", "content": "Grade the answer. Reply with JSON {\"score\": x}."},
                   {"role": "user", "content": "Reference: {{item.reference_answer}}\nAnswer: {{sample.output_text}}"}]}


def grade(spec, text, item=ITEM, deps=None):
    return run_text(build(spec), text, item, deps or Deps())[0]


def test_string_check_operations():
    for op, text, expected in [("eq", "42", 1), ("eq", "42 ", 0), ("ne", "41", 1), ("like", "it is 42!", 1),
                               ("like", "IT IS 42", 1), ("ilike", "The Answer Is 42", 1), ("like", "forty", 0)]:
        spec = {**EQ, "operation": op}
        if op == "ilike":
            spec["reference"] = "answer is {{item.reference_answer}}"
        assert grade(spec, text).reward == expected, (op, text)


def test_text_similarity_metrics_are_in_range_and_ordered():
    for metric in ("fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5",
                   "rouge_l"):
        spec = {**FUZZY, "evaluation_metric": metric,
                "reference": "the quick brown fox jumps over the lazy dog"}
        same = grade(spec, "the quick brown fox jumps over the lazy dog").reward
        close = grade(spec, "the quick brown fox jumped over a lazy dog").reward
        far = grade(spec, "completely unrelated words here").reward
        assert same >= 0.99 and 0 <= far < close <= same <= 1, (metric, same, close, far)   # METEOR: 0.999


def test_templates_read_item_fields_and_json_output():
    spec = {**EQ, "input": "{{sample.output_json.weight.unit}}", "reference": "{{item.extra.unit}}"}
    assert grade(spec, '{"weight": {"value": 3, "unit": "kg"}}').reward == 1.0
    assert grade(spec, "not json").errors == {"invalid_variable_error"}
    missing = grade({**EQ, "reference": "{{item.nope}}"}, "42")
    assert missing.reward == 0.0 and missing.errors == {"invalid_variable_error"} and "item.nope" in missing.details


def test_multi_grader_formula_is_safe():
    multi = {"type": "multi", "name": "combo", "graders": {"exact": EQ, "fuzzy": FUZZY},
             "calculate_output": "0.7 * exact + 0.3 * fuzzy"}
    r = grade(multi, "42")
    assert r.reward == pytest.approx(1.0) and r.sub_rewards == {"exact": 1.0, "fuzzy": 1.0}
    assert grade({**multi, "calculate_output": "max(exact, fuzzy) / 2"}, "4").reward == pytest.approx(0.333, abs=0.01)
    for formula, field in [("__import__('os').system('x')", "calculate_output"), ("exact.__class__", "calculate_output"),
                           ("missing + 1", "calculate_output"), ("(", "calculate_output")]:
        with pytest.raises(GraderSpecError) as err:
            build({**multi, "calculate_output": formula})
        assert err.value.param.endswith(field)
    zero = grade({**multi, "calculate_output": "exact / (fuzzy - fuzzy)"}, "42")
    assert zero.reward == 0.0 and "formula_parse_error" in zero.errors


def test_score_model_parses_replies_robustly():
    from chalicelib.domain.graders.core import parse_score

    assert parse_score('{"score": 0.7}', 0, 1) == 0.7
    assert parse_score("Score: 8/10", 0, 10) == 8
    assert parse_score("I'd give it 3 out of 5, so 0.6", 0, 1) == 0.6
    assert parse_score("no idea", 0, 1) is None
    replies = iter([("Score: 1.7", 5), ("I'm sorry, I cannot grade this.", 5), ("hmm", 5)])
    deps = Deps(judge=lambda model, messages, sampling: next(replies))
    assert grade(JUDGE, "x", deps=deps).reward == 1.0                       # clamped to the range
    assert grade(JUDGE, "x", deps=deps).errors == {"model_grader_refusal_error"}
    assert grade(JUDGE, "x", deps=deps).errors == {"model_grader_parse_error"}

    def down(*_):
        raise RuntimeError("throttled")
    assert grade(JUDGE, "x", deps=Deps(judge=down)).errors == {"model_grader_server_error"}


def test_bad_specs_name_the_field():
    cases = [
        ({"type": "python", "source": "x"}, "grader.type", "Lambda"),
        ({**EQ, "operation": "regex"}, "grader.operation", "eq, ne, like, ilike"),
        ({**EQ, "input": "{{ sample.output_tools }}"}, "grader.input", "unsupported variable"),
        ({**EQ, "colour": 1}, "grader.colour", "unknown field"),
        ({**FUZZY, "evaluation_metric": "cosine"}, "grader.evaluation_metric", "embedding"),
        ({**JUDGE, "range": [1, 0]}, "grader.range", "min < max"),
        ({"type": "lambda", "lambda": {"function": "arn:nope"}}, "grader.lambda.function", "ARN"),
        ({"type": "multi", "graders": {"a b": EQ}, "calculate_output": "1"}, "grader.graders.a b", "identifiers"),
        ({"type": "label_model"}, "grader.type", "label_model"),
    ]
    for spec, param, text in cases:
        with pytest.raises(GraderSpecError) as err:
            build(spec)
        assert err.value.param == param and text in str(err.value), (spec, err.value.param, str(err.value))


def test_contract_violations_are_all_reported():
    rows = [{"id": "a"}, {"id": "b"}]
    assert check_response(rows, [{"id": "a", "aggregate_reward_score": 1}, {"id": "b", "aggregate_reward_score": 0.5}]) \
        == ([1.0, 0.5], [])
    for response, text in [({"batch": []}, "not a list"),
                           ({"statusCode": 200, "body": "[]"}, "statusCode"),
                           ([{"id": "a", "aggregate_reward_score": 1}], "missing ids"),
                           ([{"id": "a", "aggregate_reward_score": "1"}, {"id": "b", "aggregate_reward_score": 1}],
                            "not a number"),
                           ([{"id": "a", "aggregate_reward_score": float("nan")}, {"id": "b", "aggregate_reward_score": 1}],
                            "not finite"),
                           ([{"id": "a", "aggregate_reward_score": 1}, {"id": "b", "aggregate_reward_score": 1},
                             {"id": "c", "aggregate_reward_score": 1}], "unexpected ids"),
                           ([{"id": "a", "aggregate_reward_score": 1, "metrics_list": [{"name": "x"}]},
                             {"id": "b", "aggregate_reward_score": 1}], "metrics_list")]:
        scores, problems = check_response(rows, response)
        assert not scores and any(text in p for p in problems), (response, problems)


# ---- the hosted grader Lambda (through the real handler) -----------------------------------

def _ref(spec):
    from chalicelib.grading import graders
    return graders.store_spec(spec)


def test_hosted_grader_implements_the_reward_contract(api, stack):
    ref = _ref(EQ)
    batch = [
        {"id": "1", "messages": [{"role": "user", "content": "6*7?"}, {"role": "assistant", "content": "42"}],
         "reference_answer": "42", "rft_grader_ref": ref},
        {"id": "2", "messages": [{"role": "user", "content": "6*7?"}, {"role": "assistant", "content": "41"}],
         "reference_answer": {"text": "42"}, "rft_grader_ref": ref},                  # wrapped string reference
        {"id": "3", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "42"}],
         "metadata": {"reference_answer": "42"}, "rft_grader_ref": ref},              # the older shape
        {"id": "4", "messages": "garbage", "rft_grader_ref": ref},
        {"id": "5", "messages": [{"role": "assistant", "content": "42"}], "rft_grader_ref": "spec:unknown"},
        "not even an object",
    ]
    out = api.lambda_.invoke("hosted_grader", batch).payload
    assert [o["id"] for o in out] == ["1", "2", "3", "4", "5", "unknown"]
    assert [o["aggregate_reward_score"] for o in out] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert {"name": "exact", "value": 1.0, "type": "Reward"} in out[0]["metrics_list"]
    assert any(m["name"] == "error.invalid_variable_error" for m in out[3]["metrics_list"])
    assert any(m["name"] == "error.other_error" for m in out[4]["metrics_list"])
    assert api.lambda_.invoke("hosted_grader", {"trajectories": batch[:1]}).payload[0]["aggregate_reward_score"] == 1.0
    assert api.lambda_.invoke("hosted_grader", {"unexpected": True}).payload == []


def test_hosted_grader_answers_a_large_batch(api, stack):
    # The size is the point (near Lambda's payload limit), not the grading's CPU: an exact match keeps
    # the answer independent of how loaded the machine is (fuzzy matching of 500 x 10 KB is not).
    ref = _ref(EQ)
    long = "word " * 2000
    batch = [{"id": str(i), "messages": [{"role": "user", "content": long},
                                         {"role": "assistant", "content": long}],
              "reference_answer": long, "rft_grader_ref": ref} for i in range(500)]   # ~10 MB in: near the limit
    out = api.lambda_.invoke("hosted_grader", batch).payload
    assert [o["id"] for o in out] == [str(i) for i in range(500)]        # in order, one answer each
    # Each a 1.0, or -- on a machine too loaded to grade them all within the invocation -- the
    # documented time-limit answer for that sample, never a wrong score or a missing one.
    late = [o for o in out if o["aggregate_reward_score"] != 1.0]
    assert all(any(m["name"] == "error.unresponsive_reward_error" for m in o["metrics_list"]) for o in late), late[:2]
    assert len(late) < 500


json_values = st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=20) | st.integers(),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(json_values, st.fixed_dictionaries({
    "id": json_values, "messages": st.one_of(json_values, st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "tool", "x"]), "content": json_values}), max_size=3)),
    "reference_answer": json_values, "rft_grader_ref": st.sampled_from(["spec:none", None, 3])})), max_size=6))
def test_no_input_makes_the_hosted_grader_raise_or_return_non_finite(batch):
    out = hosted_grader.handle(batch)
    assert isinstance(out, list) and len(out) == len(batch)
    for o in out:
        assert isinstance(o["aggregate_reward_score"], float) and math.isfinite(o["aggregate_reward_score"])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), json_values)
def test_no_sample_makes_a_grader_raise(text, reference):
    multi = build({"type": "multi", "graders": {"e": EQ, "f": FUZZY, "r": {**FUZZY, "evaluation_metric": "rouge_l"},
                                                "b": {**FUZZY, "evaluation_metric": "bleu"}},
                   "calculate_output": "(e + f + r + b) / 4"})
    result, _ = run_text(multi, text, {"reference_answer": reference}, Deps())
    assert math.isfinite(result.reward) and 0 <= result.reward <= 1


# ---- through the openai SDK ------------------------------------------------------------------

def test_sdk_validate_and_run_each_type(client):
    assert client.fine_tuning.alpha.graders.validate(grader=EQ).grader.name == "exact"
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.alpha.graders.validate(grader={**EQ, "operation": "regex"})
    assert err.value.body["param"] == "grader.operation"

    item = {"reference_answer": "42"}
    assert client.fine_tuning.alpha.graders.run(grader=EQ, model_sample="42", item=item).reward == 1.0
    assert client.fine_tuning.alpha.graders.run(grader=FUZZY, model_sample="41", item=item).reward == 0.5
    multi = {"type": "multi", "name": "m", "graders": {"exact": EQ, "fuzzy": FUZZY},
             "calculate_output": "(exact + fuzzy) / 2"}
    r = client.fine_tuning.alpha.graders.run(grader=multi, model_sample="41", item=item)
    assert r.reward == 0.25 and r.sub_rewards == {"exact": 0.0, "fuzzy": 0.5}
    judged = client.fine_tuning.alpha.graders.run(grader=JUDGE, model_sample="42", item=item)   # local Bedrock judge
    assert judged.reward == 1.0 and judged.metadata.sampled_model_name == "openai.gpt-oss-120b"
    assert judged.metadata.token_usage > 0
    missing = client.fine_tuning.alpha.graders.run(grader=EQ, model_sample="42", item={})
    assert missing.reward == 0 and missing.metadata.errors.invalid_variable_error

    register_graders(client)                                 # an admin registers the team's Lambdas first
    lam = {"type": "lambda", "name": "team", "lambda": {
        "function": "arn:aws:lambda:us-west-2:123456789012:function:rft-grader-example-exact-match"}}
    assert client.fine_tuning.alpha.graders.run(grader=lam, model_sample="42", item=item).reward == 1.0
    broken = {**lam, "lambda": {"function": "arn:aws:lambda:us-west-2:123456789012:function:rft-grader-example-broken-contract"}}
    r = client.fine_tuning.alpha.graders.run(grader=broken, model_sample="42", item=item)
    assert r.reward == 0 and r.metadata.errors.model_extra["lambda_contract_error"]
    assert "not a list" in r.metadata.errors.model_extra["details"]
    register_graders(client, "rft-grader-example-missing")   # registered, but never deployed
    gone = {**lam, "lambda": {
        "function": "arn:aws:lambda:us-west-2:123456789012:function:rft-grader-example-missing"}}
    r = client.fine_tuning.alpha.graders.run(grader=gone, model_sample="42", item=item)
    assert r.metadata.errors.model_extra["lambda_error"] and "not found" in r.metadata.errors.model_extra["details"]


def _post(api, client, path, body):
    return api.http.post(path, body=json.dumps(body), headers={"Authorization": f"Bearer {client.api_key}",
                                                                "Content-Type": "application/json"})


def test_saved_graders_are_versioned(api, client):
    headers = {"Authorization": f"Bearer {client.api_key}"}
    v1 = _post(api, client, "/v1/graders", {"name": "exact-answer", "grader": EQ}).json_body
    v2 = _post(api, client, "/v1/graders", {"name": "exact-answer", "grader": {**EQ, "operation": "ilike"}}).json_body
    assert v1["id"] == v2["id"] and (v1["version"], v2["version"]) == (1, 2)
    got = api.http.get(f"/v1/graders/{v1['id']}", headers=headers).json_body
    assert got["version"] == 2 and got["versions"] == [2, 1] and got["grader"]["operation"] == "ilike"
    listed = api.http.get("/v1/graders", headers=headers).json_body["data"]
    assert [g["name"] for g in listed] == ["exact-answer"]
    bad = _post(api, client, "/v1/graders", {"name": "x", "grader": {"type": "python"}})
    assert bad.status_code == 400 and bad.json_body["error"]["param"] == "grader.type"


@pytest.fixture
def dataset(client):
    return client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(120))), purpose="fine-tune")


def _preflight(api, client, grader, file_id, n=10):
    r = _post(api, client, "/v1/graders/preflight", {"grader": grader, "file_id": file_id, "sample_size": n})
    assert r.status_code == 200, r.json_body
    return r.json_body


def test_preflight_passes_a_sound_grader(api, client, dataset):
    # "Contains the answer" pays a shotgun of candidate answers as much as the answer: critical.
    contains_answer = {**EQ, "operation": "ilike"}
    report = _preflight(api, client, contains_answer, dataset.id)
    assert not report["passed"] and "rewards_shotgun" in {f["code"] for f in report["findings"]
                                                          if f["severity"] == "critical"}
    assert report["probes"]["reference"]["mean"] == 1.0 and report["probes"]["empty"]["mean"] == 0.0
    strict = _preflight(api, client, EQ, dataset.id)            # exact match: sound, but strict about format
    assert strict["passed"] and {f["code"] for f in strict["findings"]} == {"padding_not_rewarded",
                                                                           "format_sensitive"}


def test_preflight_flags_reward_hacking(api, client, dataset):
    rewards_empty = {**EQ, "operation": "like", "input": "{{item.reference_answer}}", "reference": "{{sample.output_text}}"}
    codes = {f["code"] for f in _preflight(api, client, rewards_empty, dataset.id)["findings"]}
    assert "rewards_empty_response" in codes

    register_graders(client)
    constant = {"type": "lambda", "lambda": {
        "function": "arn:aws:lambda:us-west-2:123456789012:function:rft-grader-example-always-half"}}
    report = _preflight(api, client, constant, dataset.id)
    assert "constant_reward" in {f["code"] for f in report["findings"]} and not report["passed"]

    wrong_reference = {**EQ, "reference": "{{item.difficulty}}"}
    assert "reference_scores_low" in {f["code"] for f in _preflight(api, client, wrong_reference, dataset.id)["findings"]}


def test_job_with_a_string_check_grader_trains_on_hosted_grader_rewards(client, dataset, bedrock):
    import time
    job = client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=dataset.id,
                                         extra_body={"method": {"type": "reinforcement",
                                                                "reinforcement": {"grader": EQ}}})
    assert job.model_extra["rft_preflight"]["passed"]
    bid = wait_submitted(client, job.id).model_extra["rft_bedrock_job_id"]
    sent = bedrock.jobs[bid]["method"]["reinforcement"]["grader"]
    assert sent == {"type": "lambda", "lambda": {"function": "arn:aws:lambda:us-west-2:123456789012:function:"
                                                             "rft-hub-local-hosted_grader"}}
    rows = bedrock.file_bytes[bedrock.jobs[bid]["training_file"]].splitlines()
    assert all(json.loads(r)["rft_grader_ref"].startswith("spec:") for r in rows)
    deadline = time.monotonic() + 20
    while client.fine_tuning.jobs.retrieve(job.id).status not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    rewards = [e.data["critic_rewards_mean"] for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data
               if e.type == "metrics"]
    assert rewards and all(0 <= r <= 1 for r in rewards) and len(set(rewards)) > 1


def test_job_refuses_a_hacked_grader_unless_warned(client, dataset):
    rewards_empty = {**EQ, "operation": "like", "input": "{{item.reference_answer}}", "reference": "{{sample.output_text}}"}
    method = {"type": "reinforcement", "reinforcement": {"grader": rewards_empty}}
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=dataset.id, extra_body={"method": method})
    assert "rewards_empty_response" in err.value.message
    job = client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=dataset.id,
                                         extra_body={"method": method, "preflight": "warn"})
    assert not job.model_extra["rft_preflight"]["passed"]


def test_saved_grader_by_id_in_a_job(api, client, dataset):
    saved = _post(api, client, "/v1/graders", {"name": "eq", "grader": EQ}).json_body
    job = client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=dataset.id, extra_body={
        "method": {"type": "reinforcement", "reinforcement": {"grader": {"type": "saved", "id": saved["id"],
                                                                         "version": 1}}}})
    assert wait_submitted(client, job.id).model_extra["rft_submission"] == "submitted"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=dataset.id, extra_body={
            "method": {"type": "reinforcement", "reinforcement": {"grader": {"type": "saved", "id": "grader-nope"}}}})
