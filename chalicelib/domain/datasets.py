"""Streaming validation of RFT training data (JSONL, OpenAI chat format).

Each line: a JSON object with `messages` (non-empty list of {role, content},
ending with the prompt turn, i.e. a user message), optional `reference_answer`
(string or object), optional string `id`, and any extra fields (kept: graders
read them). Bedrock requires 100-20,000 rows in a training file.

The validator sees one line at a time, so a file of any size is checked in
constant memory (apart from the set of ids, used to flag duplicates).

A file uploaded with purpose "evals" holds OpenAI's eval rows instead: each line
{"item": {...}} with an optional "sample": {...} (a given output, for jsonl runs), nothing else;
an eval run takes at most EVAL_MAX_ROWS of them.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from chalicelib.domain import numbers

MIN_ROWS = 100
MAX_ROWS = 20_000
EVAL_MAX_ROWS = 2000   # domain/evals.MAX_ITEMS: items per eval run
FINE_TUNE, EVALS = "fine-tune", "evals"
MAX_REPORTED_ERRORS = 20
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_CHARS_PER_TOKEN = 4  # rough, model-independent estimate
MAX_JSON_DEPTH = 64   # arrays/objects inside one another; chat rows and API bodies need far fewer


class JsonDepthError(ValueError):
    """JSON nested deeper than MAX_JSON_DEPTH."""


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON (use a number or null)")


def _depth_over(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return False


def parse_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads for untrusted input, shared by request bodies and dataset lines: refuses NaN and
    Infinity (not JSON) and nesting deeper than `max_depth`, and never raises RecursionError.
    Raises ValueError: json.JSONDecodeError for syntax, JsonDepthError for depth, a plain ValueError
    for NaN/Infinity (UnicodeDecodeError for undecodable bytes)."""
    too_deep = JsonDepthError(f"nested deeper than the limit of {max_depth} levels of arrays and objects")
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=numbers.json_float)   # 1e400: refused
    except RecursionError:
        raise too_deep from None
    opened = text.count(b"[") + text.count(b"{") if isinstance(text, bytes) else text.count("[") + text.count("{")
    if opened > max_depth and isinstance(value, (dict, list)) and _depth_over(value, max_depth):
        raise too_deep
    return value


def iter_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Splits a stream of byte chunks into lines (without the newline)."""
    pending = b""
    for chunk in chunks:
        if not chunk:
            continue
        pending += chunk
        lines = pending.split(b"\n")
        pending = lines.pop()
        yield from lines
    if pending:
        yield pending


def _content_chars(content) -> int | None:
    """Length of a message's text, or None when the content is not text."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # content parts; RFT is text-only
        total = 0
        for part in content:
            if not (isinstance(part, dict) and part.get("type") in ("text", "input_text")
                    and isinstance(part.get("text"), str)):
                return None
            total += len(part["text"])
        return total
    return None


def check_row(row) -> tuple[str | None, int]:
    """(error or None, characters of prompt text) for one parsed line."""
    if not isinstance(row, dict):
        return "line is not a JSON object", 0
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list", 0
    chars = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            return f"messages[{i}] is not an object", 0
        role = msg.get("role")
        if role not in ROLES:
            return f"messages[{i}].role must be one of {sorted(ROLES)}", 0
        n = _content_chars(msg.get("content"))
        if n is None:
            return f"messages[{i}].content must be a string or a list of text parts", 0
        chars += n
    if messages[-1].get("role") != "user":
        return "the last message must be the prompt turn (role 'user'); the model writes the answer", 0
    ref = row.get("reference_answer")
    if ref is not None and not isinstance(ref, (str, dict)):
        return "'reference_answer' must be a string or an object", 0
    row_id = row.get("id")
    if row_id is not None and not isinstance(row_id, str):
        return "'id' must be a string", 0
    return None, chars


