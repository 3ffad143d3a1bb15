"""Amazon Nova through Bedrock's native API (issue #15).

Pure: the hyperparameter mapping and ranges (chalicelib/domain/nova.py), the training metrics CSV,
the event-stream framing of the local Bedrock. Over the local stack, with the openai SDK: a Nova job
trained with a string_check grader and with a Lambda grader, submitted with
CreateModelCustomizationJob and finished by the EventBridge event (`rft_source: event`, driven by
local/event_pump.py's Pump), its reward curve in list_events, its custom model deployed and called
through the Converse translation (chat plain, streamed, with a tool call; responses), metered
exactly; deployments following aliases and retirement; an open-weight job converging with no
EventBridge event at all (`rft_source: poll`)."""
import json
import time

import boto3
import openai
import pytest
from botocore.eventstream import EventStreamBuffer
from helpers import http, register_graders, start_job, wait_submitted
from sample_data import arithmetic_rows, jsonl

from chalicelib.domain import nova as rules
from chalicelib.errors import InvalidRequest
from chalicelib.spend import ledger
from local.example_graders import arn as example_arn

NOVA = "amazon.nova-2-lite-v1:0:256k"
EQ = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
      "reference": "{{item.reference_answer}}", "operation": "eq"}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                         "parameters": WEATHER}}


# ---- pure: hyperparameters ------------------------------------------------------------------------

def test_openai_names_map_to_rft_hyperparameters():
    checked = rules.check_hyperparameters({"n_epochs": 2, "batch_size": 32, "learning_rate_multiplier": 5,
                                           "reasoning_effort": "high", "eval_interval": 10, "samples_per_prompt": 8,
                                           "max_prompt_length": 4096, "inference_max_tokens": 8192})
    assert rules.rft_hyperparameters(checked) == {
        "epochCount": 2, "batchSize": 32, "learningRate": 5e-5, "reasoningEffort": "high", "evalInterval": 10,
        "trainingSamplePerPrompt": 8, "maxPromptLength": 4096, "inferenceMaxTokens": 8192}
    assert rules.rft_hyperparameters(rules.check_hyperparameters({"n_epochs": "auto", "reasoning_effort": "default",
                                                                  "batch_size": 16.0})) == {"batchSize": 16}
    method = rules.bedrock_method("arn:aws:lambda:us-west-2:123456789012:function:g", {"n_epochs": 1})
    assert method == {"customizationType": "REINFORCEMENT_FINE_TUNING", "customizationConfig": {"rftConfig": {
        "graderConfig": {"lambdaGrader": {"lambdaArn": "arn:aws:lambda:us-west-2:123456789012:function:g"}},
        "hyperParameters": {"epochCount": 1}}}}


def test_the_rft_config_is_valid_for_botocore():
    from botocore.session import get_session
    from botocore.validate import ParamValidator

    shape = get_session().get_service_model("bedrock").shape_for("RFTHyperParameters")
    for hp in ({"batch_size": 16, "learning_rate_multiplier": 0.01, "samples_per_prompt": 2, "eval_interval": 1},
               {"batch_size": 512, "learning_rate_multiplier": 100, "samples_per_prompt": 16, "n_epochs": 50}):
        report = ParamValidator().validate(rules.rft_hyperparameters(rules.check_hyperparameters(hp)), shape)
        assert not report.has_errors(), report.generate_report()


