"""CloudWatch's embedded metric format, as a check for the lines rft-hub writes (tests/unit/test_metrics.py,
tests/stack/operating/)."""
from __future__ import annotations

import contextlib
import json
import math

import jsonschema

# CloudWatch's EMF specification (docs.aws.amazon.com, "Specification: Embedded metric format"), as a
# JSON Schema for the root node's `_aws` member; the references between members are checked below.
UNITS = ["Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes", "Terabytes",
         "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count", "Bytes/Second",
         "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second", "Terabytes/Second", "Bits/Second",
         "Kilobits/Second", "Megabits/Second", "Gigabits/Second", "Terabits/Second", "Count/Second", "None"]
EMF = {
    "type": "object", "required": ["_aws"],
    "properties": {"_aws": {
        "type": "object", "required": ["Timestamp", "CloudWatchMetrics"],
        "properties": {
            "Timestamp": {"type": "integer", "minimum": 0},
            "CloudWatchMetrics": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["Namespace", "Dimensions", "Metrics"],
                "properties": {
                    "Namespace": {"type": "string", "minLength": 1, "maxLength": 1024},
                    "Dimensions": {"type": "array", "items": {
                        "type": "array", "maxItems": 30, "uniqueItems": True,
                        "items": {"type": "string", "minLength": 1, "maxLength": 250}}},
                    "Metrics": {"type": "array", "maxItems": 100, "items": {
                        "type": "object", "required": ["Name"],
                        "properties": {"Name": {"type": "string", "minLength": 1, "maxLength": 1024},
                                       "Unit": {"enum": UNITS},
                                       "StorageResolution": {"enum": [1, 60]}}}}}}}}}}}


def check_emf(line: str) -> dict:
    """One line against the specification; returns the document."""
    doc = json.loads(line)
    jsonschema.validate(doc, EMF)
    for directive in doc["_aws"]["CloudWatchMetrics"]:
        for dim_set in directive["Dimensions"]:
            for name in dim_set:   # a declared dimension is a top-level string member
                assert isinstance(doc.get(name), str) and 1 <= len(doc[name]) <= 1024, (name, doc.get(name))
        for metric in directive["Metrics"]:   # a metric is a number, or an array of at most 100 numbers
            value = doc[metric["Name"]]
            values = value if isinstance(value, list) else [value]
            assert 1 <= len(values) <= 100
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    return doc


@contextlib.contextmanager
def captured():
    """The EMF lines chalicelib.metrics writes meanwhile (a LINE_SINK, as the local stack adds one)."""
    from chalicelib import metrics

    lines: list[str] = []
    metrics.LINE_SINKS.append(lines.append)
    try:
        yield lines
    finally:
        metrics.LINE_SINKS.remove(lines.append)
