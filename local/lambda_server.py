"""A local AWS Lambda Invoke API (POST /2015-03-31/functions/{name}/invocations).

moto cannot run Lambda code without Docker, so the local stack serves the Invoke
API itself and runs registered Python handlers in-process: the app's own
`@app.lambda_function` handlers and the example team graders. boto3 reaches it
through AWS_ENDPOINT_URL_LAMBDA, exactly as it would reach AWS.

As strict as Lambda's synchronous Invoke: a request payload over 6 MB (6,291,456 bytes) is a
413 RequestTooLargeException before any code runs; a payload that is not JSON is a 400
InvalidRequestContentException; a result over Lambda's response limit (6,291,556 bytes, the
figure Lambda's own error names) becomes a `Function.ResponseSizeTooLarge` function error.
"""
from __future__ import annotations

import json
import traceback
import urllib.parse
import uuid
from collections.abc import Callable

from flask import Flask, Response, request

Handler = Callable[[object, object], object]

# Lambda quotas for a synchronous (RequestResponse) invocation. The request limit is exactly
# 6 MiB; the response limit is 100 bytes more, as Lambda's own error message says.
MAX_REQUEST_BYTES = 6 * 1024 * 1024                  # 6,291,456
MAX_RESPONSE_BYTES = 6 * 1024 * 1024 + 100           # 6,291,556


class _Context:
    function_name = "local"
    aws_request_id = "local-invoke"

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 300_000


def _service_error(status: int, error_type: str, body: dict, request_id: str) -> Response:
    """An Invoke API error (not a function error): botocore raises it as ClientError `error_type`."""
    return Response(json.dumps(body, separators=(",", ":")), status=status,
                    headers={"x-amzn-ErrorType": error_type, "x-amzn-RequestId": request_id,
                             "Content-Type": "application/json"})


def _function_error(body: dict, request_id: str) -> Response:
    """A function error: HTTP 200, X-Amz-Function-Error, the error object as the payload."""
    return Response(json.dumps(body), status=200, headers={
        "X-Amz-Function-Error": "Unhandled", "X-Amz-Executed-Version": "$LATEST", "x-amzn-RequestId": request_id,
        "Content-Type": "application/json"})


def create_app(functions: dict[str, Handler]) -> Flask:
    app = Flask("local-lambda")
    app.config["functions"] = functions

    @app.post("/2015-03-31/functions/<path:name>/invocations")
    def invoke(name: str):
        request_id = str(uuid.uuid4())
        payload = request.get_data()
        if len(payload) > MAX_REQUEST_BYTES:
            # botocore's model: RequestTooLargeException, HTTP 413, members Type and message.
            return _service_error(413, "RequestTooLargeException", {
                "Type": "User",
                "message": f"Request must be smaller than {MAX_REQUEST_BYTES} bytes for the InvokeFunction operation"},
                request_id)
        name = urllib.parse.unquote(name)
        short = name.split(":function:")[-1].split(":")[0] if ":function:" in name else name
        handler = app.config["functions"].get(short)
        if handler is None:
            return _service_error(404, "ResourceNotFoundException",
                                  {"Type": "User", "Message": f"Function not found: {name}"}, request_id)
        try:
            event = json.loads(payload or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            return _service_error(400, "InvalidRequestContentException", {
                "Type": "User", "message": f"Could not parse request body into json: {exc}"}, request_id)
        try:
            result = handler(event, _Context())
            body = json.dumps(result)
        except Exception as exc:  # noqa: BLE001 - reported the way Lambda reports handler errors
            return _function_error({"errorMessage": str(exc), "errorType": type(exc).__name__,
                                    "stackTrace": traceback.format_exc().splitlines()[-5:]}, request_id)
        if len(body.encode()) > MAX_RESPONSE_BYTES:
            return _function_error({
                "errorType": "Function.ResponseSizeTooLarge",
                "errorMessage": f"Response payload size exceeded maximum allowed payload size "
                                f"({MAX_RESPONSE_BYTES} bytes)."}, request_id)
        return Response(body, status=200, headers={"X-Amz-Executed-Version": "$LATEST",
                                                   "x-amzn-RequestId": request_id,
                                                   "Content-Type": "application/json"})

    return app


def app_functions() -> dict[str, Handler]:
    """The Chalice app's pure Lambda functions plus the example team graders."""
    from app import app as chalice_app  # imported late: needs the environment set
    from local.example_graders import FUNCTIONS

    functions: dict[str, Handler] = dict(FUNCTIONS)
    for fn in chalice_app.pure_lambda_functions:
        # Deployed as "<app>-<stage>-<name>"; accept both that and the bare name.
        functions[fn.name] = fn
        functions[f"{chalice_app.app_name}-local-{fn.name}"] = fn
    return functions