RANGE_CASES = [
    ({"batch_size": 8}, "batch_size", "between 16 and 512"), ({"batch_size": 513}, "batch_size", "512"),
    ({"n_epochs": 0}, "n_epochs", "between 1 and 50"), ({"n_epochs": 1.5}, "n_epochs", "an integer"),
    ({"samples_per_prompt": 1}, "samples_per_prompt", "between 2 and 16"),
    ({"samples_per_prompt": 17}, "samples_per_prompt", "16"),
    ({"eval_interval": 101}, "eval_interval", "between 1 and 100"),
    ({"learning_rate_multiplier": 0.001}, "learning_rate_multiplier", "learningRate 1e-07 to 0.001"),
    ({"learning_rate_multiplier": 101}, "learning_rate_multiplier", "between 0.01 and 100"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort", "low, medium, high"),
    ({"max_prompt_length": 0}, "max_prompt_length", "at least 1"),
    ({"inference_max_tokens": True}, "inference_max_tokens", "an integer"),
    ({"compute_multiplier": 2}, "compute_multiplier", "not supported"),
    ({"warmup": 3}, "warmup", "not supported"),
]


@pytest.mark.parametrize("hp,name,text", RANGE_CASES, ids=[c[1] + str(i) for i, c in enumerate(RANGE_CASES)])
def test_out_of_range_is_a_400_naming_the_field(hp, name, text):
    with pytest.raises(InvalidRequest) as err:
        rules.check_hyperparameters(hp)
    assert err.value.param == f"method.reinforcement.hyperparameters.{name}" and text in err.value.message


@pytest.mark.parametrize("name", sorted(rules.NOVA_ONLY))
def test_nova_only_fields_on_an_open_weight_model_are_a_400(name):
    from chalicelib.domain.jobs import CreateJob, check_create

    req = CreateJob.model_validate({"model": "openai.gpt-oss-20b", "training_file": "f", "method": {
        "type": "reinforcement", "reinforcement": {"grader": EQ, "hyperparameters": {name: 4}}}})
    with pytest.raises(InvalidRequest) as err:
        check_create(req, ("openai.gpt-oss-20b", NOVA))
    assert err.value.param == f"method.reinforcement.hyperparameters.{name}"
    assert "not supported" in err.value.message and "Amazon Nova" in err.value.message
    # ... and the open-weight ranges do not apply to Nova (the reverse): batch_size 4 is fine on Mantle only
    assert check_create(CreateJob.model_validate({"model": "openai.gpt-oss-20b", "training_file": "f", "method": {
        "type": "reinforcement", "reinforcement": {"grader": EQ, "hyperparameters": {"batch_size": 4}}}}),
        ("openai.gpt-oss-20b",)) == {"batch_size": 4}
    with pytest.raises(InvalidRequest) as err:
        check_create(CreateJob.model_validate({"model": NOVA, "training_file": "f", "method": {
            "type": "reinforcement", "reinforcement": {"grader": EQ, "hyperparameters": {"batch_size": 4}}}}), (NOVA,))
    assert err.value.param == "method.reinforcement.hyperparameters.batch_size"


def test_names_fit_bedrocks_patterns_and_statuses_map():
    job_id = "ftjob-0123456789abcdef01234567"
    assert rules.JOB_NAME.fullmatch(rules.job_name(job_id)) and rules.MODEL_NAME.fullmatch(
        rules.custom_model_name(job_id))
    assert rules.TOKEN.fullmatch(rules.request_token("team-1", job_id))
    arn = "arn:aws:bedrock:us-east-1:123456789012:custom-model/amazon.nova-2-lite-v1:0:256k/abcdef123456"
    assert rules.tuned_model_id(NOVA, arn) == f"{NOVA}:ft:abcdef123456"
    assert rules.MODEL_NAME.fullmatch(rules.deployment_name(arn, 3))
    phases = lambda v, d, t: {"status": "InProgress", "statusDetails": {   # noqa: E731 - a one-line fixture builder
        "validationDetails": {"status": v}, "dataProcessingDetails": {"status": d}, "trainingDetails": {"status": t}}}
    assert rules.job_status(phases("InProgress", "NotStarted", "NotStarted")) == "validating_files"
    assert rules.job_status(phases("Completed", "InProgress", "NotStarted")) == "queued"
    assert rules.job_status(phases("Completed", "Completed", "InProgress")) == "running"
    assert rules.job_status({"status": "InProgress"}) == "running"
    assert rules.job_status({"status": "Stopped"}) == "Stopped"


def test_the_metrics_csv_keeps_every_column_and_names_the_reward():
    text = ("step_number,epoch_number,train_reward_mean,policy_entropy,kl_divergence,note\n"
            "1,0,0.25,0.9,0.01,warmup\n2,0,0.5,0.8,,\n3,0,nan,0.7,0.03,\n")
    rows = rules.parse_metrics_csv(text)
    assert rows[0] == {"step_number": 1, "step": 1, "epoch_number": 0, "epoch": 0, "train_reward_mean": 0.25,
                       "critic_rewards_mean": 0.25, "policy_entropy": 0.9, "actor_entropy": 0.9,
                       "kl_divergence": 0.01, "note": "warmup"}
    assert "kl_divergence" not in rows[1] and "train_reward_mean" not in rows[2]
    events = rules.metrics_events("arn:x", rows, 1700000000)
    assert [e["message"] for e in events] == ["Step 1: training metrics", "Step 2: training metrics",
                                              "Step 3: training metrics"]
    assert events == rules.metrics_events("arn:x", rows, 1700000000)          # stable ids: copied once
    assert len({e["id"] for e in events}) == 3 and all(e["type"] == "metrics" for e in events)


def test_event_stream_frames_decode_with_botocore():
    from local.bedrock_native import event_frame, exception_frame

    buffer = EventStreamBuffer()
    buffer.add_data(event_frame("messageStart", {"role": "assistant"}) +
                    event_frame("contentBlockDelta", {"delta": {"text": "hé"}, "contentBlockIndex": 0}) +
                    exception_frame("throttlingException", "slow down"))
    messages = list(buffer)
    assert [m.headers[":event-type" if m.headers[":message-type"] == "event" else ":exception-type"]
            for m in messages] == ["messageStart", "contentBlockDelta", "throttlingException"]
    assert json.loads(messages[1].payload) == {"delta": {"text": "hé"}, "contentBlockIndex": 0}


# ---- over the local stack ---------------------------------------------------------------------------

@pytest.fixture
def event_pump(stack):
    """EventBridge -> on_bedrock_job_event, as tests/stack/training/test_lifecycle.py drives it (rule on moto's bus)."""
    from app import app
    from local.event_pump import Pump

    pump = Pump(app, schedule_seconds=3600, only={"on_bedrock_job_event"})
    pump.start()
    yield pump
    pump.stop()


def _native(stack) -> dict:
    return http("GET", f"http://127.0.0.1:{stack.bedrock.port}/_local/native")[1]


def _job(created):
    from chalicelib.store.models import Job
    return Job.get(created.organization_id, created.id, consistent_read=True)


def _wait_job(created, statuses, timeout=30):
    """Waits on the job record itself (a retrieve would poll Bedrock and apply the state first),
    until it is finalized too (registered, out of the reconciler's index)."""
    deadline = time.monotonic() + timeout
    while True:
        job = _job(created)
        if job.status in statuses and job.active_shard is None:
            return job
        assert time.monotonic() < deadline, f"{created.id} stuck in {job.status}"
        time.sleep(0.1)


def _nova_job(client, grader=EQ, suffix=None, **hyperparameters):
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    hp = {"n_epochs": 1, "batch_size": 16, "samples_per_prompt": 4, **hyperparameters}
    return client.fine_tuning.jobs.create(model=NOVA, training_file=f.id, suffix=suffix, method={
        "type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hp}})


def _wait_deployment(team_id, model_id, status="Active", timeout=20):
    from chalicelib.inference import deployments as nova
    from chalicelib.training import lifecycle

    deadline = time.monotonic() + timeout
    while True:
        lifecycle.reconcile()
        view = nova.deployment_view(team_id, model_id)
        if view and view["status"] == status:
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.2)


def _tap_events(detail_type, predicate, timeout=10):
    from chalicelib import outbox

    sqs = boto3.client("sqs", region_name="us-west-2")
    url = sqs.get_queue_url(QueueName=f"{outbox.bus_name()}-outbound-tap")["QueueUrl"]
    found, deadline = [], time.monotonic() + timeout
    while not found and time.monotonic() < deadline:
        for msg in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", []):
            body = json.loads(msg["Body"])
            sqs.delete_message(QueueUrl=url, ReceiptHandle=msg["ReceiptHandle"])
            if body["detail-type"] == detail_type and predicate(body["detail"]):
                found.append(body["detail"])
    return found


def test_nova_trains_through_the_native_api_and_serves_through_converse(client, bedrock, stack, api, event_pump):
    created = _nova_job(client, suffix="nova-bot", reasoning_effort="low", learning_rate_multiplier=2)
    assert created.status == "validating_files" and created.model == NOVA
    job = _wait_job(created, {"succeeded", "failed", "cancelled"})
    assert job.status == "succeeded", job.error

    # Submitted with CreateModelCustomizationJob, the hosted grader as the reward Lambda
    native = _native(stack)
    sent = next(r["body"] for r in native["requests"] if r["operation"] == "create_job"
                and r["body"]["jobName"] == created.id)
    rft = sent["customizationConfig"]["rftConfig"]
    assert sent["customizationType"] == "REINFORCEMENT_FINE_TUNING" and sent["baseModelIdentifier"] == NOVA
    assert rft["hyperParameters"] == {"epochCount": 1, "batchSize": 16, "trainingSamplePerPrompt": 4,
                                      "reasoningEffort": "low", "learningRate": 2e-5}
    assert rft["graderConfig"]["lambdaGrader"]["lambdaArn"].endswith(":function:rft-hub-local-hosted_grader")
    assert sent["roleArn"].endswith(":role/rfthub-local-bedrock-rft")
    prefix = f"s3://rfthub-local-datasets/nova/{job.team_id}/{job.job_id}/"
    assert sent["trainingDataConfig"]["s3Uri"] == prefix + "train.jsonl"
    assert sent["outputDataConfig"]["s3Uri"] == prefix + "output/"
    assert job.bedrock_job_id.startswith("arn:aws:bedrock:us-west-2:123456789012:model-customization-job/")

    # The state came from the EventBridge event, the reward curve from the metrics CSV
    events = client.fine_tuning.jobs.list_events(created.id, limit=100).data
    sources = {e.message: e.model_extra["rft_source"] for e in events if e.message.startswith("Status")}
    assert sources[next(m for m in sources if m.endswith("-> succeeded."))] == "event"
    metrics = sorted((e for e in events if e.type == "metrics"), key=lambda e: e.data["step"])
    assert [m.data["step"] for m in metrics] == [1, 2, 3, 4]
    assert all("critic_rewards_mean" in m.data and "kl_divergence" in m.data for m in metrics)
    assert metrics[-1].data["critic_rewards_mean"] >= metrics[0].data["critic_rewards_mean"]
    assert client.fine_tuning.jobs.checkpoints.list(created.id).data == []      # none exposed natively
    retrieved = client.fine_tuning.jobs.retrieve(created.id)
    assert retrieved.status == "succeeded" and retrieved.fine_tuned_model.startswith(f"{NOVA}:ft:")
    assert retrieved.model_extra["rft_cost_estimate"]["samples_per_prompt"] == 4

    # Registered, aliased, deployed; callable once the deployment is Active
    model = client.models.retrieve("nova-bot")
    assert model.model_extra["rft_target"] == retrieved.fine_tuned_model
    with pytest.raises(openai.ConflictError) as err:
        client.chat.completions.create(model="nova-bot", messages=[{"role": "user", "content": "too early"}])
    assert err.value.body["code"] == "model_not_ready"
    view = _wait_deployment(job.team_id, retrieved.fine_tuned_model)
    assert view["deployment_arn"] in _native(stack)["deployments"]
    announced = _tap_events("rft-hub.model.deployment_changed", lambda d: d["model"] == retrieved.fine_tuned_model)
    assert announced and announced[0]["status"] == "Active"

    # Chat, plain: translated to Converse on the deployment, metered exactly
    raw = client.chat.completions.with_raw_response.create(
        model="nova-bot", max_tokens=50, temperature=0.3, messages=[{"role": "system", "content": "Be brief."},
                                                                    {"role": "user", "content": "What is 2 + 2?"}])
    reply = raw.parse()
    assert reply.choices[0].message.content.startswith("[nova-custom:") and reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    expected = -(-(reply.usage.prompt_tokens * 330_000 + reply.usage.completion_tokens * 2_750_000) // 1_000_000)
    assert raw.headers["x-rft-cost-usd"] == f"{expected / 1e6:.6f}"
    converse_calls = [r for r in _native(stack)["requests"] if r["operation"] == "converse"]
    assert converse_calls[-1]["path"].endswith(view["deployment_arn"].rsplit("/", 1)[-1] + "/converse")
    assert converse_calls[-1]["body"]["inferenceConfig"] == {"maxTokens": 50, "temperature": 0.3}
    assert converse_calls[-1]["body"]["system"] == [{"text": "Be brief."}]

    # A tool call, plain and streamed (with include_usage)
    called = client.chat.completions.create(model="nova-bot", tools=[TOOL], tool_choice="required",
                                            messages=[{"role": "user", "content": "Weather in Oslo?"}])
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
    follow = client.chat.completions.create(model="nova-bot", tools=[TOOL], messages=[
        {"role": "user", "content": "Weather in Oslo?"}, called.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "12C and rain"}])
    assert follow.choices[0].finish_reason == "stop" and "12C and rain" in follow.choices[0].message.content
    chunks = list(client.chat.completions.create(model="nova-bot", tools=[TOOL], tool_choice="required", stream=True,
                                                 stream_options={"include_usage": True},
                                                 messages=[{"role": "user", "content": "Weather in Rome?"}]))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = [t for d in deltas for t in d.tool_calls or []]
    assert streamed[0].id.startswith("tooluse_") and streamed[0].function.name == "get_weather"
    assert set(json.loads("".join(t.function.arguments or "" for t in streamed))) == {"city"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens > 0
    text_chunks = list(client.chat.completions.create(model="nova-bot", stream=True,
                                                      messages=[{"role": "user", "content": "Say hi"}]))
    assert "".join(c.choices[0].delta.content or "" for c in text_chunks if c.choices).startswith("[nova-custom:")
    assert all(c.usage is None for c in text_chunks)             # not asked for: not shown (but metered)

    # Responses, plain and streamed
    resp = client.responses.create(model="nova-bot", input="Hello there", instructions="Be brief.",
                                   max_output_tokens=40)
    assert resp.status == "completed" and resp.output_text.startswith("[nova-custom:") and resp.usage.output_tokens
    stream = list(client.responses.create(model="nova-bot", input="Hello again", stream=True))
    assert stream[0].type == "response.created" and stream[-1].type == "response.completed"
    assert stream[-1].response.output_text.startswith("[nova-custom:")

    # A parameter with no Converse equivalent is a 400 naming it (nothing held or charged)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="nova-bot", seed=7, messages=[{"role": "user", "content": "x"}])
    assert err.value.body["param"] == "seed" and err.value.body["code"] == "unsupported_parameter"

    # /v1/usage shows exactly what the ledger charged
    entries = [e for e in ledger.entries(job.team_id) if e.model == "nova-bot" and e.kind == "inference"]
    assert len(entries) == 7 and all(e.outcome == "served" and e.cost_micro > 0 for e in entries)   # 409 and 400: none
    report = api.http.get("/v1/usage?group_by=model", headers={"Authorization": f"Bearer {client.api_key}"}).json_body
    row = next(d for d in report["data"] if d["model"] == "nova-bot")
    assert row["requests"] == 7 and row["cost_micro"] == sum(int(e.cost_micro) for e in entries)
    assert row["input_tokens"] == sum(int(e.input_tokens) for e in entries)


def test_nova_trains_with_a_lambda_grader(client, bedrock, stack, event_pump):
    register_graders(client)
    grader = {"type": "lambda", "lambda": {"function": example_arn("rft-grader-example-exact-match")}}
    created = _nova_job(client, grader=grader)
    job = _wait_job(created, {"succeeded", "failed", "cancelled"})
    assert job.status == "succeeded", job.error
    statuses = [e for e in client.fine_tuning.jobs.list_events(created.id, limit=100).data
                if e.message.endswith("-> succeeded.")]
    assert statuses and statuses[0].model_extra["rft_source"] == "event"
    rewards = [e.data["critic_rewards_mean"] for e in client.fine_tuning.jobs.list_events(created.id, limit=100).data
               if e.type == "metrics"]
    assert len(rewards) == 4


def test_refused_before_anything_is_sent(client, bedrock, stack):
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    before = len(_native(stack)["requests"])
    for hp, name in (({"batch_size": 8}, "batch_size"), ({"samples_per_prompt": 32}, "samples_per_prompt")):
        with pytest.raises(openai.BadRequestError) as err:
            client.fine_tuning.jobs.create(model=NOVA, training_file=f.id, method={
                "type": "reinforcement", "reinforcement": {"grader": EQ, "hyperparameters": hp}})
        assert err.value.body["param"] == f"method.reinforcement.hyperparameters.{name}"
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=f.id, method={
            "type": "reinforcement", "reinforcement": {"grader": EQ, "hyperparameters": {"reasoning_effort": "low"}}})
    assert err.value.body["param"] == "method.reinforcement.hyperparameters.reasoning_effort"
    assert len(_native(stack)["requests"]) == before


def test_cancel_stops_the_native_job(client, bedrock, stack):
    bedrock.clock.update({"step_seconds": 5, "total_steps": 50})
    created = _nova_job(client)
    deadline = time.monotonic() + 20
    while not _job(created).bedrock_job_id:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client.fine_tuning.jobs.cancel(created.id)
    arn = _job(created).bedrock_job_id
    assert any(r["operation"] == "stop_job" and r["path"].endswith(arn.rsplit("/", 1)[-1] + "/stop")
               for r in _native(stack)["requests"])
    deadline = time.monotonic() + 20
    while client.fine_tuning.jobs.retrieve(created.id).status != "cancelled":   # Stopping -> Stopped (polled)
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_deployments_follow_aliases_and_retirement(client, bedrock, stack, event_pump, api):
    from chalicelib.inference import deployments as nova
    from chalicelib.inference import registry

    first = _nova_job(client, suffix="helper")
    second = _nova_job(client)
    one, two = _wait_job(first, {"succeeded"}), _wait_job(second, {"succeeded"})
    team = one.team_id
    m1, m2 = one.fine_tuned_model, two.fine_tuned_model
    arn1 = _wait_deployment(team, m1)["deployment_arn"]
    arn2 = _wait_deployment(team, m2)["deployment_arn"]

    def point(alias, model):
        status, body = http("POST", f"{stack.base_url}/v1/models/aliases", client.api_key,
                            {"alias": alias, "model": model})
        assert status == 200, body

    # Moving the only alias away from m1 deletes its deployment; calling m1 says why
    point("helper", m2)
    assert nova.deployment_view(team, m1)["status"] == "Deleted" and arn1 not in _native(stack)["deployments"]
    with pytest.raises(openai.ConflictError) as err:
        client.chat.completions.create(model=m1, messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_deployed"
    assert client.chat.completions.create(model="helper", messages=[{"role": "user", "content": "hi"}]).choices

    # Pointing an alias at it deploys it again (a new deployment)
    point("spare", m1)
    view = _wait_deployment(team, m1)
    assert view["deployment_arn"] != arn1
    assert client.chat.completions.create(model="spare", messages=[{"role": "user", "content": "hi"}]).choices

    # Retiring: refused while an alias points at it; then its deployment is deleted with it
    with pytest.raises(Exception) as err:
        registry.retire(team, m2)
    assert getattr(err.value, "code", None) == "model_in_use"
    point("helper", m1)                        # m2 has no alias now: its deployment goes at once
    assert nova.deployment_view(team, m2)["status"] == "Deleted" and arn2 not in _native(stack)["deployments"]
    assert registry.retire(team, m2) == {"id": m2, "object": "model", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=m2, messages=[{"role": "user", "content": "hi"}])
    assert m2 not in {m.id for m in client.models.list().data}


def test_a_failed_deployment_is_recorded_and_announced(client, bedrock, stack, event_pump):
    from chalicelib.inference import deployments as nova

    bedrock.clock.update({"deployment_seconds": 60})
    job = _wait_job(_nova_job(client, suffix="flaky"), {"succeeded"})
    view = nova.deployment_view(job.team_id, job.fine_tuned_model)
    assert view["status"] == "Creating"
    http("POST", f"http://127.0.0.1:{stack.bedrock.port}/_local/native/deployments/{view['deployment_arn']}/fail",
         body={"message": "Insufficient capacity."})
    failed = _wait_deployment(job.team_id, job.fine_tuned_model, status="Failed")
    assert failed["failure_message"] == "Insufficient capacity."
    assert _tap_events("rft-hub.model.deployment_changed",
                       lambda d: d["model"] == job.fine_tuned_model and d["status"] == "Failed")
    with pytest.raises(openai.ConflictError) as err:
        client.chat.completions.create(model="flaky", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_deployed"


def test_an_open_weight_job_converges_with_no_eventbridge_event(client, bedrock, stack, event_pump):
    """AWS documents no state-change event for OpenAI-compatible jobs; the local Bedrock publishes
    none by default, so the reconciler alone finishes the job (rft_source: poll)."""
    from chalicelib.training import lifecycle

    created = wait_submitted(client, start_job(client).id)
    bid = created.model_extra["rft_bedrock_job_id"]
    deadline = time.monotonic() + 20
    while bedrock.jobs[bid]["status"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert not [p for p in bedrock.published if bid in p["Detail"]]
    lifecycle.reconcile()
    job = _job(created)
    assert job.status == "succeeded" and job.active_shard is None
    status_events = [e for e in client.fine_tuning.jobs.list_events(created.id, limit=100).data
                     if e.message.startswith("Status")]
    assert status_events and {e.model_extra["rft_source"] for e in status_events} == {"poll"}
    assert not [e for e in event_pump.delivered if bid in json.dumps(e)]


def test_mantle_projects_isolate_files_jobs_and_models(stack, bedrock):
    """The local Mantle endpoint keeps files, jobs and tuned models per project (`OpenAI-Project`,
    the SDK's `project=`) and refuses another project's, as if they did not exist."""
    base = f"http://127.0.0.1:{stack.bedrock.port}/v1"
    admin = openai.OpenAI(base_url=base, api_key="bedrock-api-key-local", max_retries=0)
    ids = [admin.post("/organization/projects", body={"name": f"team-{n}", "tags": {"team": n}}, cast_to=object)["id"]
           for n in ("a", "b")]
    assert all(i.startswith("proj_") for i in ids)
    a, b = (openai.OpenAI(base_url=base, api_key="bedrock-api-key-local", project=i, max_retries=0) for i in ids)
    f = a.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    assert a.files.retrieve(f.id).id == f.id and f.id in {x.id for x in a.files.list().data}
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(f.id)
    assert f.id not in {x.id for x in b.files.list().data} | {x.id for x in admin.files.list().data}
    method = {"type": "reinforcement", "reinforcement": {"grader": {"type": "lambda", "lambda": {
        "function": example_arn("rft-grader-example-exact-match")}}}}
    with pytest.raises(openai.BadRequestError) as err:
        b.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=f.id, extra_body={"method": method})
    assert err.value.body["param"] == "training_file"
    job = a.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=f.id, extra_body={"method": method})
    with pytest.raises(openai.NotFoundError):
        b.fine_tuning.jobs.retrieve(job.id)
    assert job.id not in {j.id for j in b.fine_tuning.jobs.list().data}
    deadline = time.monotonic() + 20
    while (done := a.fine_tuning.jobs.retrieve(job.id)).status != "succeeded":
        assert time.monotonic() < deadline and done.status not in ("failed", "cancelled"), done.status
        time.sleep(0.1)
    ask = {"model": done.fine_tuned_model, "messages": [{"role": "user", "content": "hi"}]}
    assert a.chat.completions.create(**ask).choices
    with pytest.raises(openai.NotFoundError):
        b.chat.completions.create(**ask)
    assert done.fine_tuned_model in {m.id for m in a.models.list().data}
    assert done.fine_tuned_model not in {m.id for m in b.models.list().data}
    admin.post(f"/organization/projects/{ids[1]}/archive", cast_to=object)
    with pytest.raises(openai.NotFoundError) as err:
        b.files.list()
    assert err.value.body["code"] == "project_not_found"


def test_each_team_works_in_its_own_mantle_project(stack, api, make_team, bedrock, admin_headers):
    """rft-hub's side of projects (RFT_MANTLE_PROJECTS, on in the local stage): a team gets its own
    project when it is created, and every Mantle call made for it (files, the job, its polling and
    events, inference on its tuned model, a judge) carries that project; another team's project
    cannot see any of it."""
    from helpers import wait_for

    from chalicelib.platform import teams

    (team_a, key_a), (team_b, _) = make_team("proj-a"), make_team("proj-b")
    tagged = {p["tags"].get("rft-hub-team"): p["id"] for p in bedrock.projects.values()}
    project_a, project_b = tagged[team_a], tagged[team_b]
    assert project_a != project_b
    assert teams.mantle_project(team_a) == project_a          # recorded on the team, not made twice
    listed = api.http.get("/v1/admin/teams", headers=admin_headers).json_body
    assert {t["id"]: t["mantle_project"] for t in listed["data"]}[team_b] == project_b

    a = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key_a, max_retries=0)
    first = len(bedrock.requests)
    created = start_job(a)
    done = wait_for(a, created.id, {"succeeded", "failed"}, timeout=60)
    assert done.status == "succeeded", done.error
    reply = a.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "2+2"}])
    assert reply.choices
    mantle = [r for r in bedrock.requests[first:] if r["path"].startswith("/v1/")
              and not r["path"].startswith("/v1/organization/")]
    assert {r["path"] for r in mantle} >= {"/v1/files", "/v1/fine_tuning/jobs", "/v1/chat/completions"}
    assert {r["project"] for r in mantle} == {project_a}, {(r["path"], r["project"]) for r in mantle}
    bedrock_job = bedrock.jobs[done.model_extra["rft_bedrock_job_id"]]
    assert bedrock.owners[bedrock_job["id"]] == project_a

    # Straight at Bedrock, team b's project sees none of team a's job, file or model.
    b_direct = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.bedrock.port}/v1", api_key="bedrock-api-key-local",
                             project=project_b, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        b_direct.fine_tuning.jobs.retrieve(bedrock_job["id"])
    with pytest.raises(openai.NotFoundError):
        b_direct.chat.completions.create(model=done.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])


