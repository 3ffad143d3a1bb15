"""Generates what `chalice package` cannot: the resources merged into its SAM template and
one least-privilege IAM policy per function. Tables come from the PynamoDB models, so the
template cannot drift from the code.

    python -m deploy.template STAGE      # writes .chalice/policy-STAGE-*.json and build/resources-STAGE.json
    python -m deploy.template --slim build/STAGE/deployment.zip     # after `chalice package` (make package)

Also API Gateway's own answers (gateway responses) in the OpenAI envelope, and the slimming of the
deployment package (botocore's models for the services rft-hub calls only).
"""
from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

from deploy import operating, pipelines

ROOT = Path(__file__).resolve().parent.parent
APP = "rft-hub"
FUNCTIONS = ("api_handler", "on_bedrock_job_event", "reconcile_jobs", "hosted_grader", "slack_notifier",
             "slack_commands", "job_worker", "eval_worker", "alarm_notifier")
# Team grader Lambdas rft-hub may invoke for dry runs and preflight: only functions named like
# this (an explicit allowlist, not every function in the account).
TEAM_GRADER_PATTERN = "arn:aws:lambda:*:*:function:rft-grader-*"
# Mantle action names: only CallWithBearerToken, CreateInference and CancelFineTuningJob are
# documented; the rest follow the API names and are UNCONFIRMED (docs/deploying.md: attach
# AmazonBedrockMantleFullAccess instead if AWS names them differently).
MANTLE_READ = ["bedrock-mantle:CallWithBearerToken", "bedrock-mantle:GetFineTuningJob",
               "bedrock-mantle:ListFineTuningJobs", "bedrock-mantle:ListFineTuningJobEvents",
               "bedrock-mantle:ListFineTuningJobCheckpoints", "bedrock-mantle:ListModels", "bedrock-mantle:GetModel"]
MANTLE_WRITE = ["bedrock-mantle:CreateFineTuningJob", "bedrock-mantle:CancelFineTuningJob",
                "bedrock-mantle:CreateFile", "bedrock-mantle:GetFile", "bedrock-mantle:ListFiles"]
MANTLE_INFER = ["bedrock-mantle:CreateInference"]
# A team's own project (RFT_MANTLE_PROJECTS): found by its tag or made, by the functions that
# create teams, submit jobs and reconcile (the others only read the team's recorded project).
MANTLE_PROJECTS = ["bedrock-mantle:ListProjects", "bedrock-mantle:CreateProject"]


def _models():
    os.environ.setdefault("RFT_STAGE", "prod")
    sys.path.insert(0, str(ROOT))
    from chalicelib.store import models
    return models.ALL_MODELS


def _attr_type(attr) -> str:
    from pynamodb.attributes import NumberAttribute
    return "N" if isinstance(attr, NumberAttribute) else "S"


def table_resources(stage: str, models=None) -> dict:
    """One AWS::DynamoDB::Table per PynamoDB model (ALL_MODELS unless `models`): on-demand, PITR, SSE,
    TTL, GSIs."""
    from pynamodb.attributes import TTLAttribute
    from pynamodb.indexes import GlobalSecondaryIndex

    out = {}
    for model in _models() if models is None else models:
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


# ---- API Gateway's own answers -------------------------------------------------------------------
# By default API Gateway answers what never reaches the Lambda with {"message": ...}: for an
# unknown route or method a 403 "Missing Authentication Token", or, when the request carries an
# Authorization header, "Authorization header requires 'Credential' parameter ...
# Authorization=<the header>" -- the caller's key, reflected back ($context.error.message).
# Every type below answers in the OpenAI envelope instead, from static text: the templates use
# $context.httpMethod and $context.requestId only, never a header, a parameter, the path, the
# authorizer or $context.error.message. API Gateway cannot tell an unknown path from a method
# the path lacks (both are MISSING_AUTHENTICATION_TOKEN), so deployed both are a 404; locally
# (local/api_gateway.py) the second is a 405 with an Allow header.
GATEWAY_ALLOWED_VARIABLES = ("$context.httpMethod", "$context.requestId")
_UNKNOWN_URL = ("Unknown request URL: no $context.httpMethod route at this path (the path is not repeated). "
                "Please check the URL and method for typos, or see GET /openapi.json for rft-hub's routes.")
_TOO_LARGE = ("Request too large: API Gateway takes a body of at most 10 MB and the API Lambda an event of at "
              "most 6 MB (binary bodies are base64-encoded). Upload large datasets through /v1/uploads in "
              "parts of at most 4 MiB (docs/api.md, Limits).")
