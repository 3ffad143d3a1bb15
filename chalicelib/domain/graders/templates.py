"""OpenAI grader templates: {{item.<field>}}, {{sample.output_text}}, {{sample.output_json.<path>}}.

Templates are compiled once per grader, so grading a sample is a few dict lookups.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from chalicelib.domain import numbers

_VAR = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_PATH = re.compile(r"^(item|sample)(\.[A-Za-z0-9_\-]+)+$")


class InvalidVariable(Exception):
    """A template names a field the sample or item does not have."""


class TemplateError(ValueError):
    """A template that can never render (bad syntax or namespace)."""


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    return json.dumps(value, sort_keys=True)


def _lookup(path: tuple[str, ...], name: str) -> Callable[[dict, dict], Any]:
    namespace, fields = path[0], path[1:]
    if namespace == "sample":
        if fields[0] == "output_text" and len(fields) == 1:
            return lambda item, sample: sample["output_text"]
        if fields[0] == "output_json":
            rest = fields[1:]

            def from_json(item, sample):
                value = sample.get("output_json")
                if value is None:
                    raise InvalidVariable(f"{name}: the sample is not valid JSON")
                return walk(value, rest, name)
            return from_json
        raise TemplateError(f"unsupported variable '{name}' (use sample.output_text or sample.output_json.<path>)")

    def from_item(item, sample):
        return walk(item, fields, name)
    return from_item


def walk(value: Any, fields: tuple[str, ...], name: str) -> Any:
    for field in fields:
        if isinstance(value, dict) and field in value:
            value = value[field]
        elif isinstance(value, list) and (index := numbers.ascii_int(field)) is not None and index < len(value):
            value = value[index]     # ASCII digits only: '²'.isdigit() is true but int('²') raises
        else:
            raise InvalidVariable(f"{name}: missing")
    return value


def compile_template(template: str) -> Callable[[dict, dict], str]:
    """Returns render(item, sample) -> str. Raises TemplateError for templates that cannot work."""
    if not isinstance(template, str):
        raise TemplateError("must be a string")
    parts: list[Any] = []
    pos = 0
    for match in _VAR.finditer(template):
        parts.append(template[pos:match.start()])
        name = match.group(1)
        if not _PATH.match(name):
            raise TemplateError(f"unsupported variable '{{{{{name}}}}}' (use item.<field>, sample.output_text "
                                "or sample.output_json.<path>)")
        parts.append(_lookup(tuple(name.split(".")), name))
        pos = match.end()
    parts.append(template[pos:])
    parts = [p for p in parts if p != ""]
    if not parts:
        return lambda item, sample: ""
    if len(parts) == 1:
        only = parts[0]
        if isinstance(only, str):
            return lambda item, sample: only
        return lambda item, sample: _text(only(item, sample))

    def render(item, sample):
        return "".join(p if isinstance(p, str) else _text(p(item, sample)) for p in parts)
    return render


def make_sample(output_text: str) -> dict:
    try:
        parsed = json.loads(output_text) if output_text and output_text.lstrip()[:1] in "{[" else None
    except ValueError:
        parsed = None
    return {"output_text": output_text, "output_json": parsed}
