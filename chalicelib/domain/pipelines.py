"""Pipelines (issue #27), the pure part: a pipeline's spec as a team sends it, checked field by field
(every error names its field), the steps a run goes through and the statuses it ends in.

The spec: {"name", "dataset": {"file_id"} | {"prefix": true}, "job": <a fine-tuning job body without
training_file>, "eval": <a promotion gate: eval_id, criteria, no_worse_than_current, data_source,
min_items>, "target_alias", "approval": {"mode": "auto"} | {"mode": "slack", "approvers": [<Slack user
id>], "timeout_seconds"}, "triggers": {"schedule": "rate(...)" | "cron(...)", "new_data": bool,
"on_busy": "drop" | "queue"}}. What needs the store (the file, the grader, the eval) is checked by
chalicelib/pipelines/specs.py.
"""
from __future__ import annotations

import re
from typing import Any

from chalicelib.errors import InvalidRequest

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SLACK_USER_RE = re.compile(r"^[UW][A-Z0-9]{2,20}$")
# EventBridge Scheduler's expressions (rate: a positive whole number and a unit; cron: six fields).
RATE_RE = re.compile(r"^rate\((\d{1,6}) (minute|minutes|hour|hours|day|days)\)$")
CRON_RE = re.compile(r"^cron\(([^()\s]+ ){5}[^()\s]+\)$")
TOP_KEYS = {"name", "dataset", "job", "eval", "target_alias", "approval", "triggers", "metadata"}
MIN_APPROVAL_S, MAX_APPROVAL_S = 10, 7 * 86_400     # a run waits on a person at most a week
DEFAULT_APPROVAL_S = 86_400
MAX_APPROVERS = 20
RUN_METADATA_KEY = "rft_pipeline_run"   # on the run's job: which run it belongs to

# The run's steps, in order (the state machine's tasks: deploy/pipeline.asl.json).
STEPS = ("check_data", "preflight", "train", "evaluate", "gate", "approval", "promote", "notify")
# How a run ends; `dropped` is a trigger that came during a run of a pipeline that drops them.
ENDINGS = ("succeeded", "skipped_unchanged", "gate_failed", "rejected", "failed", "dropped")
ACTIVE = ("running", "awaiting_approval")