def check_eval_row(row) -> tuple[str | None, int]:
    """(error or None, characters of the item's JSON) for one parsed line of an evals file."""
    if not isinstance(row, dict):
        return "line is not a JSON object", 0
    if not isinstance(row.get("item"), dict):
        return "'item' must be an object (an eval row is {\"item\": {...}} with an optional \"sample\")", 0
    extra = sorted(set(row) - {"item", "sample"})
    if extra:
        return f"unknown field {extra[0]!r}: an eval row has only 'item' and 'sample'", 0
    if "sample" in row and not isinstance(row["sample"], dict):
        return "'sample' must be an object", 0
    return None, len(json.dumps(row["item"]))


class DatasetValidator:
    def __init__(self, max_errors: int = MAX_REPORTED_ERRORS, purpose: str = FINE_TUNE) -> None:
        self.purpose = purpose
        self.max_errors = max_errors
        self.rows = 0
        self.bytes = 0
        self.chars = 0
        self.error_count = 0
        self.errors: list[dict] = []
        self.line_no = 0
        self._ids: set[str] = set()
        self.duplicate_ids = 0
        self.with_reference = 0

    def _error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < self.max_errors:
            self.errors.append({"line": self.line_no, "message": message})

    def feed(self, line: bytes) -> None:
        self.line_no += 1
        self.bytes += len(line) + 1
        if not line.strip():
            self._error("empty line")
            return
        try:
            row = parse_json(line.decode("utf-8"))  # decode first: json.loads(bytes) would accept UTF-16/32
        except UnicodeDecodeError:
            self._error("line is not valid UTF-8")
            return
        except json.JSONDecodeError as exc:
            self._error(f"invalid JSON: {exc.msg} at column {exc.colno}")
            return
        except JsonDepthError as exc:
            self._error(f"line is {exc}")
            return
        except ValueError as exc:   # NaN, Infinity
            self._error(f"invalid JSON: {exc}")
            return
        problem, chars = (check_eval_row if self.purpose == EVALS else check_row)(row)
        if problem:
            self._error(problem)
            return
        self.rows += 1
        self.chars += chars
        if row.get("reference_answer") is not None or self.purpose == EVALS:
            self.with_reference += 1
        row_id = row.get("id")
        if row_id is not None:
            if row_id in self._ids:
                self.duplicate_ids += 1
            else:
                self._ids.add(row_id)

    def report(self) -> dict:
        if self.purpose == EVALS:
            return self._eval_report()
        warnings = []
        within = MIN_ROWS <= self.rows <= MAX_ROWS
        if not within:
            warnings.append(f"Bedrock RFT needs {MIN_ROWS}-{MAX_ROWS} training rows; this file has "
                            f"{self.rows}. It cannot be used as a training_file.")
        if self.duplicate_ids:
            warnings.append(f"{self.duplicate_ids} rows repeat an 'id' used earlier in the file.")
        if self.rows and self.with_reference < self.rows:
            warnings.append(f"{self.rows - self.with_reference} rows have no 'reference_answer'.")
        return {
            "valid": self.error_count == 0 and self.rows > 0,
            "rows": self.rows,
            "bytes": self.bytes,
            "estimated_tokens": self.chars // _CHARS_PER_TOKEN,
            "error_count": self.error_count,
            "errors": self.errors,
            "warnings": warnings,
            "training_row_limits": {"min": MIN_ROWS, "max": MAX_ROWS, "ok": within},
        }


    def _eval_report(self) -> dict:
        within = self.rows <= EVAL_MAX_ROWS
        warnings = [] if within else [f"An eval run takes at most {EVAL_MAX_ROWS} items; this file has {self.rows}."]
        return {"valid": self.error_count == 0 and self.rows > 0, "rows": self.rows, "bytes": self.bytes,
                "estimated_tokens": self.chars // _CHARS_PER_TOKEN, "error_count": self.error_count,
                "errors": self.errors, "warnings": warnings,
                "eval_row_limits": {"max": EVAL_MAX_ROWS, "ok": within}}


def validate(chunks: Iterable[bytes], purpose: str = FINE_TUNE) -> dict:
    validator = DatasetValidator(purpose=purpose)
    for line in iter_lines(chunks):
        validator.feed(line)
    if validator.line_no == 0:
        validator._error("file is empty")
    return validator.report()
