"""The OpenAPI document, and schemathesis against the app in the local stack (team and admin)."""
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from app import app
from chalicelib.api.openapi import document


def test_document_is_valid_and_lists_every_route(api):
    from openapi_spec_validator import validate

    doc = api.http.get("/openapi.json").json_body
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    declared = {(path, method) for path, methods in doc["paths"].items() for method in methods}
    for path, methods in app.routes.items():
        for method in methods:
            assert (path, method.lower()) in declared, f"{method} {path} is missing from /openapi.json"
    assert doc == document(app)


@pytest.fixture(scope="session")
def fuzz_schema(stack):
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json")
    schema.config.update(base_url=stack.base_url)
    # Methods a route does not declare are answered by the HTTP front (chalice local's http.server
    # here, API Gateway when deployed), never by rft-hub, so they are not probed.
    schema.config.phases.coverage.unexpected_methods = set()
    return schema


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@pytest.fixture(scope="session")
def fuzz_credentials(stack):
    """A team key and the admin key; every operation is fuzzed as both."""
    import json

    from chalice.test import Client

    from local.harness import ADMIN_KEY
    from local.servers import ROOT

    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    with Client(app, stage_name="local", project_dir=str(ROOT)) as c:
        team = c.http.post("/v1/admin/teams", headers=headers, body=json.dumps({"name": "fuzz"})).json_body
        key = c.http.post(f"/v1/admin/teams/{team['id']}/keys", headers=headers).json_body["key"]
    return {"team": key, "admin": ADMIN_KEY}


def _check(case, token):
    case.call_and_validate(headers={"Authorization": f"Bearer {token}"},
                           checks=[not_a_server_error, response_schema_conformance], timeout=30)


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_as_a_team(case, fuzz_credentials):
    _check(case, fuzz_credentials["team"])


@schema.parametrize()
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_as_the_admin(case, fuzz_credentials):
    _check(case, fuzz_credentials["admin"])
