"""AWS's payload limits in the local stand-ins, and no echo of a credential for unknown URLs.

- The local Lambda Invoke API (local/lambda_server.py) refuses a synchronous request over
  6 MB and turns a result over Lambda's response limit into a function error, exactly as
  Lambda answers (checked through boto3's lambda client).
- The local API Gateway (local/api_gateway.py, in front of rft-hub in every test) refuses a
  body over 10 MB and a Lambda event over 6 MB with a 413, and answers unknown routes (404)
  and methods (405) in the OpenAI envelope without repeating the caller's key.
"""
import http.client
import json
import uuid

import boto3
import openai
import pytest
from botocore.config import Config

from local import lambda_server, servers

MB = 1024 * 1024


# ---- the local Lambda Invoke API ---------------------------------------------------------------

def _sized_result(event, _context):
    """Returns a JSON string whose serialized form is exactly event["bytes"] long."""
    return "a" * (event["bytes"] - 2)


@pytest.fixture(scope="module")
def lambda_client():
    server = servers.ThreadServer(lambda_server.create_app({"echo": lambda event, _context: event,
                                                            "sized": _sized_result}))
    client = boto3.client("lambda", region_name="us-west-2", endpoint_url=f"http://127.0.0.1:{server.port}",
                          aws_access_key_id="local", aws_secret_access_key="local",
                          config=Config(retries={"max_attempts": 1}, read_timeout=60))
    yield client
    server.stop()


def _json_string_of(size: int) -> bytes:
    return b'"' + b"x" * (size - 2) + b'"'


def test_a_request_of_exactly_6_mb_is_invoked(lambda_client):
    resp = lambda_client.invoke(FunctionName="echo", Payload=_json_string_of(lambda_server.MAX_REQUEST_BYTES))
    assert resp["StatusCode"] == 200 and "FunctionError" not in resp
    assert len(resp["Payload"].read()) == 6_291_456


def test_a_request_over_6_mb_is_request_too_large(lambda_client):
    with pytest.raises(lambda_client.exceptions.RequestTooLargeException) as err:
        lambda_client.invoke(FunctionName="echo", Payload=_json_string_of(6_291_457))
    response = err.value.response
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert response["ResponseMetadata"]["HTTPHeaders"]["x-amzn-errortype"] == "RequestTooLargeException"
    assert response["Error"] == {"Code": "RequestTooLargeException",
                                 "Message": "Request must be smaller than 6291456 bytes for the InvokeFunction "
                                            "operation"}
    assert response["Type"] == "User"


def test_a_request_over_6_mb_is_refused_by_full_arn_too(lambda_client):
    arn = "arn:aws:lambda:us-west-2:123456789012:function:rft-grader-anything"
    with pytest.raises(lambda_client.exceptions.RequestTooLargeException):
        lambda_client.invoke(FunctionName=arn, Payload=_json_string_of(7 * MB))


def test_a_response_at_the_limit_is_returned(lambda_client):
    resp = lambda_client.invoke(FunctionName="sized", Payload=json.dumps({"bytes": 6_291_556}))
    assert "FunctionError" not in resp and len(resp["Payload"].read()) == 6_291_556


def test_a_response_over_the_limit_is_a_function_error(lambda_client):
    resp = lambda_client.invoke(FunctionName="sized", Payload=json.dumps({"bytes": 6_291_557}))
    assert resp["StatusCode"] == 200
    assert resp["FunctionError"] == "Unhandled"
    assert json.loads(resp["Payload"].read()) == {
        "errorType": "Function.ResponseSizeTooLarge",
        "errorMessage": "Response payload size exceeded maximum allowed payload size (6291556 bytes)."}


def test_a_payload_that_is_not_json_is_invalid_request_content(lambda_client):
    with pytest.raises(lambda_client.exceptions.InvalidRequestContentException) as err:
        lambda_client.invoke(FunctionName="echo", Payload=b"{not json")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert err.value.response["Error"]["Message"].startswith("Could not parse request body into json")


def test_an_unknown_function_is_resource_not_found(lambda_client):
    with pytest.raises(lambda_client.exceptions.ResourceNotFoundException):
        lambda_client.invoke(FunctionName="nope", Payload=b"{}")


# ---- the local API Gateway: unknown routes and methods ---------------------------------------

def _request(stack, method: str, path: str, headers: dict, body: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", stack.api_port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


def _assert_envelope(body: bytes, code: str) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] is None and error["code"] == code
    return error


