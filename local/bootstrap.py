"""Creates what the deployed template declares, on the local servers. Idempotent."""
from __future__ import annotations

import json

import boto3

from chalicelib.config import settings
from chalicelib.store.models import create_tables


def bootstrap(admin_key: str, slack_signing_secret: str) -> None:
    s = settings()
    create_tables()
    s3 = boto3.client("s3", region_name=s.region)
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if s.datasets_bucket not in existing:
        s3.create_bucket(Bucket=s.datasets_bucket, CreateBucketConfiguration={"LocationConstraint": s.region})
    _event_bus()
    _slack_queues()
    _ledger_queue()
    _pipelines(s.datasets_bucket)
    from chalicelib.slack import commands as slash_commands
    _secret(s.admin_key_secret_id, admin_key)
    _secret(slash_commands.settings_secret_id(), slack_signing_secret)
    _console_sessions()
    from local import cloudwatch
    cloudwatch.create_alarms(s.stage)      # the template's alarms and their topic


def ops_channel(webhook_url: str) -> None:
    """The platform's own Slack channel (alarms): its webhook URL in the secret the notifier reads."""
    from chalicelib.slack import notifications

    _secret(notifications.ops_webhook_secret_id(), webhook_url)


def _console_sessions() -> None:
    """The console's session-signing secret (a new random one unless it exists: moto keeps nothing,
    so a restarted `make run` signs everyone out), as the template declares it."""
    import secrets

    from chalicelib.platform import console_sessions

    sm = boto3.client("secretsmanager", region_name=settings().region)
    try:
        sm.describe_secret(SecretId=console_sessions.secret_id())
    except sm.exceptions.ResourceNotFoundException:
        _secret(console_sessions.secret_id(), secrets.token_urlsafe(48))


def _secret(name: str, value: str) -> None:
    sm = boto3.client("secretsmanager", region_name=settings().region)
    try:
        sm.put_secret_value(SecretId=name, SecretString=value)
    except sm.exceptions.ResourceNotFoundException:
        sm.create_secret(Name=name, SecretString=value)


