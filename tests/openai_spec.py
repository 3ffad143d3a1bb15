"""OpenAI's published OpenAPI document as a test oracle (issue #13).

`validate(method, path, status, body)` checks a response body against the schema OpenAI's document
gives for that operation and status (an error status the operation does not list is checked against
`ErrorResponse`), and raises AssertionError listing every violation. Paths may be rft-hub's
(`/v1/fine_tuning/jobs/{job_id}` or a concrete `/v1/files/file-abc`) or OpenAI's; parameter names
do not matter, the shape of the template does.

The document says OpenAPI 3.1 but still carries OpenAPI 3.0 idioms; they are normalised to JSON
Schema Draft 2020-12 before validating, with the meaning OpenAI's own SDKs give them:
* `nullable: true` -> the schema also accepts null (beside `type`, on a `$ref`, or as the
  `{"nullable": true}` member of an `allOf`, which makes the whole `allOf` nullable);
* boolean `exclusiveMinimum`/`exclusiveMaximum` -> the numeric form (`minimum`/`maximum` moved);
* Draft 2019-09's `$recursiveRef: "#"` in a component -> a `$ref` to that component
  (`$recursiveAnchor` dropped): 2020-12 has no such keywords and would ignore them.

`EXTENSIONS` are rft-hub's documented additions to OpenAI's API (docs/api.md, "OpenAI API extensions"):
a strict check (the default) refuses them; `extensions=True` validates against OpenAI's schemas
with exactly those additions, which is also what rft-hub's own GET /openapi.json serves
(`write_trimmed` generates chalicelib/data/openai-schemas.json from this module).

Run as a script to regenerate that file: `.venv/bin/python tests/openai_spec.py`.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
from pathlib import Path

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

# ../shared is beside a checkout, not in it; RFT_SHARED_DIR points elsewhere (and lets a test prove the skip).
SHARED_DIR = Path(os.environ.get("RFT_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
SPEC_PATH = SHARED_DIR / "specs/openai-openapi.json"
TRIMMED_PATH = Path(__file__).resolve().parents[1] / "chalicelib/data/openai-schemas.json"
BASE_URI = "urn:openai-openapi"
ERROR_SCHEMA = "ErrorResponse"

# Keywords whose value is one schema, a list of schemas, or a map of name -> schema.
_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
        "unevaluatedProperties", "unevaluatedItems", "contentSchema")
_MANY = ("allOf", "anyOf", "oneOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Documentation only: dropped from the trimmed copy rft-hub serves (never from a property's name).
_DOC_KEYWORDS = {"description", "example", "examples", "title", "x-oaiMeta", "x-oaiTypeLabel", "x-oaiExpandable",
                 "x-oaiSupportedSDKs", "x-stainless-const", "x-stainless-naming", "x-stainless-go-variant-constructor",
                 "deprecated", "x-stainless-skip"}


# ---- normalisation (OpenAPI 3.0 idioms -> Draft 2020-12) ---------------------------------------

def _nullable_only(schema) -> bool:
    """An allOf member that only says `nullable: true` (plus documentation)."""
    return isinstance(schema, dict) and schema.get("nullable") is True and \
        not (set(schema) - {"nullable"} - _DOC_KEYWORDS)


def normalise(schema, *, strip_docs: bool = False, component: str | None = None):
    """A Draft 2020-12 copy of an OpenAPI 3.0-flavoured schema (see the module docstring);
    `component`: the name of the component schema it is (or is inside of)."""
    if isinstance(schema, list):
        return [normalise(s, strip_docs=strip_docs, component=component) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if strip_docs and (key in _DOC_KEYWORDS or key.startswith("x-")):
            continue
        if key in _ONE and isinstance(value, dict):
            out[key] = normalise(value, strip_docs=strip_docs, component=component)
        elif key in _MANY and isinstance(value, list):
            out[key] = [normalise(v, strip_docs=strip_docs, component=component) for v in value]
        elif key in _MAP and isinstance(value, dict):
            out[key] = {name: normalise(v, strip_docs=strip_docs, component=component) for name, v in value.items()}
        elif key == "$recursiveAnchor":
            continue
        elif key == "$recursiveRef" and value == "#" and component:
            out["$ref"] = f"#/components/schemas/{component}"
        else:
            out[key] = copy.deepcopy(value)      # data: enum, default, const, required, discriminator ...
    nullable = out.pop("nullable", None) is True
    if isinstance(out.get("allOf"), list) and any(_nullable_only(m) for m in schema["allOf"]):
        out["allOf"] = [normalise(m, strip_docs=strip_docs, component=component) for m in schema["allOf"]
                        if not _nullable_only(m)]
        nullable = True
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if isinstance(out.get(exclusive), bool):
            if out.pop(exclusive) and bound in out:
                out[exclusive] = out.pop(bound)
    if nullable:
        if "type" in out and not any(k in out for k in ("$ref", "allOf", "anyOf", "oneOf")):
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = types + ([] if "null" in types else ["null"])
            if isinstance(out.get("enum"), list) and None not in out["enum"]:
                out["enum"] = out["enum"] + [None]
        else:
            docs = {k: out.pop(k) for k in list(out) if k in _DOC_KEYWORDS}
            out = {"anyOf": [out, {"type": "null"}], **docs}
    return out


def require_spec() -> Path:
    """SPEC_PATH, or the current test skips (one folded line naming the file) when it is missing on a
    clone without ../shared; under CI=true a missing document is a failure, never a silent skip."""
    if SPEC_PATH.is_file():
        return SPEC_PATH
    import pytest

    message = f"OpenAI's OpenAPI document is missing: {SPEC_PATH}"
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{message} (required when CI=true)", pytrace=False)
    pytest.skip(message)


@functools.cache
def document() -> dict:
    """OpenAI's document, its component schemas normalised (every reader of it comes through here)."""
    doc = json.loads(require_spec().read_text())
    doc["components"]["schemas"] = {name: normalise(s, component=name)
                                    for name, s in doc["components"]["schemas"].items()}
    return doc