# type: (status or None to keep API Gateway's, OpenAI error type, code, message)
GATEWAY_RESPONSES = {
    "MISSING_AUTHENTICATION_TOKEN": ("404", "invalid_request_error", "unknown_url", _UNKNOWN_URL),
    "RESOURCE_NOT_FOUND": ("404", "invalid_request_error", "unknown_url", _UNKNOWN_URL),
    "UNAUTHORIZED": ("401", "invalid_request_error", "invalid_api_key",
                     "Missing or invalid API key. Send 'Authorization: Bearer <key>'."),
    "INVALID_API_KEY": ("401", "invalid_request_error", "invalid_api_key",
                        "Missing or invalid API key. Send 'Authorization: Bearer <key>'."),
    "ACCESS_DENIED": ("403", "invalid_request_error", "permission_denied", "Access denied by API Gateway."),
    # rft-hub has no AWS_IAM-authorized method, so API Gateway evaluates a signature (and finds a
    # bearer key "incomplete") only for a request that matched no method: an unknown URL too.
    "EXPIRED_TOKEN": ("404", "invalid_request_error", "unknown_url", _UNKNOWN_URL),
    "INVALID_SIGNATURE": ("404", "invalid_request_error", "unknown_url", _UNKNOWN_URL),
    "WAF_FILTERED": ("403", "invalid_request_error", "permission_denied", "The request was blocked by a firewall rule."),
    "REQUEST_TOO_LARGE": ("413", "invalid_request_error", "payload_too_large", _TOO_LARGE),
    "UNSUPPORTED_MEDIA_TYPE": ("415", "invalid_request_error", "unsupported_media_type", "Unsupported media type."),
    "THROTTLED": ("429", "rate_limit_error", "rate_limit_exceeded",
                  "Too many requests reached API Gateway; retry with backoff."),
    "QUOTA_EXCEEDED": ("429", "rate_limit_error", "rate_limit_exceeded",
                       "API Gateway's request quota is exhausted; retry later."),
    "BAD_REQUEST_BODY": ("400", "invalid_request_error", "invalid_request", "The request body is invalid."),
    "BAD_REQUEST_PARAMETERS": ("400", "invalid_request_error", "invalid_request", "The request parameters are invalid."),
    "INTEGRATION_TIMEOUT": ("504", "server_error", "timeout",
                            "rft-hub did not answer within API Gateway's 29 s (request id $context.requestId)."),
    "INTEGRATION_FAILURE": ("502", "server_error", "server_error",
                            "rft-hub could not be reached (request id $context.requestId)."),
    "DEFAULT_4XX": (None, "invalid_request_error", "invalid_request",
                    "API Gateway refused the request before it reached rft-hub (request id $context.requestId)."),
    "DEFAULT_5XX": (None, "server_error", "server_error",
                    "API Gateway failed to complete the request (request id $context.requestId)."),
}


def gateway_responses() -> dict:
    """`x-amazon-apigateway-gateway-responses` for the REST API's definition.

    In the definition body, not as AWS::ApiGateway::GatewayResponse resources: SAM imports the
    body in overwrite mode and deploys it by its hash, so separate resources would be dropped at
    the next deployment and never trigger one (aws/serverless-application-model #390, #623, #3482)."""
    out = {}
    for kind, (status, error_type, code, message) in GATEWAY_RESPONSES.items():
        body = json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}},
                          separators=(",", ":"))
        response = {"responseTemplates": {"application/json": body},
                    "responseParameters": {"gatewayresponse.header.x-should-retry":
                                           "'true'" if (status or "").startswith(("429", "5")) else "'false'"}}
        if status:
            response["statusCode"] = status
        out[kind] = response
    return out


def queue(name: str, visibility: int, dlq_ref: str | None = None) -> dict:
    props = {"QueueName": name, "VisibilityTimeout": visibility, "SqsManagedSseEnabled": True,
             "MessageRetentionPeriod": 1209600}
    if dlq_ref:
        props["RedrivePolicy"] = {"deadLetterTargetArn": {"Fn::GetAtt": [dlq_ref, "Arn"]}, "maxReceiveCount": 5}
    return {"Type": "AWS::SQS::Queue", "Properties": props}