def test_a_team_made_while_bedrock_is_down_gets_its_project_from_the_reconciler(stack, api, make_team, bedrock):
    """Team creation does not fail when Bedrock cannot make the team's project; the team's
    calls are a 503 (never sent in the default project) until the reconciler makes it."""
    from chalicelib.platform import teams
    from chalicelib.training import lifecycle

    with bedrock.lock:
        bedrock.faults.append({"path": "/v1/organization/projects", "status": 503, "count": 1000})
    try:
        team_id, key = make_team("proj-late")
    finally:
        with bedrock.lock:
            bedrock.faults = []
    assert team_id not in {p["tags"].get("rft-hub-team") for p in bedrock.projects.values()}
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)
    before = len(bedrock.requests)
    with pytest.raises(openai.InternalServerError) as err:
        client.chat.completions.create(model="openai.gpt-oss-20b", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 503 and "project" in err.value.message
    assert not [r for r in bedrock.requests[before:] if r["path"] == "/v1/chat/completions"]
    assert lifecycle.reconcile().projects_made >= 1
    made = teams.mantle_project(team_id)
    assert made and {p["tags"].get("rft-hub-team"): p["id"] for p in bedrock.projects.values()}[team_id] == made
    teams._projects.invalidate(team_id)     # another instance: reads the recorded project
    assert client.chat.completions.create(model="openai.gpt-oss-20b",
                                          messages=[{"role": "user", "content": "hi"}]).choices
    assert bedrock.requests[-1]["project"] == made
