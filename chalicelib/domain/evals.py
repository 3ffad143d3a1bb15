"""Evals in OpenAI's shapes (the Evals API) as rft-hub runs them: the request rules, testing
criteria and their pass thresholds, item schemas, input templates, a run's tallies, comparisons
between runs and promotion gates. Pure: no I/O (evaluation/evals.py does that)."""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic
from pydantic import Field

from chalicelib.domain import budget as budget_rules
from chalicelib.domain import numbers
from chalicelib.domain.graders.templates import InvalidVariable, TemplateError, compile_template, walk

TERMINAL = frozenset({"completed", "failed", "canceled"})
STATUSES = ("queued", "in_progress", "completed", "failed", "canceled")
MAX_CRITERIA = 20
MAX_ITEMS = 2000                       # items per run: a run's results are read whole to compare
MAX_FILE_CONTENT_BYTES = 256 * 1024    # an inline `file_content` is kept with the run (DynamoDB: 400 KB an item)
MAX_SCHEMA_BYTES = 64 * 1024
DEFAULT_MAX_COMPLETION_TOKENS = 1024   # always sent: every call is held to the budget at its worst case
MAX_COMPLETION_TOKENS = 16384
DEFAULT_INPUT = {"type": "item_reference", "item_reference": "item.messages"}
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "seed": 42}   # OpenAI's documented defaults
ROLES = ("system", "developer", "user", "assistant")