# ---- rft-hub's documented extensions --------------------------------------------------------------

GRADER_LAMBDA = {"type": "object", "required": ["type", "lambda"], "properties": {
    "type": {"type": "string", "enum": ["lambda"]}, "name": {"type": "string"},
    "lambda": {"type": "object", "required": ["function"], "properties": {"function": {"type": "string"}}}}}
GRADER_SAVED = {"type": "object", "required": ["type", "id"], "additionalProperties": False, "properties": {
    "type": {"type": "string", "enum": ["saved"]}, "id": {"type": "string"}, "version": {"type": "integer"}}}

# The request-side extensions `apply_extensions` patches in, by their row in docs/api.md's "OpenAI API
# extensions" table (a test checks each has one) -> what it adds.
EXTENSIONS = {
    "`lambda` grader": "a grader {\"type\": \"lambda\", \"lambda\": {\"function\": <ARN>}} where a job's "
                       "grader goes, and in graders/validate",
    "saved grader": "a job's grader may be {\"type\": \"saved\", \"id\", \"version\"}",
    "`multi` grader's named map": "a multi grader's `graders` may be a map of name -> grader",
    "`batch_size` above 256": "reinforcement `batch_size` 1-512 (OpenAI: 1-256)",
    "`evals` file purpose": "a File's `purpose` may be \"evals\" (OpenAI's files.create takes it; its File "
                            "object's enum omits it)",
}


def _grader_variants(schemas: dict) -> list:
    return schemas["FineTuneReinforcementMethod"]["properties"]["grader"]["oneOf"]


