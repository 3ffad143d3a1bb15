"""Amazon Nova reinforcement fine-tuning, end to end, with the unmodified openai SDK against rft-hub.

    make run            # in one terminal
    .venv/bin/python examples/nova.py

Reads the base URL and demo key from .local/stack.json unless OPENAI_BASE_URL and
OPENAI_API_KEY are set. Trains amazon.nova-2-lite-v1:0:256k twice (a string_check grader and
the quickstart's Lambda grader) through Bedrock's native API, prints each reward curve and where
each status change came from, waits for the tuned model's deployment, then calls it through the
Converse translation (chat plain, streamed, with a tool; responses plain and streamed) and
checks /v1/usage against what each call cost. Exits non-zero if anything is not as expected.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart import GRADER_ARN  # noqa: E402 - after sys.path is set
from sample_data import arithmetic_rows, jsonl  # noqa: E402 - after sys.path is set

NOVA = "amazon.nova-2-lite-v1:0:256k"
ALIAS = "nova-calc"
TERMINAL = ("succeeded", "failed", "cancelled")
# Nova's ranges, not the open-weight ones: batch_size 16-512, samples_per_prompt 2-16 (docs/training.md, "Amazon Nova").
HYPERPARAMETERS = {"n_epochs": 1, "batch_size": 16, "samples_per_prompt": 4, "reasoning_effort": "low"}
EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
         "reference": "{{item.reference_answer}}", "operation": "eq"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# chalicelib/data/prices.json: $0.33 / $2.75 per 1M tokens; a Nova custom model inherits its base's price.
PRICE_MICRO_PER_MILLION = (330_000, 330_000, 2_750_000)       # input, cached input, output


def check(ok, message) -> None:
    if not ok:
        raise SystemExit(f"FAILED: {message}")


def train(client, training_id: str, grader: dict, suffix: str):
    return client.fine_tuning.jobs.create(
        model=NOVA, training_file=training_id, suffix=suffix,
        # Raw, as in the quickstart: the SDK's typed grader union has no "lambda" and no Nova-only hyperparameters.
        extra_body={"method": {"type": "reinforcement", "reinforcement": {
            "grader": grader, "hyperparameters": HYPERPARAMETERS}}})


def follow(client, job, timeout: float = 600):
    """Prints the job's events until a status event says it is over. Only events are read while it
    runs: a retrieve would poll Bedrock itself, and here the EventBridge event should move the job."""
    seen, deadline = {}, time.monotonic() + timeout

    def read() -> list:
        fresh = [e for e in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data) if e.id not in seen]
        for event in fresh:
            seen[event.id] = event
            if event.type == "metrics":
                print(f"  step {event.data['step']}: reward={event.data['critic_rewards_mean']}")
            else:
                print(f"  [{event.level}] {event.message} (rft_source: {event.model_extra['rft_source']})")
        return [e for e in fresh if e.message.startswith("Status") and e.data.get("to") in TERMINAL]

    while not (final := read()):
        check(time.monotonic() < deadline, f"{job.id} did not finish within {timeout:.0f} s")
        time.sleep(2)
    read()                                                # the last rows of the metrics CSV
    job = client.fine_tuning.jobs.retrieve(job.id)
    check(job.status == "succeeded", f"{job.id} ended {job.status}: {job.error}")
    source = final[-1].model_extra["rft_source"]
    check(source == "event", f"{job.id} reached {job.status} by {source!r}, not by the EventBridge event")
    metrics = sorted((e for e in seen.values() if e.type == "metrics"), key=lambda e: e.data["step"])
    check(metrics, f"{job.id} has no reward curve")
    print(f"job {job.id}: {job.status}, fine_tuned_model={job.fine_tuned_model}\n  reward curve: "
          + " ".join(f"{m.data['critic_rewards_mean']:.2f}" for m in metrics))
    return job


def wait_until_served(client, job, timeout: float = 180):
    """The alias answers once its model's deployment is Active; until then a call is a 409
    model_not_ready (never charged). Returns the first answer."""
    # The suffix becomes the alias only while that alias is free (the first run); later it moves explicitly.
    try:
        target = client.models.retrieve(ALIAS).model_extra.get("rft_target")
    except openai.NotFoundError:
        target = None
    if target != job.fine_tuned_model:
        client.post("/models/aliases", body={"alias": ALIAS, "model": job.fine_tuned_model}, cast_to=object)
        print(f"alias {ALIAS} moved from {target} to {job.fine_tuned_model}")
    deadline, waited = time.monotonic() + timeout, False
    while True:
        try:
            return client.chat.completions.with_raw_response.create(
                model=ALIAS, max_tokens=50, temperature=0.3,
                messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}])
        except openai.ConflictError as err:
            check(err.body.get("code") == "model_not_ready", f"unexpected 409: {err.body}")
            check(time.monotonic() < deadline, f"{ALIAS} was not served within {timeout:.0f} s: {err.body}")
            if not waited:
                print(f"  409 {err.body['code']}: {err.body['message']}")
                waited = True
        time.sleep(2)


def cost_micro(usage) -> int:
    """What rft-hub charges for one call (chat or responses usage), in micro-USD: the exact sum
    of its parts (uncached prompt, cached prompt, output), rounded up once to a whole micro-dollar."""
    chat = hasattr(usage, "prompt_tokens")
    prompt, output = (usage.prompt_tokens, usage.completion_tokens) if chat else (usage.input_tokens, usage.output_tokens)
    details = usage.prompt_tokens_details if chat else usage.input_tokens_details
    cached = (details and details.cached_tokens) or 0
    rate_in, rate_cached, rate_out = PRICE_MICRO_PER_MILLION
    exact = (prompt - cached) * rate_in + cached * rate_cached + output * rate_out   # micro-USD x 1,000,000
    return -(-exact // 1_000_000)


def usage_row(client) -> dict:
    report = client.get("/usage", cast_to=object, options={"params": {"group_by": "model"}})
    return next((row for row in report["data"] if row["model"] == ALIAS), {"requests": 0, "cost_micro": 0})


def main() -> None:
    stack_file = Path(__file__).resolve().parent.parent / ".local" / "stack.json"
    stack = json.loads(stack_file.read_text()) if stack_file.exists() else {}
    client = openai.OpenAI(base_url=os.environ.get("OPENAI_BASE_URL") or stack["openai_base_url"],
                           api_key=os.environ.get("OPENAI_API_KEY") or stack["demo_key"])

    training = client.files.create(file=("arithmetic.jsonl", jsonl(arithmetic_rows(150))), purpose="fine-tune")
    print(f"uploaded {training.id}: {training.model_extra['rft_validation']['rows']} rows")
    # Both jobs train at once on Bedrock and are followed one after the other: the string_check one
    # (whose alias is called below) last, so its deployment is likely still being created then.
    jobs = [train(client, training.id, {"type": "lambda", "lambda": {"function": GRADER_ARN}}, ALIAS + "-lambda"),
            train(client, training.id, EXACT, ALIAS)]
    for job in jobs:
        print(f"job {job.id} ({job.model_extra['rft_cost_estimate']['estimated_usd']} USD estimated): {job.status}")
    done = [follow(client, job) for job in jobs]

    before = usage_row(client)
    spent = []                                            # exact cost of each call, from its token counts
    raw = wait_until_served(client, done[1])
    reply = raw.parse()
    spent.append(cost_micro(reply.usage))
    check(reply.choices[0].message.content and raw.headers["x-rft-cost-usd"] == f"{spent[-1] / 1e6:.6f}",
          f"{reply} charged {raw.headers['x-rft-cost-usd']}")
    print(f"chat: {reply.choices[0].message.content!r} (${raw.headers['x-rft-cost-usd']})")

    print("chat, streamed: ", end="")
    text, usage = "", None
    for chunk in client.chat.completions.create(model=ALIAS, stream=True, stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "Say hi"}]):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        usage = chunk.usage or usage
    print()
    check(text and usage, "the chat stream sent no text or no usage")
    spent.append(cost_micro(usage))

    question = [{"role": "user", "content": "Weather in Oslo?"}]
    called = client.chat.completions.create(model=ALIAS, tools=[WEATHER], tool_choice="required", messages=question)
    call = called.choices[0].message.tool_calls[0]
    check(called.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather", called)
    print(f"tool call: {call.function.name}({call.function.arguments})")
    answered = client.chat.completions.create(model=ALIAS, tools=[WEATHER], messages=question + [
        called.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "12C and rain"}])
    check(answered.choices[0].finish_reason == "stop", answered)
    print(f"  with its result: {answered.choices[0].message.content!r}")
    spent += [cost_micro(r.usage) for r in (called, answered)]

    resp = client.responses.create(model=ALIAS, input="Hello there", instructions="Be brief.", max_output_tokens=40)
    check(resp.status == "completed" and resp.output_text, resp)
    print(f"responses: {resp.output_text!r}")
    print("responses, streamed: ", end="")
    streamed = None
    for event in client.responses.create(model=ALIAS, input="Hello again", stream=True):
        if event.type == "response.output_text.delta":
            print(event.delta, end="", flush=True)
        elif event.type == "response.completed":
            streamed = event.response
    print()
    check(streamed is not None and streamed.output_text, "the responses stream did not complete")
    spent += [cost_micro(r.usage) for r in (resp, streamed)]

    after = usage_row(client)
    calls, charged = after["requests"] - before["requests"], after["cost_micro"] - before["cost_micro"]
    print(f"/v1/usage for {ALIAS}: {json.dumps(after)}")
    print(f"  this run: {calls} calls, {charged} micro-USD; from the token counts: {len(spent)} calls, "
          f"{sum(spent)} micro-USD ({' + '.join(map(str, spent))})")
    check(calls == len(spent) and charged == sum(spent), "/v1/usage does not show exactly what the calls cost")


if __name__ == "__main__":
    main()