class EvalRuleError(ValueError):
    """A request that breaks a rule; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


# ---- request bodies ---------------------------------------------------------------------------

class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", defer_build=True)


class CreateEval(_Strict):
    name: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None
    data_source_config: dict[str, Any]
    testing_criteria: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_CRITERIA)


class UpdateEval(_Strict):
    name: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None


class CreateRun(_Strict):
    name: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None
    data_source: dict[str, Any]
    rft_max_usd: str | float | int | None = None    # rft-hub extra: the run's cost cap


def check_metadata(metadata: dict | None, param: str = "metadata") -> None:
    if metadata is None:
        return
    if len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
        raise EvalRuleError("metadata holds at most 16 pairs; keys up to 64 and values up to 512 characters.", param)


# ---- data source config (the item schema) ------------------------------------------------------

def check_data_source_config(cfg: dict) -> dict:
    """The config as stored: {"type": "custom", "item_schema", "include_sample_schema"}."""
    kind = cfg.get("type")
    if kind in ("logs", "stored_completions"):
        raise EvalRuleError(f"data_source_config.type '{kind}' needs stored completions, which rft-hub does not "
                            "keep; use 'custom' with an item_schema and run on a file.", "data_source_config.type")
    if kind != "custom":
        raise EvalRuleError("data_source_config.type must be 'custom'.", "data_source_config.type")
    extra = sorted(set(cfg) - {"type", "item_schema", "include_sample_schema"})
    if extra:
        raise EvalRuleError(f"Unknown field 'data_source_config.{extra[0]}'.", f"data_source_config.{extra[0]}")
    schema = cfg.get("item_schema")
    if not isinstance(schema, dict):
        raise EvalRuleError("data_source_config.item_schema must be a JSON Schema object.",
                            "data_source_config.item_schema")
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise EvalRuleError(f"data_source_config.item_schema is larger than {MAX_SCHEMA_BYTES:,} bytes.",
                            "data_source_config.item_schema")
    problem = _schema_problem(schema, "data_source_config.item_schema")
    if problem:
        raise EvalRuleError(problem[0], problem[1])
    sample = cfg.get("include_sample_schema", False)
    if not isinstance(sample, bool):
        raise EvalRuleError("data_source_config.include_sample_schema must be a boolean.",
                            "data_source_config.include_sample_schema")
    return {"type": "custom", "item_schema": schema, "include_sample_schema": sample}


SAMPLE_SCHEMA = {"type": "object", "properties": {
    "model": {"type": "string"}, "choices": {"type": "array"}, "output_text": {"type": "string"}}}


def config_view(cfg: dict) -> dict:
    """OpenAI's EvalCustomDataSourceConfig: the schema of what a run's rows look like."""
    props = {"item": cfg["item_schema"]}
    required = ["item"]
    if cfg.get("include_sample_schema"):
        props["sample"] = SAMPLE_SCHEMA
        required.append("sample")
    return {"type": "custom", "schema": {"type": "object", "properties": props, "required": required}}


# A small, dependency-free subset of JSON Schema for item schemas: type (or a list of types),
# properties, required, additionalProperties (false or a schema), items, enum, minLength/maxLength,
# minimum/maximum, minItems/maxItems. Other keywords are accepted and not checked.
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _schema_problem(schema: Any, path: str, depth: int = 0) -> tuple[str, str] | None:
    if depth > 32:
        return f"'{path}' is nested too deep", path
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return f"'{path}' must be a JSON Schema object", path
    kinds = schema.get("type")
    for kind in (kinds if isinstance(kinds, list) else [kinds] if kinds is not None else []):
        if kind not in (*_TYPES, "number", "integer"):
            return f"'{path}.type' must be a JSON Schema type, got {kind!r}", f"{path}.type"
    for name, sub in (schema.get("properties") or {}).items() if isinstance(schema.get("properties"), dict) else ():
        found = _schema_problem(sub, f"{path}.properties.{name}", depth + 1)
        if found:
            return found
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            found = _schema_problem(schema[key], f"{path}.{key}", depth + 1)
            if found:
                return found
    required = schema.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        return f"'{path}.required' must be a list of names", f"{path}.required"
    return None


def _is_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or \
            isinstance(value, float) and value.is_integer()
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    expected = _TYPES.get(kind)
    return expected is not None and isinstance(value, expected) and not (expected is not bool and
                                                                          isinstance(value, bool))


def schema_errors(schema: Any, value: Any, path: str = "item", depth: int = 0) -> list[str]:
    """What in `value` breaks `schema` (the subset above), each naming its path; [] if it conforms."""
    if schema is False:
        return [f"{path}: not allowed"]
    if not isinstance(schema, dict) or depth > 32:
        return []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if not any(_is_type(value, k) for k in kinds):
            return [f"{path}: must be {' or '.join(kinds)}"]
    out: list[str] = []
    if "enum" in schema and isinstance(schema["enum"], list) and value not in schema["enum"]:
        out.append(f"{path}: must be one of {schema['enum']}")
    if isinstance(value, str):
        if isinstance(schema.get("minLength"), int) and len(value) < schema["minLength"]:
            out.append(f"{path}: shorter than {schema['minLength']}")
        if isinstance(schema.get("maxLength"), int) and len(value) > schema["maxLength"]:
            out.append(f"{path}: longer than {schema['maxLength']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(schema.get("minimum"), (int, float)) and value < schema["minimum"]:
            out.append(f"{path}: below {schema['minimum']}")
        if isinstance(schema.get("maximum"), (int, float)) and value > schema["maximum"]:
            out.append(f"{path}: above {schema['maximum']}")
    if isinstance(value, dict):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        for name in schema.get("required") or []:
            if name not in value:
                out.append(f"{path}.{name}: required")
        for name, sub in value.items():
            if name in props:
                out.extend(schema_errors(props[name], sub, f"{path}.{name}", depth + 1))
            elif schema.get("additionalProperties") is False:
                out.append(f"{path}.{name}: not allowed")
            elif isinstance(schema.get("additionalProperties"), dict):
                out.extend(schema_errors(schema["additionalProperties"], sub, f"{path}.{name}", depth + 1))
    if isinstance(value, list):
        if isinstance(schema.get("minItems"), int) and len(value) < schema["minItems"]:
            out.append(f"{path}: fewer than {schema['minItems']} items")
        if isinstance(schema.get("maxItems"), int) and len(value) > schema["maxItems"]:
            out.append(f"{path}: more than {schema['maxItems']} items")
        if isinstance(schema.get("items"), dict):
            for i, sub in enumerate(value):
                out.extend(schema_errors(schema["items"], sub, f"{path}[{i}]", depth + 1))
    return out


# ---- testing criteria -------------------------------------------------------------------------

@dataclass
class Criterion:
    name: str
    type: str
    spec: dict                 # the grader spec rft-hub compiles (without pass_threshold)
    threshold: float
    stored: dict               # as sent, with its name filled in (what the Eval object shows)


def _number(value: Any, param: str) -> float:
    number = numbers.to_float(value)     # a 401-digit int is refused here, not an OverflowError
    if number is None:
        raise EvalRuleError(f"'{param}' must be a finite number (at most 38 digits).", param)
    return number


def default_threshold(spec: dict) -> float:
    """string_check: a match (1); score_model: the middle of its range; multi and lambda: 0.5."""
    if spec.get("type") == "score_model":
        rng = spec.get("range") if isinstance(spec.get("range"), list) and len(spec["range"]) == 2 else [0, 1]
        lo, hi = numbers.to_float(rng[0]), numbers.to_float(rng[1])
        return 0.5 if lo is None or hi is None else lo + (hi - lo) / 2
    return 1.0 if spec.get("type") == "string_check" else 0.5


def check_criteria(raw: list[dict]) -> list[Criterion]:
    """Each criterion is a grader rft-hub runs (string_check, text_similarity, score_model, multi,
    lambda) plus its pass threshold; names are filled in and must be unique (gates name them)."""
    out: list[Criterion] = []
    seen: set[str] = set()
    for i, criterion in enumerate(raw):
        param = f"testing_criteria[{i}]"
        if not isinstance(criterion, dict):
            raise EvalRuleError(f"'{param}' must be an object.", param)
        kind = criterion.get("type")
        if kind == "label_model":
            raise EvalRuleError(f"'{param}.type': label_model is not supported; use score_model with a pass_threshold.",
                                f"{param}.type")
        name = criterion.get("name")
        if name is None:
            name = kind if isinstance(kind, str) and kind not in seen else f"{kind}_{i}"
        if not isinstance(name, str) or not 1 <= len(name) <= 128:
            raise EvalRuleError(f"'{param}.name' must be a string of 1-128 characters.", f"{param}.name")
        if name in seen:
            raise EvalRuleError(f"Two testing criteria are named '{name}'; names must be unique.", f"{param}.name")
        seen.add(name)
        spec = {k: v for k, v in criterion.items() if k != "pass_threshold"}
        spec["name"] = name
        if kind == "text_similarity" and "pass_threshold" not in criterion:
            raise EvalRuleError(f"'{param}.pass_threshold' is required for text_similarity.", f"{param}.pass_threshold")
        threshold = _number(criterion["pass_threshold"], f"{param}.pass_threshold") \
            if "pass_threshold" in criterion else default_threshold(spec)
        out.append(Criterion(name, str(kind), spec, threshold, {**criterion, "name": name}))
    return out


def criteria_from_stored(stored: list[dict]) -> list[Criterion]:
    return check_criteria(stored)


# ---- run data sources ---------------------------------------------------------------------------

SAMPLING_KEYS = {"temperature", "max_completion_tokens", "top_p", "seed", "reasoning_effort", "response_format",
                 "tools"}


@dataclass
class DataSource:
    type: str                                 # completions | jsonl
    source: dict                              # {"type": "file_id", "id"} | {"type": "file_content", "content"}
    model: str | None = None
    input_messages: dict = field(default_factory=lambda: dict(DEFAULT_INPUT))
    sampling: dict = field(default_factory=dict)

    @property
    def max_completion_tokens(self) -> int:
        return int(self.sampling.get("max_completion_tokens") or DEFAULT_MAX_COMPLETION_TOKENS)


def _check_source(source: Any, kind: str) -> dict:
    param = "data_source.source"
    if not isinstance(source, dict):
        raise EvalRuleError(f"'{param}' must be an object.", param)
    stype = source.get("type")
    if stype == "file_id":
        if set(source) - {"type", "id"} or not isinstance(source.get("id"), str) or not source["id"]:
            raise EvalRuleError("A file source is {\"type\": \"file_id\", \"id\": <file id>}.", f"{param}.id")
        return {"type": "file_id", "id": source["id"]}
    if stype == "file_content":
        content = source.get("content")
        if set(source) - {"type", "content"} or not isinstance(content, list) or not content:
            raise EvalRuleError("A file_content source is {\"type\": \"file_content\", \"content\": [{\"item\": {...}}, "
                                "...]} with at least one row.", f"{param}.content")
        if len(content) > MAX_ITEMS:
            raise EvalRuleError(f"A run takes at most {MAX_ITEMS:,} items.", f"{param}.content")
        if len(json.dumps(content)) > MAX_FILE_CONTENT_BYTES:
            raise EvalRuleError(f"file_content is larger than {MAX_FILE_CONTENT_BYTES // 1024} KB; upload the rows as a "
                                "file and use {\"type\": \"file_id\"}.", f"{param}.content")
        for i, row in enumerate(content):
            if not isinstance(row, dict) or not isinstance(row.get("item"), dict) or set(row) - {"item", "sample"}:
                raise EvalRuleError(f"'{param}.content[{i}]' must be {{\"item\": {{...}}}} (and \"sample\" for jsonl).",
                                    f"{param}.content[{i}]")
            if kind == "jsonl" and sample_text(row.get("sample")) is None:
                raise EvalRuleError(f"'{param}.content[{i}].sample' must carry the output (output_text, or choices "
                                    "with a message).", f"{param}.content[{i}].sample")
        return {"type": "file_content", "content": content}
    if stype == "stored_completions":
        raise EvalRuleError("stored_completions sources need stored completions, which rft-hub does not keep.",
                            f"{param}.type")
    raise EvalRuleError(f"'{param}.type' must be 'file_id' or 'file_content'.", f"{param}.type")


def _content_text(content: Any, param: str) -> str:
    """A template message's text: a string, an input_text/output_text part, or a list of them."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict) and content.get("type") in ("input_text", "output_text", "text") \
            and isinstance(content.get("text"), str):
        return content["text"]
    if isinstance(content, list) and content:
        return "".join(_content_text(part, param) for part in content)
    raise EvalRuleError(f"'{param}' must be text (a string or input_text parts); images and audio are not supported.",
                        param)