def apply_extensions(schemas: dict) -> dict:
    """OpenAI's component schemas (normalised) with rft-hub's EXTENSIONS patched in."""
    out = copy.deepcopy(schemas)
    out["GraderLambda"] = GRADER_LAMBDA
    out["GraderSaved"] = GRADER_SAVED
    lam, saved = {"$ref": "#/components/schemas/GraderLambda"}, {"$ref": "#/components/schemas/GraderSaved"}
    _grader_variants(out).extend([lam, saved])
    out["ValidateGraderResponse"]["properties"]["grader"]["oneOf"].append(lam)
    multi = out["GraderMulti"]["properties"]
    single = multi["graders"]
    multi["graders"] = {"oneOf": [single, {"type": "object", "minProperties": 1, "additionalProperties": {
        "type": "object", "oneOf": [{"$ref": "#/components/schemas/GraderStringCheck"},
                                    {"$ref": "#/components/schemas/GraderTextSimilarity"},
                                    {"$ref": "#/components/schemas/GraderScoreModel"},
                                    {"$ref": "#/components/schemas/GraderLabelModel"}]}}]}
    purpose = out["OpenAIFile"]["properties"]["purpose"]
    purpose["enum"] = [*purpose["enum"], "evals"]
    for holder in (out["FineTuneReinforcementHyperparameters"]["properties"]["batch_size"],
                   out["FineTuningJob"]["properties"]["hyperparameters"]["properties"]["batch_size"]):
        for node in _walk(holder):
            if node.get("type") == "integer" and node.get("maximum") == 256:
                node["maximum"] = 512
    return out


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


@functools.cache
def _registry(extensions: bool) -> Registry:
    doc = document()
    if extensions:
        doc = {**doc, "components": {**doc["components"], "schemas": apply_extensions(doc["components"]["schemas"])}}
    return Registry().with_resource(BASE_URI, Resource.from_contents(doc, default_specification=DRAFT202012))


# ---- operations ---------------------------------------------------------------------------------

def _template(path: str) -> str:
    path = path.split("?", 1)[0]
    if path.startswith("/v1/"):
        path = path[3:]
    return re.sub(r"{[^}]+}", "{}", path)


@functools.cache
def _operations() -> dict:
    """(method, template with `{}` for each parameter) -> OpenAI's operation."""
    ops = {}
    for path, methods in document()["paths"].items():
        if "?" in path:
            continue        # OpenAI's `?beta=true` variants
        for method, op in methods.items():
            if isinstance(op, dict) and "responses" in op:
                ops[(method.lower(), _template(path))] = op
    return ops


def operation(method: str, path: str, *, concrete: bool = True) -> tuple[str, dict]:
    """(OpenAI's template, operation) for an rft-hub or OpenAI path, template or (`concrete`)
    concrete: `/v1/files/file-abc` is `/files/{file_id}`."""
    method, template = method.lower(), _template(path)
    ops = _operations()
    if (method, template) in ops:
        return template, ops[(method, template)]
    for (m, t), op in ops.items() if concrete else ():        # a concrete path: each `{}` is one segment
        if m == method and re.fullmatch(re.escape(t).replace(r"\{\}", "[^/]+"), template):
            return t, op
    raise KeyError(f"OpenAI's document has no operation {method.upper()} {path}")


def _resolve_response(response: dict) -> dict:
    ref = response.get("$ref")
    if ref:
        return document()["components"]["responses"][ref.rsplit("/", 1)[1]]
    return response


def response_schema(method: str, path: str, status: int, content_type: str = "application/json") -> dict | None:
    """The schema OpenAI's document gives the body (None: the document gives no JSON schema,
    e.g. a file's raw content). An error status the operation does not list: ErrorResponse."""
    _, op = operation(method, path)
    response = op["responses"].get(str(status)) or op["responses"].get("default")
    if response is None:
        if status >= 400:
            return {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}
        raise AssertionError(f"OpenAI's document has no {status} answer for {method.upper()} {path}")
    content = _resolve_response(response).get("content") or {}
    media = content.get(content_type.split(";")[0].strip())
    return normalise(media["schema"]) if media and "schema" in media else None


@functools.cache
def _validator(schema_json: str, extensions: bool) -> Draft202012Validator:
    schema = json.loads(schema_json)
    for node in _walk(schema):       # an inline schema's refs point into OpenAI's document
        if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
            node["$ref"] = BASE_URI + node["$ref"]
    return Draft202012Validator(schema, registry=_registry(extensions))


