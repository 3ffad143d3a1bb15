"""The template's part for pipelines (issue #27): the state machine every run executes (the
repository's deploy/pipeline.asl.json, its step queue substituted), its role (send to that one
queue, nothing else), the step and trigger queues, the schedules' group and the role Scheduler
assumes (send to the trigger queue only), the rules that bring new data (S3's EventBridge
notifications, switched on on the datasets bucket) and `rft-hub.pipeline.trigger` events, and what
each function may do with them."""
from __future__ import annotations

import json
from pathlib import Path

ASL = Path(__file__).resolve().parent / "pipeline.asl.json"
TRIGGER_DETAIL_TYPE = "rft-hub.pipeline.trigger"     # chalicelib/pipelines/triggers.py


def _queue(name: str, visibility: int, dlq: str) -> dict:
    return {"Type": "AWS::SQS::Queue", "Properties": {
        "QueueName": name, "VisibilityTimeout": visibility, "SqsManagedSseEnabled": True,
        "RedrivePolicy": {"deadLetterTargetArn": {"Fn::GetAtt": [dlq, "Arn"]}, "maxReceiveCount": 5}}}


def _named(role: dict, name: str) -> dict:
    role["Properties"]["RoleName"] = name
    return role


def _role(service: str, statements: list[dict], source_account: bool = True) -> dict:
    trust = {"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}
    if source_account:      # the confused-deputy guard AWS recommends for service roles
        trust["Condition"] = {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}
    return {"Type": "AWS::IAM::Role", "Properties": {
        "AssumeRolePolicyDocument": {"Version": "2012-10-17", "Statement": [trust]},
        "Policies": [{"PolicyName": "least-privilege", "PolicyDocument": {"Version": "2012-10-17",
                                                                          "Statement": statements}}]}}


def scheduler_role(stage: str) -> str:
    return f"rfthub-{stage}-pipeline-scheduler"     # named: the API passes it to Scheduler (iam:PassRole)


def resources(stage: str) -> dict:
    send_steps = {"Effect": "Allow", "Action": "sqs:SendMessage", "Resource": {"Fn::GetAtt": ["PipelineStepsQueue", "Arn"]}}
    send_triggers = {"Effect": "Allow", "Action": "sqs:SendMessage",
                     "Resource": {"Fn::GetAtt": ["PipelineTriggersQueue", "Arn"]}}
    return {
        "PipelineStepsDeadLetterQueue": {"Type": "AWS::SQS::Queue", "Properties": {
            "QueueName": f"rfthub-{stage}-pipeline-steps-dlq", "SqsManagedSseEnabled": True,
            "MessageRetentionPeriod": 1209600}},
        # Visibility above the worker's 900 s timeout: a step is redelivered only after an attempt has ended.
        "PipelineStepsQueue": _queue(f"rfthub-{stage}-pipeline-steps", 960, "PipelineStepsDeadLetterQueue"),
        "PipelineTriggersDeadLetterQueue": {"Type": "AWS::SQS::Queue", "Properties": {
            "QueueName": f"rfthub-{stage}-pipeline-triggers-dlq", "SqsManagedSseEnabled": True,
            "MessageRetentionPeriod": 1209600}},
        "PipelineTriggersQueue": _queue(f"rfthub-{stage}-pipeline-triggers", 120, "PipelineTriggersDeadLetterQueue"),
        "PipelineStateMachineRole": _role("states.amazonaws.com", [send_steps]),
        "PipelineStateMachine": {"Type": "AWS::StepFunctions::StateMachine", "Properties": {
            "StateMachineName": f"rfthub-{stage}-pipeline", "StateMachineType": "STANDARD",
            "Definition": json.loads(ASL.read_text()),
            "DefinitionSubstitutions": {"PipelineStepsQueueUrl": {"Ref": "PipelineStepsQueue"}},
            "RoleArn": {"Fn::GetAtt": ["PipelineStateMachineRole", "Arn"]},
            "TracingConfiguration": {"Enabled": True}}},
        "PipelineScheduleGroup": {"Type": "AWS::Scheduler::ScheduleGroup",
                                  "Properties": {"Name": f"rfthub-{stage}-pipelines"}},
        "PipelineSchedulerRole": _named(_role("scheduler.amazonaws.com", [send_triggers]), scheduler_role(stage)),
        "PipelineTriggerRule": {"Type": "AWS::Events::Rule", "Properties": {
            "EventBusName": {"Ref": "EventBus"}, "State": "ENABLED",
            "EventPattern": {"detail-type": [TRIGGER_DETAIL_TYPE]},
            "Targets": [{"Id": "triggers", "Arn": {"Fn::GetAtt": ["PipelineTriggersQueue", "Arn"]}}]}},
        "PipelineNewDataRule": {"Type": "AWS::Events::Rule", "Properties": {
            "State": "ENABLED",
            "EventPattern": {"source": ["aws.s3"], "detail-type": ["Object Created"],
                             "detail": {"bucket": {"name": [{"Ref": "DatasetsBucket"}]},
                                        "object": {"key": [{"prefix": "incoming/"}]}}},
            "Targets": [{"Id": "triggers", "Arn": {"Fn::GetAtt": ["PipelineTriggersQueue", "Arn"]}}]}},
        "PipelineTriggersQueuePolicy": {"Type": "AWS::SQS::QueuePolicy", "Properties": {
            "Queues": [{"Ref": "PipelineTriggersQueue"}],
            "PolicyDocument": {"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Principal": {"Service": "events.amazonaws.com"}, "Action": "sqs:SendMessage",
                "Resource": {"Fn::GetAtt": ["PipelineTriggersQueue", "Arn"]},
                "Condition": {"ArnEquals": {"aws:SourceArn": [{"Fn::GetAtt": ["PipelineTriggerRule", "Arn"]},
                                                              {"Fn::GetAtt": ["PipelineNewDataRule", "Arn"]}]}}}]}}},
    }


