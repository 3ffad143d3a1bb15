"""Deployability: the packaged template (cfn-lint clean, every resource declared) and
least-privilege IAM (no wildcard action on a wildcard resource)."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
POLICIES = sorted((ROOT / ".chalice").glob("policy-*.json"))


def _wildcard(values) -> bool:
    values = [values] if isinstance(values, (str, dict)) else values
    return any(v == "*" for v in values)


def _service_wide(actions) -> bool:
    actions = [actions] if isinstance(actions, str) else actions
    return any(a == "*" or a.endswith(":*") for a in actions)


def test_policies_grant_no_wildcard_action_on_a_wildcard_resource():
    assert POLICIES, "no policy files"
    for path in POLICIES:
        for statement in json.loads(path.read_text())["Statement"]:
            assert not (_service_wide(statement["Action"]) and _wildcard(statement["Resource"])), \
                f"{path.name}: {statement.get('Sid')} grants {statement['Action']} on *"
            assert statement["Effect"] == "Allow"


def test_committed_policies_match_the_generator():
    from deploy import template

    for stage in ("dev", "prod"):
        for function, statements in template.policies(stage).items():
            committed = json.loads((ROOT / ".chalice" / f"policy-{stage}-{function}.json").read_text())
            assert committed == {"Version": "2012-10-17", "Statement": statements}, f"{stage}/{function}: run make package"


@pytest.fixture(scope="module")
def packaged():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ENDPOINT_URL", "RFT_"))}
    env.pop("AWS_ACCESS_KEY_ID", None)
    env.pop("AWS_SECRET_ACCESS_KEY", None)
    env.pop("AWS_SESSION_TOKEN", None)            # no AWS credentials at all
    result = subprocess.run(["make", "package", "STAGE=prod"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]   # includes cfn-lint
    return json.loads((ROOT / "build" / "prod" / "sam.json").read_text())


def _of_type(template, kind):
    return {k: v for k, v in template["Resources"].items() if v["Type"] == kind}


def test_template_declares_every_resource(packaged):
    from chalicelib.store.models import ALL_MODELS

    tables = _of_type(packaged, "AWS::DynamoDB::Table")
    assert len(tables) == len(ALL_MODELS)
    for table in tables.values():
        props = table["Properties"]
        assert props["BillingMode"] == "PAY_PER_REQUEST" and props["SSESpecification"]["SSEEnabled"]
        assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"]
        assert props["TableName"].startswith("rfthub-prod-")
    assert tables["TableLedgerEntry"]["Properties"]["TimeToLiveSpecification"]["Enabled"]
    assert {i["IndexName"] for i in tables["TableJob"]["Properties"]["GlobalSecondaryIndexes"]} == \
        {"active", "by_bedrock_id"}

    bucket = packaged["Resources"]["DatasetsBucket"]["Properties"]
    assert bucket["PublicAccessBlockConfiguration"]["BlockPublicPolicy"] and bucket["BucketEncryption"]
    assert any("AbortIncompleteMultipartUpload" in r for r in bucket["LifecycleConfiguration"]["Rules"])

    queues = _of_type(packaged, "AWS::SQS::Queue")
    assert queues["SlackNotifyQueue"]["Properties"]["RedrivePolicy"]["maxReceiveCount"] == 5
    assert _of_type(packaged, "AWS::Events::EventBus")["EventBus"]["Properties"]["Name"] == "rfthub-prod"
    assert len(_of_type(packaged, "AWS::SecretsManager::Secret")) == 2

    events = {name: e for f in _of_type(packaged, "AWS::Serverless::Function").values()
              for name, e in f["Properties"].get("Events", {}).items()}
    bedrock = [e["Properties"]["Pattern"] for e in events.values() if e["Type"] == "CloudWatchEvent"]
    assert bedrock == [{"source": ["aws.bedrock"], "detail-type": ["Model Customization Job State Change"]}]
    for pattern in bedrock:   # only detail.jobStatus may be filtered on; "status" never matches
        assert set(pattern.get("detail", {})) <= {"jobStatus"}
    assert any(e["Type"] == "Schedule" and e["Properties"]["Schedule"] == "rate(2 minutes)" for e in events.values())
    assert {e["Type"] for e in events.values()} >= {"SQS"}


def test_functions_have_their_own_roles_and_sane_limits(packaged):
    functions = _of_type(packaged, "AWS::Serverless::Function")
    grader = functions["HostedGrader"]["Properties"]
    assert grader["Timeout"] >= 60 and grader["MemorySize"] >= 512   # the reward contract needs minutes
    assert functions["APIHandler"]["Properties"]["Timeout"] <= 29
    roles = {f["Properties"]["Role"]["Fn::GetAtt"][0] for f in functions.values()}
    assert len(roles) == len(functions)                               # one least-privilege role each
    api_env = functions["APIHandler"]["Properties"]["Environment"]["Variables"]
    assert api_env["RFT_HOSTED_GRADER_ARN"] == {"Fn::GetAtt": ["HostedGrader", "Arn"]}