def check_input_messages(raw: Any) -> dict:
    param = "data_source.input_messages"
    if raw is None:
        return dict(DEFAULT_INPUT)
    if not isinstance(raw, dict):
        raise EvalRuleError(f"'{param}' must be an object.", param)
    if raw.get("type") == "item_reference":
        ref = raw.get("item_reference")
        if set(raw) - {"type", "item_reference"} or not isinstance(ref, str) or not ref.startswith("item.") \
                or len(ref) < 6:
            raise EvalRuleError(f"'{param}.item_reference' must name an item field, e.g. \"item.messages\".",
                                f"{param}.item_reference")
        return {"type": "item_reference", "item_reference": ref}
    if raw.get("type") == "template":
        template = raw.get("template")
        if set(raw) - {"type", "template"} or not isinstance(template, list) or not template:
            raise EvalRuleError(f"'{param}.template' must list at least one message.", f"{param}.template")
        for i, msg in enumerate(template):
            mparam = f"{param}.template[{i}]"
            if not isinstance(msg, dict) or msg.get("role") not in ROLES or set(msg) - {"role", "content", "type"}:
                raise EvalRuleError(f"'{mparam}' must be a message with a role ({', '.join(ROLES)}) and content.", mparam)
            text = _content_text(msg.get("content"), f"{mparam}.content")
            if re.search(r"\{\{\s*sample\.", text):
                raise EvalRuleError(f"'{mparam}.content': the sample does not exist yet when the input is built; use "
                                    "{{item.<field>}} only.", f"{mparam}.content")
            try:
                compile_template(text)
            except TemplateError as exc:
                raise EvalRuleError(f"'{mparam}.content': {exc}.", f"{mparam}.content") from None
        return {"type": "template", "template": template}
    raise EvalRuleError(f"'{param}.type' must be 'template' or 'item_reference'.", f"{param}.type")