def environment() -> dict:
    return {"RFT_PIPELINE_STATE_MACHINE_ARN": {"Ref": "PipelineStateMachine"},
            "RFT_PIPELINE_SCHEDULER_ROLE_ARN": {"Fn::GetAtt": ["PipelineSchedulerRole", "Arn"]}}


# The functions that touch pipelines, by Chalice logical id (their environment names the state machine).
FUNCTIONS = ("APIHandler", "PipelineWorker", "PipelineTriggers", "ReconcilePipelines")


def statements(stage: str, statement) -> dict[str, list[dict]]:
    """What each function may do with pipelines (`statement(actions, resources, sid)` makes one)."""
    machine = f"arn:aws:states:*:*:stateMachine:rfthub-{stage}-pipeline"
    execution = f"arn:aws:states:*:*:execution:rfthub-{stage}-pipeline:*"
    start = statement(["states:StartExecution"], [machine], "PipelineStart")
    describe = statement(["states:DescribeExecution"], [execution], "PipelineExecutions")
    # Task tokens name no resource: Step Functions' SendTask* actions take none (resource "*").
    answer = statement(["states:SendTaskSuccess", "states:SendTaskFailure", "states:SendTaskHeartbeat"], ["*"],
                       "PipelineTaskTokens")
    schedules = statement(["scheduler:CreateSchedule", "scheduler:UpdateSchedule", "scheduler:DeleteSchedule",
                           "scheduler:GetSchedule"],
                          [f"arn:aws:scheduler:*:*:schedule/rfthub-{stage}-pipelines/*"], "PipelineSchedules")
    pass_role = {**statement(["iam:PassRole"], [f"arn:aws:iam::*:role/{scheduler_role(stage)}"], "PipelineSchedulerRole"),
                 "Condition": {"StringEquals": {"iam:PassedToService": "scheduler.amazonaws.com"}}}
    bucket = f"arn:aws:s3:::rfthub-{stage}-datasets-*"
    incoming_put = statement(["s3:PutObject"], [f"{bucket}/incoming/*"], "PipelineUploads")
    incoming_get = statement(["s3:GetObject"], [f"{bucket}/incoming/*"], "PipelineData")
    listing = statement(["s3:ListBucket"], [bucket], "PipelineDataList")
    queue = f"arn:aws:sqs:*:*:rfthub-{stage}-pipeline-"
    triggers_attrs = statement(["sqs:GetQueueAttributes", "sqs:GetQueueUrl"], [f"{queue}triggers"], "PipelineTriggersQueue")
    return {
        # the spec API (schedules, presigned uploads), manual runs, decisions, /rft pipeline, Slack's buttons
        "api_handler": [start, answer, schedules, pass_role, incoming_put, triggers_attrs],
        # the steps: data, preflight, the job, the evals, the gate, the approval, the alias move
        "pipeline_worker": [start, answer, incoming_get, listing],
        "pipeline_triggers": [start],
        "reconcile_pipelines": [start, describe, answer],
    }