def _slack_queues() -> None:
    """As the template declares them: notifications from the bus with a dead-letter queue, and commands."""
    from chalicelib.outbox import SOURCE, bus_name
    from chalicelib.slack import notifications as slack

    sqs = boto3.client("sqs", region_name=settings().region)
    events = boto3.client("events", region_name=settings().region)

    def arn(url: str) -> str:
        return sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]

    dlq = arn(sqs.create_queue(QueueName=slack.dead_letter_queue())["QueueUrl"])
    notify = sqs.create_queue(QueueName=slack.notify_queue(), Attributes={
        "VisibilityTimeout": "60", "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq, "maxReceiveCount": "5"})})
    sqs.create_queue(QueueName=slack.commands_queue(), Attributes={"VisibilityTimeout": "60"})
    events.put_rule(Name="rfthub-slack-notify", EventBusName=bus_name(), State="ENABLED",
                    EventPattern=json.dumps({"source": [SOURCE]}))
    events.put_targets(Rule="rfthub-slack-notify", EventBusName=bus_name(),
                       Targets=[{"Id": "slack", "Arn": arn(notify["QueueUrl"])}])


def _ledger_queue() -> None:
    """Where a served call's ledger entry waits when DynamoDB refuses it (the reconciler drains it),
    and the job worker's and the eval worker's queues."""
    from chalicelib.config import evals_queue, jobs_queue
    from chalicelib.spend import ledger

    sqs = boto3.client("sqs", region_name=settings().region)
    sqs.create_queue(QueueName=ledger.ledger_dlq(), Attributes={"MessageRetentionPeriod": "1209600"})
    # Entries that can never be written (the drain parks them; the template alarms on its depth).
    sqs.create_queue(QueueName=ledger.ledger_parked_queue(), Attributes={
        "FifoQueue": "true", "MessageRetentionPeriod": "1209600"})
    sqs.create_queue(QueueName=jobs_queue(), Attributes={"VisibilityTimeout": "960"})
    sqs.create_queue(QueueName=evals_queue(), Attributes={"VisibilityTimeout": "960"})   # the eval worker's


def _event_bus() -> None:
    """rft-hub's bus, plus queues subscribed to all of it so outbound events can be watched."""
    from chalicelib.outbox import SOURCE, bus_name
    from chalicelib.platform.audit import DETAIL_TYPE as AUDIT

    events = boto3.client("events", region_name=settings().region)
    sqs = boto3.client("sqs", region_name=settings().region)
    if bus_name() not in {b["Name"] for b in events.list_event_buses()["EventBuses"]}:
        events.create_event_bus(Name=bus_name())
    # Two taps: the audit log's entries (one per team, key, sign-in ...: many) on a queue of their own,
    # so a watcher of the other events never reads past them.
    for tap, pattern in (("outbound-tap", {"source": [SOURCE], "detail-type": [{"anything-but": [AUDIT]}]}),
                         ("audit-tap", {"source": [SOURCE], "detail-type": [AUDIT]})):
        url = sqs.create_queue(QueueName=f"{bus_name()}-{tap}")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        events.put_rule(Name=f"rfthub-{tap}", EventBusName=bus_name(), EventPattern=json.dumps(pattern),
                        State="ENABLED")
        events.put_targets(Rule=f"rfthub-{tap}", EventBusName=bus_name(), Targets=[{"Id": "tap", "Arn": arn}])


ASL = "deploy/pipeline.asl.json"


def _pipelines(bucket: str) -> None:
    """As the template declares them: the step and trigger queues, the state machine every run
    executes (the repository's definition, its queue substituted as the template does), the
    schedules' group, the rules that bring new data and trigger events, and S3's EventBridge
    notifications on the datasets bucket. moto runs the definition (its Step Functions
    interpreter, switched on through moto's config API)."""
    import os
    import urllib.request

    from chalicelib.config import (
        pipeline_schedule_group,
        pipeline_state_machine_arn,
        pipeline_steps_queue,
        pipeline_triggers_queue,
    )
    from chalicelib.outbox import bus_name
    from chalicelib.pipelines.triggers import TRIGGER_DETAIL_TYPE
    from local.servers import ROOT

    region = settings().region
    moto = os.environ["AWS_ENDPOINT_URL_SQS"]
    urllib.request.urlopen(urllib.request.Request(
        f"{moto}/moto-api/config", data=json.dumps({"stepfunctions": {"execute_state_machine": True}}).encode(),
        method="POST"), timeout=10).read()
    sqs = boto3.client("sqs", region_name=region)
    steps = sqs.create_queue(QueueName=pipeline_steps_queue(), Attributes={"VisibilityTimeout": "960"})["QueueUrl"]
    triggers = sqs.create_queue(QueueName=pipeline_triggers_queue(), Attributes={"VisibilityTimeout": "120"})["QueueUrl"]
    triggers_arn = sqs.get_queue_attributes(QueueUrl=triggers, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    definition = (ROOT / ASL).read_text().replace("${PipelineStepsQueueUrl}", steps)
    sfn = boto3.client("stepfunctions", region_name=region)
    arn = pipeline_state_machine_arn()
    try:
        sfn.describe_state_machine(stateMachineArn=arn)
        sfn.update_state_machine(stateMachineArn=arn, definition=definition)
    except sfn.exceptions.StateMachineDoesNotExist:
        sfn.create_state_machine(name=arn.rsplit(":", 1)[1], definition=definition, type="STANDARD",
                                 roleArn=f"arn:aws:iam::{arn.split(':')[4]}:role/rfthub-local-pipeline-states")
    scheduler = boto3.client("scheduler", region_name=region)
    try:
        scheduler.create_schedule_group(Name=pipeline_schedule_group())
    except scheduler.exceptions.ConflictException:
        pass
    events = boto3.client("events", region_name=region)
    for name, bus, pattern in (
            ("rfthub-pipeline-trigger", bus_name(), {"detail-type": [TRIGGER_DETAIL_TYPE]}),
            ("rfthub-pipeline-new-data", "default", {"source": ["aws.s3"], "detail-type": ["Object Created"],
                                                     "detail": {"bucket": {"name": [bucket]},
                                                                "object": {"key": [{"prefix": "incoming/"}]}}})):
        events.put_rule(Name=name, EventBusName=bus, EventPattern=json.dumps(pattern), State="ENABLED")
        events.put_targets(Rule=name, EventBusName=bus, Targets=[{"Id": "triggers", "Arn": triggers_arn}])
    boto3.client("s3", region_name=region).put_bucket_notification_configuration(
        Bucket=bucket, NotificationConfiguration={"EventBridgeConfiguration": {}})