def queue_alarm(queue_ref: str, metric: str, above: int, description: str) -> dict:
    return {"Type": "AWS::CloudWatch::Alarm", "Properties": {
        "AlarmDescription": description, "Namespace": "AWS/SQS", "MetricName": metric,
        "Dimensions": [{"Name": "QueueName", "Value": {"Fn::GetAtt": [queue_ref, "QueueName"]}}],
        "Statistic": "Maximum", "Period": 300, "EvaluationPeriods": 1, "Threshold": above,
        "ComparisonOperator": "GreaterThanThreshold", "TreatMissingData": "notBreaching",
        "AlarmActions": [{"Ref": "OperatorAlarms"}]}}


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
            # New data under a pipeline's prefix starts a run (deploy/pipelines.py's rule).
            "NotificationConfiguration": {"EventBridgeConfiguration": {"EventBridgeEnabled": True}},
            "LifecycleConfiguration": {"Rules": [
                {"Id": "abandoned-multipart", "Status": "Enabled",
                 "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
                {"Id": "abandoned-upload-parts", "Status": "Enabled", "Prefix": "uploads/", "ExpirationInDays": 2},
                # Sampled rollout texts live as long as their DynamoDB index entries (90 days).
                {"Id": "rollouts", "Status": "Enabled", "Prefix": "rollouts/", "ExpirationInDays": 90},
                {"Id": "old-versions", "Status": "Enabled", "NoncurrentVersionExpiration": {"NoncurrentDays": 30}}]}}},
        "EventBus": {"Type": "AWS::Events::EventBus", "Properties": {"Name": bus}},
        "SlackDeadLetterQueue": queue(f"rfthub-{stage}-slack-dlq", 60),
        "SlackNotifyQueue": queue(f"rfthub-{stage}-slack-notify", 120, "SlackDeadLetterQueue"),
        "SlackCommandsDeadLetterQueue": queue(f"rfthub-{stage}-slack-commands-dlq", 60),
        "SlackCommandsQueue": queue(f"rfthub-{stage}-slack-commands", 120, "SlackCommandsDeadLetterQueue"),
        # The job worker's queue: visibility above the worker's 900 s timeout, so a message is
        # redelivered only after an attempt has surely ended.
        "JobsDeadLetterQueue": queue(f"rfthub-{stage}-jobs-dlq", 60),
        "JobsQueue": queue(f"rfthub-{stage}-jobs", 960, "JobsDeadLetterQueue"),
        # The eval worker's queue (runs, and purges of deleted evals and runs): as the job worker's.
        "EvalsDeadLetterQueue": queue(f"rfthub-{stage}-evals-dlq", 60),
        "EvalsQueue": queue(f"rfthub-{stage}-evals", 960, "EvalsDeadLetterQueue"),
        # Ledger entries DynamoDB refused after the call was served; the reconciler drains it.
        "LedgerDeadLetterQueue": {**queue(f"rfthub-{stage}-ledger-dlq", 60),
                                  "DeletionPolicy": "Retain", "UpdateReplacePolicy": "Retain"},
        # Entries the drain found can never be written (a validation error): served calls an
        # operator must bill by hand; FIFO so a repeated park is deduplicated.
        "LedgerParkedQueue": {"Type": "AWS::SQS::Queue", "DeletionPolicy": "Retain",
                              "UpdateReplacePolicy": "Retain", "Properties": {
            "QueueName": f"rfthub-{stage}-ledger-parked.fifo", "FifoQueue": True, "SqsManagedSseEnabled": True,
            "MessageRetentionPeriod": 1209600}},
        "OperatorAlarms": {"Type": "AWS::SNS::Topic", "Properties": {
            "TopicName": f"rfthub-{stage}-alarms", "DisplayName": f"rft-hub {stage} alarms"}},
        # Any parked entry is a served call off the ledger: alarm at once.
        "LedgerParkedAlarm": queue_alarm("LedgerParkedQueue", "ApproximateNumberOfMessagesVisible", 0,
                                         f"rft-hub {stage}: ledger entries parked (never writable); bill them by hand "
                                         "(docs/operating.md#ledger-parked)"),
        # Entries the drain keeps failing to write (DynamoDB refusing for an hour): look.
        "LedgerDeadLetterAgeAlarm": queue_alarm("LedgerDeadLetterQueue", "ApproximateAgeOfOldestMessage", 3600,
                                                f"rft-hub {stage}: ledger dead letters not drained for an hour "
                                                "(docs/operating.md#ledger-dlq)"),
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
        # Signs the console's session cookies (HMAC); rotating it signs every console user out.
        "ConsoleSessionSecret": {"Type": "AWS::SecretsManager::Secret", "Properties": {
            "Name": f"rfthub/{stage}/console-session",
            "Description": "rft-hub console: HMAC key for session cookies",
            "GenerateSecretString": {"PasswordLength": 64, "ExcludePunctuation": True}}},
    })
    res["BedrockServiceRole"] = bedrock_service_role(stage)
    res.update(pipelines.resources(stage))       # the state machine, its queues, schedules and rules
    res.update(operating.resources(stage))       # alarms, their Slack poster, the dashboard, log groups
    for logical, resource in res.items():        # every alarm named as the Slack message shows it
        if resource.get("Type") == "AWS::CloudWatch::Alarm":
            resource["Properties"].setdefault("AlarmName", f"rft-hub-{stage}-{logical}")
    # Functions: the hosted grader's ARN and the datasets bucket name reach the API at run time.
    env = {"RFT_HOSTED_GRADER_ARN": {"Fn::GetAtt": ["HostedGrader", "Arn"]},
           "RFT_DATASETS_BUCKET": {"Ref": "DatasetsBucket"},
           "RFT_BEDROCK_SERVICE_ROLE_ARN": {"Fn::GetAtt": ["BedrockServiceRole", "Arn"]}}
    for logical in ("APIHandler", "ReconcileJobs", "JobWorker", "EvalWorker", *pipelines.FUNCTIONS):
        extra = pipelines.environment() if logical in pipelines.FUNCTIONS else {}
        res[logical] = {"Properties": {"Environment": {"Variables": {**env, **extra}}}}
    res["HostedGrader"] = {"Properties": {"Environment": {"Variables": {"RFT_DATASETS_BUCKET": {"Ref": "DatasetsBucket"}}}}}
    # Deep-merged by `chalice package` into its AWS::Serverless::Api (logical id RestAPI).
    res["RestAPI"] = {"Properties": {"DefinitionBody": {"x-amazon-apigateway-gateway-responses": gateway_responses()},
                                     "TracingEnabled": True}}
    return res


