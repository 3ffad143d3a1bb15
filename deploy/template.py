"""Generates what `chalice package` cannot: the resources merged into its SAM template and
one least-privilege IAM policy per function. Tables come from the PynamoDB models, so the
template cannot drift from the code.

    python -m deploy.template STAGE      # writes .chalice/policy-STAGE-*.json and build/resources-STAGE.json
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = "rft-hub"
FUNCTIONS = ("api_handler", "on_bedrock_job_event", "reconcile_jobs", "hosted_grader", "slack_notifier",
             "slack_commands")
# Team grader Lambdas rft-hub may invoke for dry runs and preflight: only functions named like
# this (an explicit allowlist, not every function in the account).
TEAM_GRADER_PATTERN = "arn:aws:lambda:*:*:function:rft-grader-*"
# Mantle action names: only CallWithBearerToken, CreateInference and CancelFineTuningJob are
# documented; the rest follow the API names and are UNCONFIRMED (README: attach
# AmazonBedrockMantleFullAccess instead if AWS names them differently).
MANTLE_READ = ["bedrock-mantle:CallWithBearerToken", "bedrock-mantle:GetFineTuningJob",
               "bedrock-mantle:ListFineTuningJobs", "bedrock-mantle:ListFineTuningJobEvents",
               "bedrock-mantle:ListFineTuningJobCheckpoints", "bedrock-mantle:ListModels", "bedrock-mantle:GetModel"]
MANTLE_WRITE = ["bedrock-mantle:CreateFineTuningJob", "bedrock-mantle:CancelFineTuningJob",
                "bedrock-mantle:CreateFile", "bedrock-mantle:GetFile", "bedrock-mantle:ListFiles"]
MANTLE_INFER = ["bedrock-mantle:CreateInference"]


def _models():
    os.environ.setdefault("RFT_STAGE", "prod")
    sys.path.insert(0, str(ROOT))
    from chalicelib.store import models
    return models.ALL_MODELS


def _attr_type(attr) -> str:
    from pynamodb.attributes import NumberAttribute
    return "N" if isinstance(attr, NumberAttribute) else "S"


def table_resources(stage: str) -> dict:
    """One AWS::DynamoDB::Table per PynamoDB model: on-demand, PITR, SSE, TTL, GSIs."""
    from pynamodb.attributes import TTLAttribute
    from pynamodb.indexes import GlobalSecondaryIndex

    out = {}
    for model in _models():
        attrs = model.get_attributes()
        hash_key = next(n for n, a in attrs.items() if a.is_hash_key)
        range_key = next((n for n, a in attrs.items() if a.is_range_key), None)
        defs = {hash_key: _attr_type(attrs[hash_key])}
        schema = [{"AttributeName": hash_key, "KeyType": "HASH"}]
        if range_key:
            defs[range_key] = _attr_type(attrs[range_key])
            schema.append({"AttributeName": range_key, "KeyType": "RANGE"})
        gsis = []
        for index in (v for v in vars(model).values() if isinstance(v, GlobalSecondaryIndex)):
            ikeys = []
            for name, attr in index.Meta.attributes.items():
                defs[name] = _attr_type(attr)
                ikeys.append({"AttributeName": name, "KeyType": "HASH" if attr.is_hash_key else "RANGE"})
            ikeys.sort(key=lambda k: k["KeyType"] != "HASH")
            projection = type(index.Meta.projection).__name__.replace("Projection", "").upper()
            gsis.append({"IndexName": index.Meta.index_name, "KeySchema": ikeys,
                         "Projection": {"ProjectionType": {"KEYSONLY": "KEYS_ONLY"}.get(projection, projection)}})
        props = {"TableName": f"rfthub-{stage}-{short_name(model)}", "BillingMode": "PAY_PER_REQUEST",
                 "AttributeDefinitions": [{"AttributeName": k, "AttributeType": t} for k, t in sorted(defs.items())],
                 "KeySchema": schema, "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
                 "SSESpecification": {"SSEEnabled": True}, "DeletionProtectionEnabled": stage == "prod"}
        if gsis:
            props["GlobalSecondaryIndexes"] = gsis
        ttl = next((n for n, a in attrs.items() if isinstance(a, TTLAttribute)), None)
        if ttl:
            props["TimeToLiveSpecification"] = {"AttributeName": ttl, "Enabled": True}
        out[f"Table{model.__name__}"] = {"Type": "AWS::DynamoDB::Table", "DeletionPolicy": "Retain",
                                         "UpdateReplacePolicy": "Retain", "Properties": props}
    return out


def short_name(model) -> str:
    prefix = os.environ.get("RFT_TABLE_PREFIX", f"rfthub-{os.environ.get('RFT_STAGE', 'prod')}-")
    return model.Meta.table_name[len(prefix):]


def queue(name: str, visibility: int, dlq_ref: str | None = None) -> dict:
    props = {"QueueName": name, "VisibilityTimeout": visibility, "SqsManagedSseEnabled": True,
             "MessageRetentionPeriod": 1209600}
    if dlq_ref:
        props["RedrivePolicy"] = {"deadLetterTargetArn": {"Fn::GetAtt": [dlq_ref, "Arn"]}, "maxReceiveCount": 5}
    return {"Type": "AWS::SQS::Queue", "Properties": props}


def resources(stage: str) -> dict:
    bus = f"rfthub-{stage}"
    res = table_resources(stage)
    res.update({
        "DatasetsBucket": {"Type": "AWS::S3::Bucket", "DeletionPolicy": "Retain", "UpdateReplacePolicy": "Retain",
                           "Properties": {
            "BucketName": {"Fn::Sub": f"rfthub-{stage}-datasets-${{AWS::AccountId}}"},
            "BucketEncryption": {"ServerSideEncryptionConfiguration": [
                {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms"}, "BucketKeyEnabled": True}]},
            "PublicAccessBlockConfiguration": {"BlockPublicAcls": True, "BlockPublicPolicy": True,
                                               "IgnorePublicAcls": True, "RestrictPublicBuckets": True},
            "OwnershipControls": {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]},
            "VersioningConfiguration": {"Status": "Enabled"},
            "LifecycleConfiguration": {"Rules": [
                {"Id": "abandoned-multipart", "Status": "Enabled",
                 "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
                {"Id": "abandoned-upload-parts", "Status": "Enabled", "Prefix": "uploads/", "ExpirationInDays": 2},
                {"Id": "old-versions", "Status": "Enabled", "NoncurrentVersionExpiration": {"NoncurrentDays": 30}}]}}},
        "EventBus": {"Type": "AWS::Events::EventBus", "Properties": {"Name": bus}},
        "SlackDeadLetterQueue": queue(f"rfthub-{stage}-slack-dlq", 60),
        "SlackNotifyQueue": queue(f"rfthub-{stage}-slack-notify", 120, "SlackDeadLetterQueue"),
        "SlackCommandsDeadLetterQueue": queue(f"rfthub-{stage}-slack-commands-dlq", 60),
        "SlackCommandsQueue": queue(f"rfthub-{stage}-slack-commands", 120, "SlackCommandsDeadLetterQueue"),
        "SlackNotifyRule": {"Type": "AWS::Events::Rule", "Properties": {
            "EventBusName": {"Ref": "EventBus"}, "State": "ENABLED",
            "EventPattern": {"source": ["rft-hub"]},
            "Targets": [{"Id": "slack", "Arn": {"Fn::GetAtt": ["SlackNotifyQueue", "Arn"]}}]}},
        "SlackNotifyQueuePolicy": {"Type": "AWS::SQS::QueuePolicy", "Properties": {
            "Queues": [{"Ref": "SlackNotifyQueue"}],
            "PolicyDocument": {"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Principal": {"Service": "events.amazonaws.com"}, "Action": "sqs:SendMessage",
                "Resource": {"Fn::GetAtt": ["SlackNotifyQueue", "Arn"]},
                "Condition": {"ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": ["SlackNotifyRule", "Arn"]}}}}]}}},
        "AdminKeySecret": {"Type": "AWS::SecretsManager::Secret", "Properties": {
            "Name": f"rfthub/{stage}/admin-key", "Description": "rft-hub admin API key",
            "GenerateSecretString": {"PasswordLength": 48, "ExcludePunctuation": True}}},
        "SlackSigningSecret": {"Type": "AWS::SecretsManager::Secret", "Properties": {
            "Name": f"rfthub/{stage}/slack-signing-secret",
            "Description": "Slack app signing secret: put the real value after deploying",
            "GenerateSecretString": {"PasswordLength": 32, "ExcludePunctuation": True}}},
    })
    # Functions: the hosted grader's ARN and the datasets bucket name reach the API at run time.
    env = {"RFT_HOSTED_GRADER_ARN": {"Fn::GetAtt": ["HostedGrader", "Arn"]},
           "RFT_DATASETS_BUCKET": {"Ref": "DatasetsBucket"}}
    for logical in ("APIHandler", "ReconcileJobs"):
        res[logical] = {"Properties": {"Environment": {"Variables": env}}}
    res["HostedGrader"] = {"Properties": {"Environment": {"Variables": {"RFT_DATASETS_BUCKET": {"Ref": "DatasetsBucket"}}}}}
    return res


def _statement(actions: list[str], resources: list[str], sid: str) -> dict:
    return {"Sid": sid, "Effect": "Allow", "Action": sorted(set(actions)), "Resource": resources}


def policies(stage: str) -> dict[str, dict]:
    table = f"arn:aws:dynamodb:*:*:table/rfthub-{stage}-*"
    ddb_rw = _statement(["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem",
                         "dynamodb:Query", "dynamodb:Scan", "dynamodb:BatchWriteItem", "dynamodb:BatchGetItem",
                         "dynamodb:ConditionCheckItem", "dynamodb:DescribeTable"],
                        [table, f"{table}/index/*"], "Tables")
    logs = _statement(["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
                      [f"arn:aws:logs:*:*:log-group:/aws/lambda/{APP}-{stage}-*"], "Logs")
    token = _statement(["bedrock:CallWithBearerToken"], ["*"], "BedrockToken")
    bus = _statement(["events:PutEvents"], [f"arn:aws:events:*:*:event-bus/rfthub-{stage}"], "OwnBus")
    bucket = f"arn:aws:s3:::rfthub-{stage}-datasets-*"
    secrets = f"arn:aws:secretsmanager:*:*:secret:rfthub/{stage}/*"
    grader = f"arn:aws:lambda:*:*:function:{APP}-{stage}-hosted_grader"

    def sqs(names: list[str], actions: list[str], sid: str) -> dict:
        return _statement(actions, [f"arn:aws:sqs:*:*:rfthub-{stage}-{n}" for n in names], sid)

    consume = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes", "sqs:ChangeMessageVisibility",
               "sqs:GetQueueUrl"]
    return {
        "api_handler": [ddb_rw, logs, token, bus,
                        _statement(MANTLE_READ + MANTLE_WRITE + MANTLE_INFER, ["*"], "BedrockMantle"),
                        _statement(["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                                   [f"{bucket}/files/*", f"{bucket}/uploads/*"], "Datasets"),
                        _statement(["s3:ListBucket"], [bucket], "DatasetsList"),
                        _statement(["secretsmanager:GetSecretValue"], [secrets], "Secrets"),
                        _statement(["secretsmanager:CreateSecret", "secretsmanager:PutSecretValue"],
                                   [f"arn:aws:secretsmanager:*:*:secret:rfthub/{stage}/slack-webhook/*"], "Webhooks"),
                        _statement(["lambda:InvokeFunction"], [grader, TEAM_GRADER_PATTERN], "Graders"),
                        sqs(["slack-commands"], ["sqs:SendMessage", "sqs:GetQueueUrl"], "SlackCommands")],
        "on_bedrock_job_event": [ddb_rw, logs, token, bus, _statement(MANTLE_READ, ["*"], "BedrockMantle")],
        "reconcile_jobs": [ddb_rw, logs, token, bus, _statement(MANTLE_READ + MANTLE_WRITE, ["*"], "BedrockMantle"),
                           _statement(["s3:GetObject"], [f"{bucket}/files/*"], "Datasets")],
        "hosted_grader": [_statement(["dynamodb:GetItem"], [f"arn:aws:dynamodb:*:*:table/rfthub-{stage}-grader_specs"],
                                     "GraderSpecs"), logs, token,
                          _statement(["bedrock-mantle:CallWithBearerToken"] + MANTLE_INFER, ["*"], "Judge")],
        "slack_notifier": [ddb_rw, logs, _statement(["secretsmanager:GetSecretValue"], [secrets], "Secrets"),
                           sqs(["slack-notify"], consume, "NotifyQueue"),
                           sqs(["slack-dlq"], ["sqs:SendMessage", "sqs:GetQueueUrl"], "DeadLetters")],
        "slack_commands": [ddb_rw, logs, token, bus, _statement(MANTLE_READ + MANTLE_WRITE, ["*"], "BedrockMantle"),
                           sqs(["slack-commands"], consume, "CommandsQueue")],
    }


def write(stage: str) -> None:
    chalice_dir = ROOT / ".chalice"
    for function, statements in policies(stage).items():
        doc = {"Version": "2012-10-17", "Statement": statements}
        (chalice_dir / f"policy-{stage}-{function}.json").write_text(json.dumps(doc, indent=2) + "\n")
    build = ROOT / "build"
    build.mkdir(exist_ok=True)
    (build / f"resources-{stage}.json").write_text(json.dumps({"Resources": resources(stage)}, indent=2) + "\n")


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else "dev")
