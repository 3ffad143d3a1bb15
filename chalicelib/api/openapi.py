"""GET /openapi.json: an OpenAPI 3.1 document of the app's routes, built from Chalice's route
table and what each `route()` declared; a route registered any other way has no description and
is left out, which a test catches."""
from __future__ import annotations

import re

from chalice import Blueprint

from chalicelib.api.http import Request, route

bp = Blueprint(__name__)

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
ERROR_STATUSES = ("400", "401", "403", "404", "409", "413", "415", "429", "500", "502", "503")
FILE_FORM = {"type": "object", "required": ["file", "purpose"], "properties": {
    "file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["fine-tune"]}}}
PART_FORM = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string", "format": "binary"}}}
SLACK_FORM = {"type": "object", "properties": {k: {"type": "string"} for k in
                                               ("team_id", "channel_id", "user_id", "command", "text", "response_url")}}
OPENAI_TAG = re.compile(r"^/v1/(files|uploads|fine_tuning|chat|responses|models)")


def _request_body(r: dict, components: dict) -> dict | None:
    if r["consumes"] == "multipart/form-data":
        form = PART_FORM if r["path"].endswith("/parts") else FILE_FORM
        return {"required": True, "content": {"multipart/form-data": {"schema": form}}}
    if r["consumes"] == "application/x-www-form-urlencoded":
        return {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": SLACK_FORM}}}
    if r["body"] is not None:
        schema = r["body"].model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[r["body"].__name__] = schema
        return {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{r['body'].__name__}"}}}}
    if r["json_body"]:
        return {"required": True, "content": {"application/json": {"schema": r["schema"] or {"type": "object"}}}}
    return None


def _operation(r: dict, components: dict) -> dict:
    params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
              for n in re.findall(r"{(\w+)}", r["path"])]
    params += [{"name": n, "in": "query", "required": False, "schema": {"type": t}} for n, t in r["query"].items()]
    success_content = {"application/json": {"schema": {"type": "object"}}} if r["produces"] == "application/json" \
        else {r["produces"]: {"schema": {"type": "string"}}}
    if r["produces"] == "text/event-stream":
        success_content["application/json"] = {"schema": {"type": "object"}}
    responses = {"200": {"description": "OK", "content": success_content}}
    if r["method"] == "post":
        responses["201"] = {"description": "Created", "content": {"application/json": {"schema": {"type": "object"}}}}
    for status in ERROR_STATUSES:
        responses[status] = {"description": "Error (OpenAI envelope)", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}}
    op = {"operationId": r["name"], "summary": r["summary"], "parameters": params, "responses": responses,
          "tags": ["openai-compatible" if OPENAI_TAG.match(r["path"]) else
                   ("admin" if "/admin/" in r["path"] else r["path"].split("/")[2] if r["path"].count("/") > 1
                    else "service")]}
    if r["auth"] is not None:
        op["security"] = [{"bearer": []}]
    body = _request_body(r, components)
    if body:
        op["requestBody"] = body
    return op


_cache: dict[int, dict] = {}


def document(app) -> dict:
    if id(app) in _cache:
        return _cache[id(app)]
    components: dict = {"Error": ERROR}
    paths: dict = {}
    for path, methods in sorted(app.routes.items()):
        for method, entry in sorted(methods.items()):
            meta = getattr(entry.view_function, "openapi", None)
            if meta is None:
                continue
            r = {**meta, "path": path, "method": method.lower()}
            paths.setdefault(path, {})[r["method"]] = _operation(r, components)
    doc = {"openapi": "3.1.0",
           "info": {"title": "rft-hub", "version": "1.0.0",
                    "description": "Reinforcement fine-tuning on Amazon Bedrock as a service: OpenAI-compatible "
                                   "files, fine-tuning jobs, graders, models and inference, plus rft-hub's own "
                                   "admin, usage, budget and Slack routes."},
           "servers": [{"url": "/"}], "paths": paths,
           "components": {"schemas": components,
                          "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
    _cache[id(app)] = doc
    return doc


@route(bp, "/openapi.json", auth=None)
def openapi(req: Request):
    """This document."""
    return document(bp.current_app)