# ---- the data plane: the inference routes, streamed (issue #14) -----------------------------------
# Its own function (chalicelib/dataplane: an ASGI app under uvicorn) from the same deployment.zip,
# run by AWS Lambda Web Adapter in response-stream mode; API Gateway invokes it with
# InvokeWithResponseStream for POST /v1/chat/completions and /v1/responses (responseTransferMode
# STREAM); every other route stays on the Chalice API handler. The adapter's layer is published
# per region by AWS (account 753240598075; AWS China regions use another account): the parameter
# names one explicitly, empty means the published x86_64 layer in the stack's region.
WEB_ADAPTER_LAYER = "arn:${AWS::Partition}:lambda:${AWS::Region}:753240598075:layer:LambdaAdapterLayerX86:30"
DATAPLANE_HANDLER = "chalicelib/dataplane/run.sh"   # the adapter's startup command
DATAPLANE_PORT = "8080"
STREAM_TIMEOUT_SECONDS = 900                       # a streamed integration and the function: 15 minutes


def _stage_environment(stage: str) -> dict:
    config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    return {**config.get("environment_variables", {}), **config["stages"][stage].get("environment_variables", {})}


def dataplane_policy(stage: str) -> list[dict]:
    """What the data plane does: authenticate team keys, resolve and price models (reads), take
    budget and rate-limit slices, write the ledger and threshold events, call Bedrock."""
    table = f"arn:aws:dynamodb:*:*:table/rfthub-{stage}-"
    writes = [f"{table}{name}" for name in ("budget_periods", "ledger", "outbox", "rate_windows")]
    return [
        _statement(["dynamodb:GetItem", "dynamodb:Query", "dynamodb:BatchGetItem", "dynamodb:DescribeTable"],
                   [f"{table}*", f"{table}*/index/*"], "Reads"),
        _statement(["dynamodb:PutItem", "dynamodb:UpdateItem"], writes, "Metering"),
        # A key's last use, to the day (platform/teams.note_use: at most once per key per day).
        _statement(["dynamodb:UpdateItem"], [f"{table}api_keys"], "KeyLastUse"),
        audit_append_only(stage),
        _statement(["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
                   [f"arn:aws:logs:*:*:log-group:/aws/lambda/{APP}-{stage}-*"], "Logs"),
        _statement(["bedrock:CallWithBearerToken"], ["*"], "BedrockToken"),
        _statement(["bedrock-mantle:CallWithBearerToken"] + MANTLE_INFER, ["*"], "BedrockMantle"),
        GUARDRAILS,
        _statement(["events:PutEvents"], [f"arn:aws:events:*:*:event-bus/rfthub-{stage}"], "OwnBus"),
        # GetQueueAttributes: a slice is closed from the ledger only while no entry is dead-lettered.
        _statement(["sqs:SendMessage", "sqs:GetQueueUrl", "sqs:GetQueueAttributes"],
                   [f"arn:aws:sqs:*:*:rfthub-{stage}-ledger-dlq"], "LedgerDeadLetters"),
        # The auth rules of api/http.py accept the console's session cookie (CSRF-checked) here too.
        _statement(["secretsmanager:GetSecretValue"],
                   [f"arn:aws:secretsmanager:*:*:secret:rfthub/{stage}/console-session-*"], "ConsoleSessions"),
        *nova_statements(stage, submit=False, jobs=False, deployments=False, infer=True),   # Nova: Converse
        operating.XRAY,
    ]


def add_dataplane(template: dict, stage: str) -> None:
    """The data plane's function, role, layer parameter, permission and streamed integrations,
    merged into the template chalice package writes (RestAPI's definition is deep-merged)."""
    from chalicelib.dataplane import READY_PATH, ROUTES

    template["Parameters"] = {"LambdaWebAdapterLayerArn": {
        "Type": "String", "Default": "",
        "Description": "ARN of the AWS Lambda Web Adapter layer (x86_64) for the data plane; empty: AWS's "
                       "published LambdaAdapterLayerX86 version 30 in this region"}}
    template["Conditions"] = {"PublishedWebAdapterLayer": {"Fn::Equals": [{"Ref": "LambdaWebAdapterLayerArn"}, ""]}}
    env = {**_stage_environment(stage),
           "RFT_HOSTED_GRADER_ARN": {"Fn::GetAtt": ["HostedGrader", "Arn"]},
           "RFT_DATASETS_BUCKET": {"Ref": "DatasetsBucket"},
           "AWS_LAMBDA_EXEC_WRAPPER": "/opt/bootstrap", "AWS_LWA_INVOKE_MODE": "response_stream",
           "AWS_LWA_PORT": DATAPLANE_PORT, "AWS_LWA_READINESS_CHECK_PATH": READY_PATH}
    res = template["Resources"]
    res["DataPlaneRole"] = {"Type": "AWS::IAM::Role", "Properties": {
        "AssumeRolePolicyDocument": {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]},
        "Policies": [{"PolicyName": "DataPlanePolicy",
                      "PolicyDocument": {"Version": "2012-10-17", "Statement": dataplane_policy(stage)}}]}}
    res["DataPlane"] = {"Type": "AWS::Serverless::Function", "Properties": {
        "Runtime": f"python{sys.version_info.major}.{sys.version_info.minor}",   # as chalice picks it
        "Handler": DATAPLANE_HANDLER, "CodeUri": "./deployment.zip", "Architectures": ["x86_64"],
        "Timeout": STREAM_TIMEOUT_SECONDS, "MemorySize": 1024, "Tracing": "Active",
        "Layers": [{"Fn::If": ["PublishedWebAdapterLayer", {"Fn::Sub": WEB_ADAPTER_LAYER},
                               {"Ref": "LambdaWebAdapterLayerArn"}]}],
        "Environment": {"Variables": env}, "Role": {"Fn::GetAtt": ["DataPlaneRole", "Arn"]},
        "Tags": {"rft-hub": f"data-plane:{stage}"}}}
    res["DataPlaneInvokePermission"] = {"Type": "AWS::Lambda::Permission", "Properties": {
        "FunctionName": {"Ref": "DataPlane"}, "Action": "lambda:InvokeFunction",   # covers InvokeWithResponseStream
        "Principal": "apigateway.amazonaws.com",
        "SourceArn": {"Fn::Sub": ["arn:${AWS::Partition}:execute-api:${AWS::Region}:${AWS::AccountId}:${RestAPIId}/*",
                                  {"RestAPIId": {"Ref": "RestAPI"}}]}}}
    paths = res.setdefault("RestAPI", {}).setdefault("Properties", {}).setdefault("DefinitionBody", {}) \
        .setdefault("paths", {})
    for method, path in ROUTES:
        paths.setdefault(path, {})[method.lower()] = {"x-amazon-apigateway-integration": {
            "type": "aws_proxy", "httpMethod": "POST", "responseTransferMode": "STREAM",
            "timeoutInMillis": STREAM_TIMEOUT_SECONDS * 1000,
            "uri": {"Fn::Sub": "arn:${AWS::Partition}:apigateway:${AWS::Region}:lambda:path/2021-11-15/functions/"
                               "${DataPlane.Arn}/response-streaming-invocations"}}}
    template.setdefault("Outputs", {})["DataPlaneArn"] = {"Value": {"Fn::GetAtt": ["DataPlane", "Arn"]}}