def check_sampling(raw: Any) -> dict:
    param = "data_source.sampling_params"
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise EvalRuleError(f"'{param}' must be an object.", param)
    extra = sorted(set(raw) - SAMPLING_KEYS)
    if extra:
        raise EvalRuleError(f"Unknown sampling parameter '{extra[0]}'.", f"{param}.{extra[0]}")
    out = {k: v for k, v in raw.items() if v is not None}
    bad = numbers.request_problem(out)   # seed (int64), temperature, top_p... as the gateway bounds them
    if bad is not None:
        raise EvalRuleError(f"'{param}.{bad[0]}' {bad[1]}.", f"{param}.{bad[0]}")
    for name, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        if name in out:
            value = _number(out[name], f"{param}.{name}")
            if not lo <= value <= hi:
                raise EvalRuleError(f"'{param}.{name}' must be between {lo} and {hi}.", f"{param}.{name}")
    if "max_completion_tokens" in out:
        cap = out["max_completion_tokens"]
        if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= MAX_COMPLETION_TOKENS:
            raise EvalRuleError(f"'{param}.max_completion_tokens' must be an integer from 1 to "
                                f"{MAX_COMPLETION_TOKENS:,}.", f"{param}.max_completion_tokens")
    if "seed" in out and (isinstance(out["seed"], bool) or not isinstance(out["seed"], int)):
        raise EvalRuleError(f"'{param}.seed' must be an integer.", f"{param}.seed")
    if "reasoning_effort" in out and not isinstance(out["reasoning_effort"], str):
        raise EvalRuleError(f"'{param}.reasoning_effort' must be a string.", f"{param}.reasoning_effort")
    if "response_format" in out and not isinstance(out["response_format"], dict):
        raise EvalRuleError(f"'{param}.response_format' must be an object.", f"{param}.response_format")
    if "tools" in out and not isinstance(out["tools"], list):
        raise EvalRuleError(f"'{param}.tools' must be a list.", f"{param}.tools")
    return out


