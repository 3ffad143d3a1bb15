"""Deployability: the packaged template (cfn-lint clean, every resource declared),
least-privilege IAM (no wildcard action on a wildcard resource), API Gateway's own answers
(OpenAI envelope, never an echo of the request) and a lean deployment package."""
import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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
            assert statement["Effect"] == "Allow" or statement["Sid"] == "AuditLogAppendOnly"


def _grants(statements, action: str, arn: str) -> bool:
    """Whether the statements allow `action` on `arn` (IAM's rules: an explicit Deny wins)."""
    from fnmatch import fnmatchcase

    def matches(statement):
        return any(fnmatchcase(action, a) for a in statement["Action"]) and \
            any(fnmatchcase(arn, r) for r in statement["Resource"])
    return any(matches(s) for s in statements if s["Effect"] == "Allow") and \
        not any(matches(s) for s in statements if s["Effect"] == "Deny")


def test_no_function_can_update_or_delete_an_audit_entry():
    """The audit log is append-only (issue #29): every function may put an entry (its transactions
    are authorized per item as PutItem) and none may update, delete or batch-write one."""
    from chalicelib.store.models import AuditEntry
    from deploy import template

    assert AuditEntry.Meta.table_name.endswith("-" + template.AUDIT_TABLE)
    for stage in ("dev", "prod"):
        arn = f"arn:aws:dynamodb:us-west-2:123456789012:table/rfthub-{stage}-{template.AUDIT_TABLE}"
        functions = {**template.policies(stage), "data_plane": template.dataplane_policy(stage)}
        for function, statements in functions.items():
            for action in ("dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:BatchWriteItem"):
                assert not _grants(statements, action, arn), f"{stage}/{function} may {action} the audit log"
        assert _grants(functions["api_handler"], "dynamodb:PutItem", arn)   # where audited acts happen
        assert f"Table{AuditEntry.__name__}" in template.table_resources(stage, [AuditEntry])


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
        {"active", "by_bedrock_id", "by_created"}
    assert {i["IndexName"] for i in tables["TableLedgerEntry"]["Properties"]["GlobalSecondaryIndexes"]} == \
        {"pending_usage"}

    bucket = packaged["Resources"]["DatasetsBucket"]["Properties"]
    assert bucket["PublicAccessBlockConfiguration"]["BlockPublicPolicy"] and bucket["BucketEncryption"]
    assert any("AbortIncompleteMultipartUpload" in r for r in bucket["LifecycleConfiguration"]["Rules"])

    queues = _of_type(packaged, "AWS::SQS::Queue")
    assert queues["SlackNotifyQueue"]["Properties"]["RedrivePolicy"]["maxReceiveCount"] == 5
    assert _of_type(packaged, "AWS::Events::EventBus")["EventBus"]["Properties"]["Name"] == "rfthub-prod"
    assert len(_of_type(packaged, "AWS::SecretsManager::Secret")) == 3     # admin key, Slack, console sessions

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


# ---- API Gateway's own answers (gateway responses) ----------------------------------------------