def _errors(schema: dict, body, extensions: bool) -> list[str]:
    validator = _validator(json.dumps(schema, sort_keys=True), extensions)
    found = []
    for err in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path)):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path) or "(body)"
        detail = err.message if len(err.message) < 300 else err.message[:300] + "..."
        if err.context:   # oneOf/anyOf: say what the closest alternative missed
            best = best_match(err.context)
            detail += f" [closest: {'.'.join(map(str, best.absolute_path))}: {best.message[:200]}]"
        found.append(f"{where}: {detail}")
    return found


def errors(method: str, path: str, status: int, body, content_type: str = "application/json",
           *, extensions: bool = False) -> list[str]:
    schema = response_schema(method, path, status, content_type)
    if schema is None:
        return []
    return _errors(schema, body, extensions)


def validate(method: str, path: str, status: int, body, content_type: str = "application/json",
             *, extensions: bool = False) -> None:
    """Raises AssertionError listing every way `body` differs from OpenAI's document."""
    found = errors(method, path, status, body, content_type, extensions=extensions)
    assert not found, f"{method.upper()} {path} -> {status} does not match OpenAI's document:\n  " + \
        "\n  ".join(found)


def validate_component(name: str, body, *, extensions: bool = False) -> None:
    found = _errors({"$ref": f"#/components/schemas/{name}"}, body, extensions)
    assert not found, f"not a valid {name}:\n  " + "\n  ".join(found)


# ---- the trimmed copy rft-hub serves in its own GET /openapi.json -----------------------------------

def _refs(node, found: set) -> None:
    for n in _walk(node):
        ref = n.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])


def trimmed(routes: list[tuple[str, str, str]]) -> dict:
    """For rft-hub's (method, path, content type produced) routes: OpenAI's success answer for each
    (`operations`: "METHOD /v1/path" -> {"200": {content type: schema}}, in the content types the
    route produces: a streamed chat completion is also JSON, a file's raw content is neither), and
    the component schemas those reference and nothing else (`schemas`, plus ErrorResponse),
    normalised, without documentation, with rft-hub's EXTENSIONS applied. Deterministic (sorted),
    so a test can compare it with the committed copy."""
    schemas = apply_extensions(document()["components"]["schemas"])
    operations = {}
    for method, path, produces in sorted(routes):
        try:
            _, op = operation(method, path, concrete=False)   # /v1/models/aliases is no model id
        except KeyError:
            continue
        wanted = {"application/json", "text/event-stream"} if produces == "text/event-stream" else {produces}
        content = _resolve_response(op["responses"].get("200", {})).get("content") or {}
        media = {ct: normalise(m["schema"], strip_docs=True) for ct, m in sorted(content.items())
                 if "schema" in m and ct in wanted}
        if media:
            operations[f"{method.upper()} {path}"] = {"200": media}
    wanted, todo = set(), set()
    _refs(operations, todo)
    todo.add(ERROR_SCHEMA)
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        _refs(schemas[name], todo)
    return {"source": "OpenAI's OpenAPI document (shared/specs/openai-openapi.json), trimmed by "
                      "tests/openai_spec.py; regenerate with `.venv/bin/python tests/openai_spec.py`",
            "extensions": sorted(EXTENSIONS),
            "operations": operations,
            "schemas": {name: normalise(schemas[name], strip_docs=True, component=name) for name in sorted(wanted)}}


def app_routes() -> list[tuple[str, str, str]]:
    """rft-hub's OpenAI-shaped routes as (method, path, content type produced); the app is imported:
    call after the environment is set."""
    from app import app
    from chalicelib.api.openapi import OPENAI_TAG

    return sorted((method.lower(), path, getattr(entry.view_function, "openapi", {}).get("produces", ""))
                  for path, methods in app.routes.items() for method, entry in methods.items()
                  if OPENAI_TAG.match(path))


def render(data: dict) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n"


def write_trimmed() -> Path:
    TRIMMED_PATH.write_text(render(trimmed(app_routes())))
    return TRIMMED_PATH


if __name__ == "__main__":
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from local.harness import configure_environment

    configure_environment()
    if not SPEC_PATH.is_file():
        sys.exit(f"OpenAI's OpenAPI document is missing: {SPEC_PATH}")
    path = write_trimmed()
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