def check_data_source(raw: dict) -> DataSource:
    kind = raw.get("type")
    if kind == "responses":
        raise EvalRuleError("data_source.type 'responses' is not supported; use 'completions' (rft-hub samples the "
                            "model through chat completions) or 'jsonl'.", "data_source.type")
    if kind == "jsonl":
        extra = sorted(set(raw) - {"type", "source"})
        if extra:
            raise EvalRuleError(f"Unknown field 'data_source.{extra[0]}' for a jsonl data source.",
                                f"data_source.{extra[0]}")
        return DataSource("jsonl", _check_source(raw.get("source"), "jsonl"))
    if kind != "completions":
        raise EvalRuleError("data_source.type must be 'completions' or 'jsonl'.", "data_source.type")
    extra = sorted(set(raw) - {"type", "source", "model", "input_messages", "sampling_params"})
    if extra:
        raise EvalRuleError(f"Unknown field 'data_source.{extra[0]}'.", f"data_source.{extra[0]}")
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise EvalRuleError("data_source.model is required: a base model, a tuned model, a checkpoint or an alias.",
                            "data_source.model")
    return DataSource("completions", _check_source(raw.get("source"), "completions"), model,
                      check_input_messages(raw.get("input_messages")), check_sampling(raw.get("sampling_params")))


def data_source_view(ds: DataSource) -> dict:
    if ds.type == "jsonl":
        return {"type": "jsonl", "source": ds.source}
    return {"type": "completions", "source": ds.source, "model": ds.model, "input_messages": ds.input_messages,
            "sampling_params": {**SAMPLING_DEFAULTS, **ds.sampling, "max_completion_tokens": ds.max_completion_tokens}}


def data_source_from_stored(stored: dict) -> DataSource:
    if stored.get("type") == "jsonl":
        return DataSource("jsonl", stored["source"])
    sampling = {k: v for k, v in (stored.get("sampling_params") or {}).items()}
    return DataSource("completions", stored["source"], stored.get("model"),
                      stored.get("input_messages") or dict(DEFAULT_INPUT), sampling)


def split_row(row: Any) -> tuple[dict, dict | None]:
    """A data row as (item, sample): OpenAI's {"item": ..., "sample": ...} lines, or an rft-hub
    dataset row (messages, reference_answer, ...), which is the item itself."""
    if not isinstance(row, dict):
        raise EvalRuleError("a row must be a JSON object")
    if isinstance(row.get("item"), dict) and not set(row) - {"item", "sample"}:
        return row["item"], row.get("sample") if isinstance(row.get("sample"), dict) else None
    sample = row.get("sample") if isinstance(row.get("sample"), dict) else None
    return ({k: v for k, v in row.items() if k != "sample"} if sample is not None else row), sample


def sample_text(sample: Any) -> str | None:
    """The output text of a given sample (jsonl): output_text, choices[0].message.content, or the
    last output message's content."""
    if not isinstance(sample, dict):
        return None
    if isinstance(sample.get("output_text"), str):
        return sample["output_text"]
    choices = sample.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        content = (choices[0].get("message") or {}).get("content")
        if isinstance(content, str):
            return content
    output = sample.get("output")
    if isinstance(output, list) and output and isinstance(output[-1], dict) and isinstance(output[-1].get("content"), str):
        return output[-1]["content"]
    return None