def test_gateway_responses_answer_in_the_envelope_and_repeat_nothing(packaged):
    from deploy.template import GATEWAY_ALLOWED_VARIABLES

    responses = packaged["Resources"]["RestAPI"]["Properties"]["DefinitionBody"][
        "x-amazon-apigateway-gateway-responses"]
    assert {"DEFAULT_4XX", "DEFAULT_5XX", "MISSING_AUTHENTICATION_TOKEN", "RESOURCE_NOT_FOUND", "UNAUTHORIZED",
            "ACCESS_DENIED", "REQUEST_TOO_LARGE", "INVALID_API_KEY", "THROTTLED", "INVALID_SIGNATURE",
            "EXPIRED_TOKEN", "INTEGRATION_TIMEOUT"} <= set(responses)
    for kind in ("MISSING_AUTHENTICATION_TOKEN", "INVALID_SIGNATURE", "RESOURCE_NOT_FOUND"):   # unknown route or method
        assert responses[kind]["statusCode"] == "404"
        assert json.loads(responses[kind]["responseTemplates"]["application/json"])["error"]["code"] == "unknown_url"
    assert responses["REQUEST_TOO_LARGE"]["statusCode"] == "413"
    assert responses["THROTTLED"]["statusCode"] == "429"
    for kind, response in responses.items():
        assert set(response["responseTemplates"]) == {"application/json"}, kind
        template = response["responseTemplates"]["application/json"]
        # Only the method and the request id: never a header, a parameter, the body, the path,
        # the authorizer, the caller's identity or API Gateway's own message (which repeats the
        # Authorization header for unknown routes).
        assert not re.search(r"(?i)\$input|\$util|\$stageVariables|\$context\.(authorizer|identity|error|path)"
                             r"|method\.request|header|params", template), kind
        assert set(re.findall(r"\$[A-Za-z.]+", template)) <= set(GATEWAY_ALLOWED_VARIABLES), kind
        error = json.loads(template)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] is None, kind
        assert error["code"] and error["type"] in ("invalid_request_error", "rate_limit_error", "server_error")
        for name, value in response.get("responseParameters", {}).items():
            assert name.startswith("gatewayresponse.header.") and re.fullmatch(r"'[^']*'", value), (kind, name)


# ---- a lean deployment package ------------------------------------------------------------------

def test_the_deployment_package_is_lean(packaged):
    from deploy.template import MAX_PACKAGE_BYTES

    package = ROOT / "build" / "prod" / "deployment.zip"
    assert package.stat().st_size <= MAX_PACKAGE_BYTES == 20_000_000
    with zipfile.ZipFile(package) as z:
        tops = {name.split("/")[0] for name in z.namelist()}
    assert not tops & {"numpy", "numpy.libs", "rouge_score", "absl"}


def _services_the_code_calls() -> set[str]:
    """Service names passed as string literals to a `client(...)`/`_client(...)` call in chalicelib."""
    found = set()
    for path in (ROOT / "chalicelib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "client", "_client") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def test_the_package_keeps_the_botocore_models_the_code_uses(packaged, tmp_path):
    """The slimmed zip alone (no site-packages) imports the app and builds every client."""
    from deploy.template import BOTOCORE_SERVICES
    from local.servers import local_stage_env

    used = _services_the_code_calls() | {"dynamodb"}         # PynamoDB builds the DynamoDB client
    assert "s3" in used and used <= set(BOTOCORE_SERVICES)
    with zipfile.ZipFile(ROOT / "build" / "prod" / "deployment.zip") as z:
        z.extractall(tmp_path)
    code = ("import sys, boto3, botocore.session, app\n"
            "assert all(p.startswith(sys.argv[1]) or 'site-packages' not in p for p in sys.path)\n"
            "for s in sys.argv[2:]: boto3.session.Session().client(s, region_name='us-west-2')\n"
            "from chalicelib.domain.graders import similarity\n"
            "print(similarity.score('rouge_l', 'the cats run', 'the cat runs'), app.app.app_name)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RFT_", "PYTHON"))}
    env.update(local_stage_env())
    env.update({"PYTHONPATH": str(tmp_path), "AWS_DEFAULT_REGION": "us-west-2", "PYTHONDONTWRITEBYTECODE": "1"})
    result = subprocess.run([sys.executable, "-S", "-c", code, str(tmp_path), *BOTOCORE_SERVICES], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1.0", "rft-hub"]


def test_import_app_loads_no_heavy_library():
    """The openai SDK and the grader libraries are imported where they are used (bench/cold_import.py
    measures the time)."""
    from local.servers import local_stage_env

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ENDPOINT_URL", "RFT_"))}
    env.update(local_stage_env())
    env["AWS_DEFAULT_REGION"] = "us-west-2"
    code = "import sys, app; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = set(result.stdout.split())
    assert "chalicelib" in loaded
    assert not loaded & {"openai", "rapidfuzz", "nltk", "numpy", "rouge_score", "httpx2"}