def _statement(actions: list[str], resources: list[str], sid: str) -> dict:
    return {"Sid": sid, "Effect": "Allow", "Action": sorted(set(actions)), "Resource": resources}


# The audit log is append-only (issue #29; platform/audit.py): every function may put an entry (in
# the transaction of the change it records: TransactWriteItems is authorized per item as PutItem),
# none may change or remove one. An explicit Deny, so no Allow on the tables' wildcard can grant it.
# BatchWriteItem is denied too (its DeleteRequest deletes), and PartiQL's update and delete.
AUDIT_DENIED = ["dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:BatchWriteItem", "dynamodb:PartiQLUpdate",
                "dynamodb:PartiQLDelete", "dynamodb:DeleteTable", "dynamodb:UpdateTable"]


# ApplyGuardrail on the guardrails admins attach (issue #29): the account's own guardrails. A guardrail
# of another account (cross-account guardrails) would need its ARN here.
GUARDRAILS = _statement(["bedrock:ApplyGuardrail"], ["arn:aws:bedrock:*:*:guardrail/*"], "Guardrails")
AUDIT_TABLE = "audit_log"          # store/models.AuditEntry's table (tests/deploy checks they agree)


def audit_append_only(stage: str) -> dict:
    arn = f"arn:aws:dynamodb:*:*:table/rfthub-{stage}-{AUDIT_TABLE}"
    return {"Sid": "AuditLogAppendOnly", "Effect": "Deny", "Action": sorted(AUDIT_DENIED), "Resource": [arn]}


# ---- Amazon Nova through Bedrock's native API (issue #15) ----------------------------------------
# The service role Bedrock assumes for a Nova RFT job (shared docs §4.5), least privilege: read the
# training data rft-hub writes under nova/<team>/<job>/, write the job's output prefix
# (nova/<team>/<job>/output/), invoke the grader Lambdas (rft-hub always gives Bedrock its hosted
# grader; team graders, rft-grader-*, run behind it).
NOVA_PREFIX = "nova"
NOVA_JOB_RESOURCES = ["arn:aws:bedrock:*:*:model-customization-job/*", "arn:aws:bedrock:*::foundation-model/amazon.nova-*",
                      "arn:aws:bedrock:*:*:custom-model/*"]
NOVA_DEPLOYMENTS = ["arn:aws:bedrock:*:*:custom-model-deployment/*", "arn:aws:bedrock:*:*:custom-model/*"]
NOVA_INFERENCE = ["arn:aws:bedrock:*:*:custom-model-deployment/*", "arn:aws:bedrock:*::foundation-model/amazon.nova-*",
                  "arn:aws:bedrock:*:*:inference-profile/*amazon.nova-*"]