def input_renderer(input_messages: dict) -> Callable[[dict], list[dict]]:
    """render(item) -> chat messages; raises InvalidVariable for a missing item field."""
    if input_messages.get("type") == "item_reference":
        path = tuple(input_messages["item_reference"].split(".")[1:])

        def by_reference(item: dict) -> list[dict]:
            value = walk(item, path, input_messages["item_reference"])
            if not isinstance(value, list) or not value or not all(
                    isinstance(m, dict) and m.get("role") in ROLES for m in value):
                raise InvalidVariable(f"{input_messages['item_reference']}: not a list of chat messages")
            return [{"role": m["role"], "content": _content_text(m.get("content"), "content")} for m in value]
        return by_reference
    compiled = [(m["role"], compile_template(_content_text(m.get("content"), "content")))
                for m in input_messages["template"]]
    return lambda item: [{"role": role, "content": render(item, {})} for role, render in compiled]


def cap_micro(run: CreateRun) -> int | None:
    """The run's cost cap in micro-dollars: `rft_max_usd` or metadata["rft_max_usd"]; None if unset."""

    raw = run.rft_max_usd
    param = "rft_max_usd"
    if raw is None and run.metadata and "rft_max_usd" in run.metadata:
        raw, param = run.metadata["rft_max_usd"], "metadata.rft_max_usd"
    if raw is None:
        return None
    try:
        return budget_rules.to_micro(raw, budget_rules.MAX_BUDGET_MICRO)
    except ValueError as exc:
        raise EvalRuleError(f"'{param}': {exc}.", param) from None


# ---- a run's tallies ----------------------------------------------------------------------------

class Tally:
    """Result counts, per-criterion passes and mean scores, per-model usage and cost, from the
    stored items (each counted once)."""

    def __init__(self, names: list[str]):
        self.names = names
        self.counts = {"total": 0, "errored": 0, "failed": 0, "passed": 0}
        self.per = {n: {"passed": 0, "failed": 0, "errored": 0, "sum": 0.0, "graded": 0} for n in names}
        self.usage: dict[str, list[int]] = {}
        self.cost_micro = 0

    def add(self, status: str, errored: bool, results: list[dict], usage: dict, cost_micro: int) -> None:
        self.counts["total"] += 1
        self.counts["errored" if errored else "passed" if status == "pass" else "failed"] += 1
        for r in results:
            per = self.per.get(r.get("name"))
            if per is None:
                continue
            per["passed" if r.get("passed") else "failed"] += 1
            per["errored"] += 1 if r.get("rft_errors") else 0
            per["sum"] += float(r.get("score") or 0.0)
            per["graded"] += 1
        for model, (calls, prompt, completion, cached) in (usage or {}).items():
            have = self.usage.setdefault(model, [0, 0, 0, 0])
            for i, v in enumerate((calls, prompt, completion, cached)):
                have[i] += int(v)
        self.cost_micro += int(cost_micro or 0)

    def summary(self) -> dict:
        per = [{"testing_criteria": n, "passed": p["passed"], "failed": p["failed"],
                "rft_mean_score": round(p["sum"] / p["graded"], 6) if p["graded"] else None,
                "rft_errored": p["errored"]} for n, p in self.per.items()]
        usage = [{"model_name": m, "invocation_count": u[0], "prompt_tokens": u[1], "completion_tokens": u[2],
                  "total_tokens": u[1] + u[2], "cached_tokens": u[3]} for m, u in sorted(self.usage.items())]
        return {"result_counts": dict(self.counts), "per_testing_criteria_results": per, "per_model_usage": usage,
                "cost_micro": self.cost_micro}


def means(summary: dict) -> dict[str, float | None]:
    return {p["testing_criteria"]: p.get("rft_mean_score") for p in (summary or {}).get("per_testing_criteria_results", [])}


def pass_rates(summary: dict) -> dict[str, float | None]:
    out = {}
    for p in (summary or {}).get("per_testing_criteria_results", []):
        n = p["passed"] + p["failed"]
        out[p["testing_criteria"]] = round(p["passed"] / n, 6) if n else None
    return out


# ---- comparisons ------------------------------------------------------------------------------

def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 6)


def compare_summaries(a: dict, b: dict) -> list[dict]:
    """Per criterion: mean score and pass rate of run a and run b, and b - a."""
    ma, mb, pa, pb = means(a), means(b), pass_rates(a), pass_rates(b)
    names = list(dict.fromkeys([*ma, *mb]))
    return [{"testing_criteria": n, "a_mean_score": ma.get(n), "b_mean_score": mb.get(n),
             "delta_mean_score": _delta(ma.get(n), mb.get(n)), "a_pass_rate": pa.get(n), "b_pass_rate": pb.get(n),
             "delta_pass_rate": _delta(pa.get(n), pb.get(n))} for n in names]


