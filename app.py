"""rft-hub: the Chalice app. Routes live in blueprints under chalicelib/api; the
non-HTTP handlers below are one call each into chalicelib."""
import json

from chalice import Chalice, Rate

from chalicelib import (
    deadline,
    metrics,
    tracing,
    wiring,  # noqa: F401  (the reactions between contexts, for every function)
)
from chalicelib.api import (
    admin,
    console,
    evals,
    files,
    gateway,
    graders,
    health,
    jobs,
    models,
    openapi,
    pipelines,
    slack,
    usage,
)
from chalicelib.config import evals_queue, jobs_queue, pipeline_steps_queue, pipeline_triggers_queue
from chalicelib.slack import commands as slash_commands
from chalicelib.slack import notifications as slack_service
from chalicelib.training import hosted_grader, lifecycle

app = Chalice(app_name="rft-hub")
# Multipart uploads must reach the Lambda byte-exact (API Gateway base64-encodes binary types).
app.api.binary_types.append("multipart/form-data")

for blueprint in (health.bp, admin.bp, files.bp, jobs.bp, models.bp, graders.bp, gateway.bp, usage.bp,
                  evals.bp, pipelines.bp, slack.bp, console.bp, openapi.bp):
    app.register_blueprint(blueprint)


# Every handler (HTTP requests included): traced, and its metrics written once at its end.
@app.middleware("all")
def operate(event, get_response):
    context = getattr(event, "context", None) or getattr(event, "lambda_context", None)
    with tracing.handler(getattr(context, "function_name", None) or "rft-hub"), metrics.invocation():
        return get_response(event)


def _account_id(context) -> str | None:
    arn = getattr(context, "invoked_function_arn", "") or ""
    parts = arn.split(":")
    return parts[4] if len(parts) > 4 and parts[4].isdigit() else None


# Bedrock job state changes on the default bus. The status is detail.jobStatus; no detail
# filter here, so every status (InProgress too) reaches the handler.
@app.on_cw_event({"source": ["aws.bedrock"], "detail-type": ["Model Customization Job State Change"]},
                 name="on_bedrock_job_event")
def on_bedrock_job_event(event):
    return lifecycle.handle_bedrock_event(event.to_dict(), _account_id(event.context))


# Events are best effort: polling is what guarantees every job converges.
@app.schedule(Rate(2, unit=Rate.MINUTES), name="reconcile_jobs")
def reconcile_jobs(event):
    return lifecycle.reconcile().view()


# Slow work of a new job, off the request path: the preflight of graders that call out, the
# dataset preparation and the Bedrock submission. Idempotent; a raise leaves the message queued.
@app.on_sqs_message(queue=jobs_queue(), batch_size=1, name="job_worker")
def job_worker(event):
    from chalicelib.training import submit  # only this function needs it at start

    for record in event:
        body = json.loads(record.body)
        with deadline.running(deadline.budget_from_context(event.context, cap=900.0)):
            submit.prepare(body["team_id"], body["job_id"])


# Eval runs (issue #17): each message names a run (or a deleted eval's or run's purge). A run is
# leased, resumable (stored items are skipped) and continued by a fresh message when time runs
# short; a raise leaves the message queued. At most 5 runs at once (4 items each in flight).
@app.on_sqs_message(queue=evals_queue(), batch_size=1, name="eval_worker", maximum_concurrency=5)
def eval_worker(event):
    from chalicelib.evaluation import worker as runs  # only this function needs it at start

    for record in event:
        with deadline.running(deadline.budget_from_context(event.context, cap=900.0)):
            runs.handle_message(json.loads(record.body))


# Bedrock's reward Lambda for declarative graders: a bare list of samples in, scores out.
@app.lambda_function(name="hosted_grader")
def hosted_grader_handler(event, context):
    return hosted_grader.handle(event, context)


# rft-hub's own events (via a rule on its bus) -> one Block Kit message each. A raise leaves the
# message queued (Retry-After / backoff); the queue's redrive policy dead-letters what keeps failing.
@app.on_sqs_message(queue=slack_service.notify_queue(), batch_size=1, name="slack_notifier")
def slack_notifier(event):
    for record in event:
        slack_service.deliver(record.body, record.receipt_handle)


# CloudWatch alarms -> the OperatorAlarms topic -> here (its subscription is in deploy/operating.py, so
# it follows the topic) -> the platform's own Slack channel, once per state change, in order.
@app.lambda_function(name="alarm_notifier")
def alarm_notifier(event, context):
    return slack_service.post_alarms(event)


# Slash commands too slow for Slack's 3 seconds, finished through response_url.
@app.on_sqs_message(queue=slack_service.commands_queue(), batch_size=1, name="slack_commands")
def slack_commands(event):
    for record in event:
        slash_commands.finish_command(record.body)


# Pipelines (issue #27): each step of a run, sent by its Step Functions execution with a task token.
# A raise (a busy store or service) leaves the message queued; the step is idempotent.
@app.on_sqs_message(queue=pipeline_steps_queue(), batch_size=1, name="pipeline_worker")
def pipeline_worker(event):
    from chalicelib.pipelines import steps  # only this function needs it at start

    for record in event:
        with deadline.running(deadline.budget_from_context(event.context, cap=900.0)):
            steps.handle(json.loads(record.body))


# Schedules (EventBridge Scheduler), new data under a pipeline's prefix (S3's EventBridge
# notifications) and `rft-hub.pipeline.trigger` events, all through one queue.
@app.on_sqs_message(queue=pipeline_triggers_queue(), batch_size=1, name="pipeline_triggers")
def pipeline_triggers(event):
    from chalicelib.pipelines import triggers

    for record in event:
        triggers.handle(record.body, record.to_dict().get("messageId"))


# Runs whose execution ended unseen, or whose job or eval runs ended without their event.
@app.schedule(Rate(5, unit=Rate.MINUTES), name="reconcile_pipelines")
def reconcile_pipelines(event):
    from chalicelib.pipelines import repair

    return repair.reconcile()