def test_unknown_routes_and_methods_never_echo_the_key(stack, make_team):
    _, key = make_team("echo-probe")
    headers = {"Authorization": f"Bearer {key}", "X-Api-Key": key, "Cookie": f"session={key}",
               "Content-Type": "application/json"}
    assert _request(stack, "GET", "/v1/me", headers)[0] == 200          # the key itself is good
    unknown_routes = [("POST", "/v1/nope"), ("GET", "/v1/nope"), ("GET", "/v2/models"),
                      ("POST", "/v1/chat/completion"), ("GET", "/v1/files/file-1/contents"), ("GET", "/"),
                      ("GET", f"/v1/{key}"), ("GET", f"/v1/nope?api_key={key}"),
                      ("GET", f"/v1/files/{key}/contents"), ("TRACE", "/health/nope")]
    unsupported_methods = [("PUT", "/v1/files"), ("DELETE", "/v1/models"), ("PATCH", "/v1/fine_tuning/jobs"),
                           ("POST", "/v1/me"), ("OPTIONS", "/v1/chat/completions"), ("HEAD", "/v1/me"),
                           ("PROPFIND", "/v1/files"), ("DELETE", f"/v1/files?key={key}")]
    for (method, path), status in [(c, 404) for c in unknown_routes] + [(c, 405) for c in unsupported_methods]:
        got, response_headers, body = _request(stack, method, path, headers, b'{"api_key": "%s"}' % key.encode())
        assert got == status, (method, path, got, body)
        assert key not in body.decode(), (method, path)
        assert all(key not in value for _, value in response_headers), (method, path)
        assert key[5:25] not in body.decode()                         # not even the key id
        if method == "HEAD":
            assert body == b""
            continue
        if status == 404:
            error = _assert_envelope(body, "unknown_url")
        else:
            error = _assert_envelope(body, "method_not_allowed")
            allow = dict((k.lower(), v) for k, v in response_headers)["allow"]
            assert method not in allow.split(", ") and allow
            assert f"this path allows {allow}" in error["message"]
        shown = method if method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS") else "an unsupported method"
        assert error["message"].startswith(f"Unknown request URL: {shown} /"), error["message"]


def test_unknown_url_message_is_shaped_like_openais(stack):
    status, _, body = _request(stack, "POST", "/v1/nope", {"Content-Type": "application/json"}, b"{}")
    assert status == 404
    assert json.loads(body) == {"error": {
        "message": "Unknown request URL: POST /v1/nope. Please check the URL for typos, or see GET /openapi.json "
                   "for rft-hub's routes.",
        "type": "invalid_request_error", "param": None, "code": "unknown_url"}}


def test_the_sdk_sees_unknown_urls_as_not_found(stack, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.get("/nope", cast_to=object)
    assert err.value.code == "unknown_url" and client.api_key not in str(err.value.body)


# ---- the local API Gateway: payload limits -------------------------------------------------------

def test_a_body_over_10_mb_is_413(stack, make_team):
    _, key = make_team("big-body")
    status, _, body = _request(stack, "POST", "/v1/files",
                               {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                               b"x" * (10 * MB + 1))
    assert status == 413
    error = _assert_envelope(body, "payload_too_large")
    assert "10485760" in error["message"] and key not in body.decode()


def test_a_lambda_event_over_6_mb_is_413(stack, client):
    """A multipart part is base64-encoded into the Lambda event: 5 MiB of data is a ~7 MB event."""
    upload = client.uploads.create(bytes=9 * MB, filename="big.jsonl", mime_type="application/jsonl",
                                   purpose="fine-tune")
    with pytest.raises(openai.APIStatusError) as err:
        client.uploads.parts.create(upload.id, data=b"x" * (5 * MB))
    assert err.value.status_code == 413 and err.value.code == "payload_too_large"
    assert "base64" in err.value.message
    part = client.uploads.parts.create(upload.id, data=b"x" * (4 * MB))   # the documented part size fits
    assert part.upload_id == upload.id


def test_a_json_body_just_under_the_event_limit_reaches_the_app(stack, make_team):
    """Between the app's own 1 MB JSON limit and the gateway's: the app answers (its 413)."""
    _, key = make_team("json-body")
    status, _, body = _request(stack, "POST", "/v1/fine_tuning/jobs",
                               {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                "Idempotency-Key": str(uuid.uuid4())},
                               json.dumps({"model": "x" * (5 * MB)}).encode())
    assert status == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert "Lambda event" not in json.loads(body)["error"]["message"]    # the app's answer, not the gateway's