def disagreements(a: dict[int, dict], b: dict[int, dict], limit: int) -> list[dict]:
    """Items both runs graded, ordered by how much they disagree: the sum over criteria of the
    score differences, a pass/fail flip counting one more. `a`/`b`: index -> {"status", "scores"}."""
    out = []
    for index in sorted(set(a) & set(b)):
        sa, sb = a[index]["scores"], b[index]["scores"]
        names = list(dict.fromkeys([*sa, *sb]))
        distance = sum(abs((sb.get(n) or 0.0) - (sa.get(n) or 0.0)) for n in names)
        distance += 1.0 if a[index]["status"] != b[index]["status"] else 0.0
        if distance <= 0:
            continue
        out.append({"datasource_item_id": index, "disagreement": round(distance, 6),
                    "a": a[index], "b": b[index],
                    "delta_scores": {n: _delta(sa.get(n), sb.get(n)) for n in names}})
    out.sort(key=lambda d: (-d["disagreement"], d["datasource_item_id"]))
    return out[:limit]


# ---- promotion gates ----------------------------------------------------------------------------

def check_gate(raw: Any, criterion_names: list[str]) -> dict:
    """{"eval_id", "criteria": {name: min mean score}, "no_worse_than_current": bool}."""
    param = "gate"
    if not isinstance(raw, dict):
        raise EvalRuleError("gate must be an object: {\"eval_id\", \"criteria\": {<criterion>: <min score>}, "
                            "\"no_worse_than_current\": true|false}.", param)
    extra = sorted(set(raw) - {"eval_id", "criteria", "no_worse_than_current"})
    if extra:
        raise EvalRuleError(f"Unknown field 'gate.{extra[0]}'.", f"gate.{extra[0]}")
    criteria = raw.get("criteria") or {}
    if not isinstance(criteria, dict):
        raise EvalRuleError("gate.criteria must map criterion names to minimum mean scores.", "gate.criteria")
    out = {}
    for name, minimum in criteria.items():
        if name not in criterion_names:
            raise EvalRuleError(f"The eval has no testing criterion '{name}' (it has: {', '.join(criterion_names)}).",
                                f"gate.criteria.{name}")
        out[name] = _number(minimum, f"gate.criteria.{name}")
    worse = raw.get("no_worse_than_current", False)
    if not isinstance(worse, bool):
        raise EvalRuleError("gate.no_worse_than_current must be a boolean.", "gate.no_worse_than_current")
    if not out and not worse:
        raise EvalRuleError("A gate needs criteria with minimum scores, no_worse_than_current, or both.", param)
    return {"eval_id": raw.get("eval_id"), "criteria": out, "no_worse_than_current": worse}


def gate_failures(gate: dict, target: dict, baseline: dict | None) -> tuple[list[str], dict]:
    """What keeps a move from passing the gate (empty: it passes), and the comparison per
    criterion (the target's mean score, the minimum, the current model's score and the delta)."""
    failures = []
    tm = means(target)
    bm = means(baseline) if baseline is not None else {}
    names = list(dict.fromkeys([*gate["criteria"], *(tm if gate["no_worse_than_current"] else [])]))
    comparison = {}
    for name in names:
        score = tm.get(name)
        entry = {"score": score}
        if name in gate["criteria"]:
            entry["min_score"] = gate["criteria"][name]
            if score is None or score < gate["criteria"][name]:
                failures.append(f"criterion '{name}' scored {_fmt(score)}, below the gate's minimum "
                                f"{gate['criteria'][name]:g}")
        if gate["no_worse_than_current"] and baseline is not None:
            entry["current_score"] = bm.get(name)
            entry["delta"] = _delta(bm.get(name), score)
            if bm.get(name) is not None and (score is None or score < bm[name]):
                failures.append(f"criterion '{name}' scored {_fmt(score)}, worse than the current model's "
                                f"{_fmt(bm[name])}")
        comparison[name] = entry
    return failures, comparison


def _fmt(value: float | None) -> str:
    return "no score" if value is None else f"{value:.4f}"