def bedrock_service_role(stage: str) -> dict:
    bucket = "arn:${AWS::Partition}:s3:::${DatasetsBucket}"
    grader = "arn:${AWS::Partition}:lambda:${AWS::Region}:${AWS::AccountId}:function:"
    statements = [
        {"Sid": "TrainingData", "Effect": "Allow", "Action": ["s3:GetObject"],
         "Resource": [{"Fn::Sub": f"{bucket}/{NOVA_PREFIX}/*/train.jsonl"},
                      {"Fn::Sub": f"{bucket}/{NOVA_PREFIX}/*/validation.jsonl"}]},
        {"Sid": "Output", "Effect": "Allow", "Action": ["s3:PutObject", "s3:GetObject"],
         "Resource": [{"Fn::Sub": f"{bucket}/{NOVA_PREFIX}/*/output/*"}]},
        {"Sid": "List", "Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [{"Fn::Sub": bucket}],
         "Condition": {"StringLike": {"s3:prefix": [f"{NOVA_PREFIX}/*"]}}},
        {"Sid": "Graders", "Effect": "Allow", "Action": ["lambda:InvokeFunction"],
         "Resource": [{"Fn::GetAtt": ["HostedGrader", "Arn"]}, {"Fn::Sub": f"{grader}rft-grader-*"}]},
    ]
    return {"Type": "AWS::IAM::Role", "Properties": {
        "Description": f"rft-hub {stage}: assumed by Amazon Bedrock for Amazon Nova RFT jobs",
        "AssumeRolePolicyDocument": {"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Principal": {"Service": "bedrock.amazonaws.com"}, "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}}]},
        "Policies": [{"PolicyName": "NovaRft", "PolicyDocument": {"Version": "2012-10-17", "Statement": statements}}]}}


def nova_statements(stage: str, *, submit: bool, jobs: bool, deployments: bool, infer: bool) -> list[dict]:
    """What a function needs of Bedrock's native API for Nova: submit (create the job, pass the
    service role, write its data), follow jobs (read their state and metrics, stop them), manage
    deployments, call Converse."""
    bucket = f"arn:aws:s3:::rfthub-{stage}-datasets-*"
    out = []
    if submit:
        out += [_statement(["bedrock:CreateModelCustomizationJob", "bedrock:TagResource"], NOVA_JOB_RESOURCES,
                           "NovaSubmit"),
                {"Sid": "NovaPassRole", "Effect": "Allow", "Action": "iam:PassRole",
                 "Resource": ["arn:aws:iam::*:role/*BedrockServiceRole*"],
                 "Condition": {"StringEquals": {"iam:PassedToService": "bedrock.amazonaws.com"}}},
                _statement(["s3:PutObject"], [f"{bucket}/{NOVA_PREFIX}/*"], "NovaData")]
    if jobs:
        out += [_statement(["bedrock:GetModelCustomizationJob", "bedrock:StopModelCustomizationJob"],
                           ["arn:aws:bedrock:*:*:model-customization-job/*"], "NovaJobs"),
                _statement(["s3:GetObject"], [f"{bucket}/{NOVA_PREFIX}/*/output/*"], "NovaMetrics"),
                _statement(["s3:ListBucket"], [bucket], "NovaMetricsList")]
    if deployments:
        out.append(_statement(["bedrock:CreateCustomModelDeployment", "bedrock:GetCustomModelDeployment",
                               "bedrock:DeleteCustomModelDeployment", "bedrock:TagResource"], NOVA_DEPLOYMENTS,
                              "NovaDeployments"))
    if infer:
        out.append(_statement(["bedrock:InvokeModel", "bedrock:InvokeModelWithResponseStream"], NOVA_INFERENCE,
                              "NovaConverse"))
    return out


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

    def tables(names: list[str], actions: list[str], sid: str) -> dict:
        arns = [f"arn:aws:dynamodb:*:*:table/rfthub-{stage}-{n}" for n in names]
        return _statement(actions, arns + [f"{a}/index/*" for a in arns], sid)

    send = ["sqs:SendMessage", "sqs:GetQueueUrl"]
    # GetQueueAttributes: a slice is closed from the ledger only while no entry is dead-lettered.
    ledger_dlq = sqs(["ledger-dlq"], send + ["sqs:GetQueueAttributes"], "LedgerDeadLetters")
    # The hosted grader meters its judge calls like the gateway: resolve the team's model, read
    # prices and budgets, reserve/settle, write the ledger; and flags the job when money runs out.
    grader_tables = tables(["grader_specs", "prices", "budgets", "models", "aliases", "alias_history"],
                           ["dynamodb:GetItem", "dynamodb:Query"], "GraderReads")
    grader_writes = tables(["budget_periods", "ledger", "jobs", "job_events", "outbox"],
                           ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:Query"],
                           "GraderMetering")

    consume = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes", "sqs:ChangeMessageVisibility",
               "sqs:GetQueueUrl"]
    # Eval runs are queued by the API and, when a job that named an eval succeeds, by whichever
    # function finalizes the job (a refused send leaves it to the reconciler's next finalize).
    evals_send = sqs(["evals"], send, "EvalsQueue")
    out = {
        "api_handler": [ddb_rw, logs, token, bus,
                        _statement(MANTLE_READ + MANTLE_WRITE + MANTLE_INFER + MANTLE_PROJECTS, ["*"], "BedrockMantle"),
                        _statement(["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                                   [f"{bucket}/files/*", f"{bucket}/uploads/*"], "Datasets"),
                        _statement(["s3:GetObject"], [f"{bucket}/rollouts/*"], "Rollouts"),
                        _statement(["s3:ListBucket"], [bucket], "DatasetsList"),
                        _statement(["secretsmanager:GetSecretValue"], [secrets], "Secrets"),
                        _statement(["secretsmanager:CreateSecret", "secretsmanager:PutSecretValue"],
                                   [f"arn:aws:secretsmanager:*:*:secret:rfthub/{stage}/slack-webhook/*"], "Webhooks"),
                        _statement(["lambda:InvokeFunction"], [grader, TEAM_GRADER_PATTERN], "Graders"),
                        sqs(["slack-commands"], ["sqs:SendMessage", "sqs:GetQueueUrl"], "SlackCommands"),
                        sqs(["jobs"], send, "JobsQueue"), evals_send, ledger_dlq],
        "on_bedrock_job_event": [ddb_rw, logs, token, bus, _statement(MANTLE_READ, ["*"], "BedrockMantle"),
                                 evals_send],
        "reconcile_jobs": [ddb_rw, logs, token, bus,
                           _statement(MANTLE_READ + MANTLE_WRITE + MANTLE_INFER + MANTLE_PROJECTS, ["*"],
                                      "BedrockMantle"),
                           # DeleteObject: the sweep of files past their expires_after (platform/files.py).
                           _statement(["s3:GetObject", "s3:DeleteObject"], [f"{bucket}/files/*"], "Datasets"),
                           _statement(["lambda:InvokeFunction"], [grader, TEAM_GRADER_PATTERN], "Graders"),
                           sqs(["ledger-dlq"], consume, "LedgerDeadLetters"), evals_send,
                           sqs(["ledger-parked.fifo"], send, "LedgerParked")],
        # Preflight (judges, team Lambdas), dataset preparation and submission of new jobs.
        "job_worker": [ddb_rw, logs, token, bus,
                       _statement(MANTLE_READ + MANTLE_WRITE + MANTLE_INFER + MANTLE_PROJECTS, ["*"], "BedrockMantle"),
                       _statement(["s3:GetObject"], [f"{bucket}/files/*"], "Datasets"),
                       _statement(["lambda:InvokeFunction"], [grader, TEAM_GRADER_PATTERN], "Graders"),
                       sqs(["jobs"], consume, "JobsQueue"), evals_send, ledger_dlq],
        # Eval runs: samples models and runs judges through the gateway's metering, reads datasets,
        # invokes team Lambda graders, and queues its own continuation.
        "eval_worker": [ddb_rw, logs, token, bus,
                        _statement(["bedrock-mantle:CallWithBearerToken"] + MANTLE_INFER, ["*"], "BedrockMantle"),
                        _statement(["s3:GetObject"], [f"{bucket}/files/*"], "Datasets"),
                        _statement(["lambda:InvokeFunction"], [TEAM_GRADER_PATTERN], "TeamGraders"),
                        sqs(["evals"], consume + ["sqs:SendMessage"], "EvalsQueue"), ledger_dlq],
        "hosted_grader": [grader_tables, grader_writes, logs, token, ledger_dlq,
                          _statement(["bedrock-mantle:CallWithBearerToken"] + MANTLE_INFER, ["*"], "Judge"),
                          # Every reward goes through it (issue #16): team Lambda graders behind it, the
                          # rollouts it keeps (S3 + tables) and the training watch's findings (bus).
                          _statement(["lambda:InvokeFunction"], [TEAM_GRADER_PATTERN], "TeamGraders"),
                          _statement(["s3:PutObject"], [f"{bucket}/rollouts/*"], "Rollouts"),
                          tables(["rollout_windows", "rollouts", "watch_findings"],
                                 ["dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem", "dynamodb:Query",
                                  "dynamodb:BatchWriteItem"], "TrainingWatch"),
                          bus],
        "slack_notifier": [ddb_rw, logs, _statement(["secretsmanager:GetSecretValue"], [secrets], "Secrets"),
                           sqs(["slack-notify"], consume, "NotifyQueue"),
                           sqs(["slack-dlq"], ["sqs:SendMessage", "sqs:GetQueueUrl"], "DeadLetters")],
        "slack_commands": [ddb_rw, logs, token, bus, _statement(MANTLE_READ + MANTLE_WRITE, ["*"], "BedrockMantle"),
                           sqs(["slack-commands"], consume, "CommandsQueue")],
        "alarm_notifier": [logs, *operating.notifier_policy(stage)],
        # Pipelines (issue #27): each step of a run (a job through the job path, eval runs, the alias move),
        # the triggers, and the reconciler of runs; their Step Functions, Scheduler and S3 needs below.
        "pipeline_worker": [ddb_rw, logs, token, bus,
                            _statement(MANTLE_READ + MANTLE_WRITE + MANTLE_INFER + MANTLE_PROJECTS, ["*"],
                                       "BedrockMantle"),
                            _statement(["s3:GetObject", "s3:PutObject"], [f"{bucket}/files/*"], "Datasets"),
                            _statement(["lambda:InvokeFunction"], [grader, TEAM_GRADER_PATTERN], "Graders"),
                            sqs(["pipeline-steps"], consume, "StepsQueue"), sqs(["jobs"], send, "JobsQueue"),
                            evals_send, ledger_dlq],
        "pipeline_triggers": [ddb_rw, logs, bus, sqs(["pipeline-triggers"], consume, "TriggersQueue")],
        "reconcile_pipelines": [ddb_rw, logs, token, bus,
                                _statement(MANTLE_READ + MANTLE_WRITE, ["*"], "BedrockMantle"),
                                _statement(["s3:GetObject"], [f"{bucket}/files/*"], "Datasets"),
                                sqs(["jobs"], send, "JobsQueue"), evals_send],
    }
    for function, extra in pipelines.statements(stage, _statement).items():
        out[function] += extra
    for function, needs in NOVA_NEEDS.items():     # Amazon Nova: Bedrock's native API
        out[function] += nova_statements(stage, **needs)
    for function in ("api_handler", "eval_worker"):   # the gateway's checks (inference/guardrails.py)
        out[function].append(GUARDRAILS)
    for statements in out.values():                # every function is traced (.chalice/config.json: xray),
        statements.append(operating.XRAY)          # and none changes or removes an audit entry
        statements.append(audit_append_only(stage))
    return out


# Who calls what of Bedrock's native API: the worker and the reconciler submit; whoever reads,
# finishes or cancels a job follows it; finishing a job and moving aliases manage deployments;
# the gateway (and evals through it) calls Converse.
NOVA_NEEDS = {
    "api_handler": {"submit": False, "jobs": True, "deployments": True, "infer": True},
    "on_bedrock_job_event": {"submit": False, "jobs": True, "deployments": True, "infer": False},
    "reconcile_jobs": {"submit": True, "jobs": True, "deployments": True, "infer": False},
    "job_worker": {"submit": True, "jobs": True, "deployments": False, "infer": False},
    "slack_commands": {"submit": False, "jobs": True, "deployments": False, "infer": False},
    "eval_worker": {"submit": False, "jobs": False, "deployments": False, "infer": True},
    # a run's job is created (and a failed run's cancelled) through the job path; a run's alias move
    "pipeline_worker": {"submit": False, "jobs": True, "deployments": True, "infer": True},
    "reconcile_pipelines": {"submit": False, "jobs": True, "deployments": True, "infer": False},
}


# ---- the deployment package -------------------------------------------------------------------------
# boto3/botocore are pinned and packaged (not the runtime's copy), but botocore's models for the
# ~400 services rft-hub never calls are 15 MB of the zip. Kept: the services the code creates
# clients for (chalicelib/adapters/aws.py; dynamodb through PynamoDB) and sts for credential
# providers. tests/test_deploy.py imports the app from the slimmed zip and creates each client.
BOTOCORE_SERVICES = ("bedrock", "bedrock-runtime", "dynamodb", "events", "lambda", "s3", "scheduler",
                     "secretsmanager", "sqs", "stepfunctions", "sts")
MAX_PACKAGE_BYTES = 20_000_000         # 20 MB zipped (issue #12)


def _dropped(name: str) -> bool:
    parts = name.split("/")
    if "__pycache__" in parts:      # chalice copies chalicelib/ as it is, with a local run's bytecode
        return True
    return (len(parts) > 3 and parts[0] == "botocore" and parts[1] == "data"
            and parts[2] not in BOTOCORE_SERVICES)


def slim_package(path: Path) -> dict:
    """Rewrites `chalice package`'s deployment.zip without the botocore models rft-hub does not use."""
    before = path.stat().st_size
    tmp = path.with_suffix(".slim.zip")
    dropped = 0
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if _dropped(info.filename):
                dropped += 1
                continue
            if info.filename == DATAPLANE_HANDLER:       # Lambda Web Adapter executes it
                info.external_attr = (0o100755 << 16) | (info.external_attr & 0xFFFF)
            dst.writestr(info, src.read(info), compress_type=info.compress_type)
    tmp.replace(path)
    return {"zip_bytes_before": before, "zip_bytes": path.stat().st_size, "files_dropped": dropped}


def write(stage: str) -> None:
    chalice_dir = ROOT / ".chalice"
    for function, statements in policies(stage).items():
        doc = {"Version": "2012-10-17", "Statement": statements}
        (chalice_dir / f"policy-{stage}-{function}.json").write_text(json.dumps(doc, indent=2) + "\n")
    build = ROOT / "build"
    build.mkdir(exist_ok=True)
    template = {"Resources": resources(stage)}
    add_dataplane(template, stage)
    (build / f"resources-{stage}.json").write_text(json.dumps(template, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--slim":
        result = slim_package(Path(sys.argv[2]))
        print(f"slimmed {sys.argv[2]}: {result['zip_bytes_before']:,} -> {result['zip_bytes']:,} bytes "
              f"({result['files_dropped']} files dropped: botocore models not in use, bytecode)")
        if result["zip_bytes"] > MAX_PACKAGE_BYTES:
            sys.exit(f"the deployment package is {result['zip_bytes']:,} bytes; the limit is {MAX_PACKAGE_BYTES:,}")
    else:
        write(sys.argv[1] if len(sys.argv) > 1 else "dev")