def _err(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def _obj(raw: Any, param: str, allowed: set[str]) -> dict:
    if not isinstance(raw, dict):
        raise _err(f"{param} must be an object.", param)
    extra = sorted(set(raw) - allowed)
    if extra:
        raise _err(f"Unknown field '{param}.{extra[0]}'.", f"{param}.{extra[0]}")
    return raw


def check_schedule(raw: Any, param: str = "triggers.schedule") -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not (RATE_RE.match(raw) or CRON_RE.match(raw)):
        raise _err("triggers.schedule must be an EventBridge Scheduler expression: 'rate(<n> minutes|hours|days)' "
                   "or 'cron(<minutes> <hours> <day-of-month> <month> <day-of-week> <year>)'.", param)
    rate = RATE_RE.match(raw)
    if rate and (int(rate.group(1)) < 1 or (rate.group(2).startswith("minute") and int(rate.group(1)) < 5)):
        raise _err("A pipeline runs at most every 5 minutes: rate(5 minutes) or slower.", param)
    return raw


def check_approval(raw: Any) -> dict:
    raw = _obj(raw if raw is not None else {"mode": "auto"}, "approval", {"mode", "approvers", "timeout_seconds"})
    mode = raw.get("mode")
    if mode == "auto":
        if raw.get("approvers"):
            raise _err("approval.approvers is only for mode 'slack'.", "approval.approvers")
        return {"mode": "auto"}
    if mode != "slack":
        raise _err("approval.mode must be 'auto' or 'slack'.", "approval.mode")
    approvers = raw.get("approvers")
    if not isinstance(approvers, list) or not approvers or len(approvers) > MAX_APPROVERS:
        raise _err(f"approval.approvers must list 1 to {MAX_APPROVERS} Slack user ids (e.g. 'U012AB3CD').",
                   "approval.approvers")
    for i, user in enumerate(approvers):
        if not isinstance(user, str) or not SLACK_USER_RE.match(user):
            raise _err("Each approver is a Slack user id such as 'U012AB3CD'.", f"approval.approvers[{i}]")
    timeout = raw.get("timeout_seconds", DEFAULT_APPROVAL_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not MIN_APPROVAL_S <= timeout <= MAX_APPROVAL_S:
        raise _err(f"approval.timeout_seconds must be a whole number from {MIN_APPROVAL_S} to {MAX_APPROVAL_S}.",
                   "approval.timeout_seconds")
    return {"mode": "slack", "approvers": sorted(set(approvers)), "timeout_seconds": timeout}


def check_triggers(raw: Any) -> dict:
    raw = _obj(raw if raw is not None else {}, "triggers", {"schedule", "new_data", "on_busy"})
    new_data = raw.get("new_data", False)
    if not isinstance(new_data, bool):
        raise _err("triggers.new_data must be true or false.", "triggers.new_data")
    on_busy = raw.get("on_busy", "drop")
    if on_busy not in ("drop", "queue"):
        raise _err("triggers.on_busy must be 'drop' or 'queue'.", "triggers.on_busy")
    return {"schedule": check_schedule(raw.get("schedule")), "new_data": new_data, "on_busy": on_busy}


def check_dataset(raw: Any) -> dict:
    raw = _obj(raw, "dataset", {"file_id", "prefix"})
    if ("file_id" in raw) == bool(raw.get("prefix")):
        raise _err("dataset is {\"file_id\": <file id>} or {\"prefix\": true} (the newest JSONL uploaded under "
                   "the pipeline's own prefix).", "dataset")
    if "file_id" in raw:
        if not isinstance(raw["file_id"], str) or not 1 <= len(raw["file_id"]) <= 200:
            raise _err("dataset.file_id must be a file id.", "dataset.file_id")
        return {"file_id": raw["file_id"]}
    if raw.get("prefix") is not True:
        raise _err("dataset.prefix must be true.", "dataset.prefix")
    return {"prefix": True}


def check_job(raw: Any) -> dict:
    """The job template's shape; its content is checked as a job body by the caller."""
    job = _obj(raw, "job", {"model", "method", "suffix", "metadata", "seed", "preflight", "sample_base", "watch",
                            "validation_file"})
    if "model" not in job or "method" not in job:
        raise _err("job must carry at least model and method, as a fine-tuning job does (without training_file: "
                   "each run uses its own data).", "job.model" if "model" not in job else "job.method")
    metadata = job.get("metadata") or {}
    if isinstance(metadata, dict) and (len(metadata) > 15 or RUN_METADATA_KEY in metadata):
        raise _err(f"job.metadata holds at most 15 pairs (each run adds '{RUN_METADATA_KEY}').", "job.metadata")
    return job


def _name(raw: Any, field: str) -> str:
    if not isinstance(raw, str) or not NAME_RE.match(raw):
        raise _err(f"{field} must be 1-63 lowercase letters, digits or '-', starting with a letter or digit.", field)
    return raw


def check_spec(raw: Any, *, partial: bool = False) -> dict:
    """The spec's fields checked for shape (partial: a PATCH, only the fields sent)."""
    body = _obj(raw, "body", TOP_KEYS)
    out: dict[str, Any] = {}
    if not partial or "name" in body:
        out["name"] = _name(body.get("name"), "name")
    if not partial or "dataset" in body:
        out["dataset"] = check_dataset(body.get("dataset"))
    if not partial or "job" in body:
        out["job"] = check_job(body.get("job"))
    if not partial or "eval" in body:
        if not isinstance(body.get("eval"), dict):
            raise _err("eval must be a gate: {\"eval_id\", \"criteria\", \"no_worse_than_current\", \"data_source\", "
                       "\"min_items\"} (as an alias's gate).", "eval")
        out["eval"] = body["eval"]
    if not partial or "target_alias" in body:
        out["target_alias"] = _name(body.get("target_alias"), "target_alias")
    if not partial or "approval" in body:
        out["approval"] = check_approval(body.get("approval"))
    if not partial or "triggers" in body:
        out["triggers"] = check_triggers(body.get("triggers"))
    if "metadata" in body:
        meta = body["metadata"]
        if meta is not None and (not isinstance(meta, dict) or len(meta) > 16 or any(
                not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 512
                for k, v in meta.items())):
            raise _err("metadata holds at most 16 string pairs; keys up to 64 and values up to 512 characters.",
                       "metadata")
        out["metadata"] = meta
    return out


def execution_input(team_id: str, pipeline_id: str, run_id: str, approval: dict) -> dict:
    """What a run's state machine execution starts with (deploy/pipeline.asl.json reads these paths)."""
    return {"team_id": team_id, "pipeline_id": pipeline_id, "run_id": run_id,
            "approval": {"mode": approval["mode"], "timeout_seconds": approval.get("timeout_seconds", DEFAULT_APPROVAL_S)},
            "results": {}}


def step_entry(name: str, now: int) -> dict:
    return {"name": name, "status": "running", "started_at": now, "ended_at": None, "detail": None}
