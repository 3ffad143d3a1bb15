"""A local AWS Lambda Invoke API (POST /2015-03-31/functions/{name}/invocations).

moto cannot run Lambda code without Docker, so the local stack serves the Invoke
API itself and runs registered Python handlers in-process: the app's own
`@app.lambda_function` handlers and the example team graders. boto3 reaches it
through AWS_ENDPOINT_URL_LAMBDA, exactly as it would reach AWS.
"""
from __future__ import annotations

import json
import traceback
import urllib.parse
from typing import Callable

from flask import Flask, Response, request

Handler = Callable[[object, object], object]


class _Context:
    function_name = "local"
    aws_request_id = "local-invoke"

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 300_000


def create_app(functions: dict[str, Handler]) -> Flask:
    app = Flask("local-lambda")
    app.config["functions"] = functions

    @app.post("/2015-03-31/functions/<path:name>/invocations")
    def invoke(name: str):
        name = urllib.parse.unquote(name)
        short = name.split(":function:")[-1].split(":")[0] if ":function:" in name else name
        handler = app.config["functions"].get(short)
        if handler is None:
            return Response(json.dumps({"Type": "User", "Message": f"Function not found: {name}"}),
                            status=404, headers={"x-amzn-ErrorType": "ResourceNotFoundException",
                                                 "Content-Type": "application/json"})
        try:
            event = json.loads(request.get_data() or b"null")
            result = handler(event, _Context())
            return Response(json.dumps(result), status=200, headers={"X-Amz-Executed-Version": "$LATEST"})
        except Exception as exc:  # noqa: BLE001 - reported the way Lambda reports handler errors
            body = {"errorMessage": str(exc), "errorType": type(exc).__name__,
                    "stackTrace": traceback.format_exc().splitlines()[-5:]}
            return Response(json.dumps(body), status=200, headers={"X-Amz-Function-Error": "Unhandled"})

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
