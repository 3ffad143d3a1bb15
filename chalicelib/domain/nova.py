"""Amazon Nova reinforcement fine-tuning through Bedrock's native control plane. Pure.

* The job request: hyperparameters in OpenAI's names (and rft-hub's, where OpenAI has none)
  checked against the ranges of AWS's own service model (botocore `RFTHyperParameters`) and
  mapped to `customizationConfig.rftConfig` of `CreateModelCustomizationJob`.
* Names Bedrock needs (job, custom model, deployment, idempotency token), each within the
  pattern botocore's model gives it.
* The native status of a job (`GetModelCustomizationJob`) as an OpenAI job status.
* The training metrics Bedrock writes to the job's output prefix
  (`training_artifacts/step_wise_training_metrics.csv`) as OpenAI `metrics` job events.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import re
from dataclasses import dataclass

from chalicelib.domain import numbers
from chalicelib.errors import InvalidRequest

# Models trained through the native API (shared docs §4: Nova 2 Lite only, us-east-1).
NOVA_PREFIX = "amazon.nova"
NOVA_RFT_MODELS = ("amazon.nova-2-lite-v1:0:256k",)
CUSTOMIZATION_TYPE = "REINFORCEMENT_FINE_TUNING"

# learningRate = learning_rate_multiplier x BASE_LEARNING_RATE. Bedrock publishes no service
# default (UNCONFIRMED); 1e-5 is what AWS's own nova-forge-sdk sends for RFT LoRA on Bedrock
# (recipe/templates/bedrock/override/rft_lora.json), so a multiplier of 1 means "AWS's default".
BASE_LEARNING_RATE = 1e-5
LEARNING_RATE_RANGE = (1e-7, 1e-3)          # botocore RFTLearningRate


def is_nova(model: str | None) -> bool:
    """Trained and served through Bedrock's native API (CreateModelCustomizationJob, Converse)."""
    return isinstance(model, str) and model.startswith(NOVA_PREFIX)


# ---- hyperparameters ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Hyper:
    native: str                       # the RFTHyperParameters member
    kind: type                        # int | float | str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    open_weight: bool = False         # also accepted (with its own range) for open-weight models


# OpenAI's names where OpenAI has one, rft-hub's otherwise. Ranges are botocore's (2023-04-20
# model); maxPromptLength and inferenceMaxTokens have none there, so only "a positive integer".
HYPERPARAMETERS: dict[str, Hyper] = {
    "n_epochs": Hyper("epochCount", int, 1, 50, open_weight=True),
    "batch_size": Hyper("batchSize", int, 16, 512, open_weight=True),
    "learning_rate_multiplier": Hyper("learningRate", float, LEARNING_RATE_RANGE[0] / BASE_LEARNING_RATE,
                                      LEARNING_RATE_RANGE[1] / BASE_LEARNING_RATE, open_weight=True),
    "reasoning_effort": Hyper("reasoningEffort", str, choices=("low", "medium", "high")),
    "eval_interval": Hyper("evalInterval", int, 1, 100),
    "samples_per_prompt": Hyper("trainingSamplePerPrompt", int, 2, 16),
    "max_prompt_length": Hyper("maxPromptLength", int, 1, None),
    "inference_max_tokens": Hyper("inferenceMaxTokens", int, 1, None),
}
NOVA_ONLY = frozenset(name for name, h in HYPERPARAMETERS.items() if not h.open_weight)
# Open-weight (Mantle) hyperparameters with no native equivalent: none today (all three Mantle
# documents map to epochCount, batchSize, learningRate). Kept as the table the check reads.
OPEN_WEIGHT_ONLY: frozenset[str] = frozenset()
# OpenAI's own "let the service choose" values: not sent.
UNSET = {"auto", "default"}


def _param(name: str) -> str:
    return f"method.reinforcement.hyperparameters.{name}"


def check_hyperparameters(hp: dict) -> dict:
    """The validated hyperparameters of a Nova job, in the request's names (values chosen by
    the service -- "auto" -- are left out). Raises InvalidRequest naming the field."""
    if not isinstance(hp, dict):
        raise InvalidRequest("hyperparameters must be an object.", param="method.reinforcement.hyperparameters")
    out: dict = {}
    for name, value in hp.items():
        param = _param(name)
        if name in OPEN_WEIGHT_ONLY:
            raise InvalidRequest(f"Hyperparameter '{name}' applies to open-weight models only; Amazon Nova "
                                 f"takes: {', '.join(HYPERPARAMETERS)}.", param=param)
        spec = HYPERPARAMETERS.get(name)
        if spec is None:
            raise InvalidRequest(f"Hyperparameter '{name}' is not supported by Amazon Bedrock RFT for Amazon Nova; "
                                 f"supported: {', '.join(HYPERPARAMETERS)}.", param=param)
        if value is None or (isinstance(value, str) and value in UNSET):
            continue
        if spec.kind is str:
            if value not in spec.choices:
                raise InvalidRequest(f"'{name}' must be one of {', '.join(spec.choices)} or 'auto'; got {value!r}.",
                                     param=param)
            out[name] = value
            continue
        value = numbers.finite(value, integer=spec.kind is int)   # a 401-digit int: 400, not OverflowError
        if value is None:
            raise InvalidRequest(f"'{name}' must be {'an integer' if spec.kind is int else 'a number'} "
                                 "(finite, at most 38 digits) or 'auto'.",
                                 param=param)
        lo, hi = spec.lo, spec.hi
        # a relative tolerance: 0.01 x 1e-5 must pass as 1e-7 despite binary floating point
        if (lo is not None and value < lo * (1 - 1e-9)) or (hi is not None and value > hi * (1 + 1e-9)):
            where = f"between {_num(lo)} and {_num(hi)}" if hi is not None else f"at least {_num(lo)}"
            extra = (f" (x {BASE_LEARNING_RATE:g} base learning rate = learningRate {LEARNING_RATE_RANGE[0]:g} to "
                     f"{LEARNING_RATE_RANGE[1]:g})") if name == "learning_rate_multiplier" else ""
            raise InvalidRequest(f"'{name}' must be {where} for Amazon Nova{extra}; got {value}.", param=param)
        out[name] = int(value) if spec.kind is int else float(value)
    return out


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def refuse_nova_only(hp: dict) -> None:
    """For an open-weight (Mantle) job: a Nova-only hyperparameter is a 400 naming it."""
    for name in hp or {}:
        if name in NOVA_ONLY:
            raise InvalidRequest(f"Hyperparameter '{name}' is not supported by Amazon Bedrock's OpenAI-compatible "
                                 f"RFT for open-weight models; it applies to Amazon Nova models only "
                                 f"({', '.join(NOVA_RFT_MODELS)}).", param=_param(name))


def rft_hyperparameters(validated: dict) -> dict:
    """`RFTHyperParameters` (native types, not strings) from validated request values."""
    out: dict = {}
    for name, value in validated.items():
        spec = HYPERPARAMETERS[name]
        if name == "learning_rate_multiplier":
            lo, hi = LEARNING_RATE_RANGE
            value = min(hi, max(lo, float(f"{value * BASE_LEARNING_RATE:.12g}")))
        out[spec.native] = value
    return out


def bedrock_method(lambda_arn: str, validated: dict) -> dict:
    """What a Nova job sends to CreateModelCustomizationJob besides names, data and role."""
    return {"customizationType": CUSTOMIZATION_TYPE, "customizationConfig": {"rftConfig": {
        "graderConfig": {"lambdaGrader": {"lambdaArn": lambda_arn}},
        "hyperParameters": rft_hyperparameters(validated)}}}


# ---- names -------------------------------------------------------------------------------------

JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9+\-.])*")
MODEL_NAME = re.compile(r"([0-9a-zA-Z][_-]?){1,63}")
TOKEN = re.compile(r"[a-zA-Z0-9]([-a-zA-Z0-9]{0,254}[a-zA-Z0-9])?")


def _plain(text: str, limit: int) -> str:
    """Letters and digits with single dashes: fits every Bedrock name pattern above."""
    cleaned = re.sub(r"-{2,}", "-", re.sub(r"[^a-zA-Z0-9-]", "-", text)).strip("-")
    return (cleaned[:limit].rstrip("-")) or "rfthub"


def job_name(job_id: str) -> str:
    return _plain(job_id, 63)


def custom_model_name(job_id: str) -> str:
    return _plain(job_id, 63)


def request_token(*parts: str) -> str:
    """A clientRequestToken: the same for a retried create, so Bedrock creates it once."""
    return "rfthub-" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]


def arn_tail(arn: str) -> str:
    return (arn or "").rsplit("/", 1)[-1]


def tuned_model_id(base_model: str, custom_model_arn: str) -> str:
    """rft-hub's id of a Nova custom model: slash-free (it is a path segment in /v1/models/{id}),
    unique per account (the ARN's 12-character id)."""
    return f"{base_model}:ft:{arn_tail(custom_model_arn)}"


def deployment_name(custom_model_arn: str, generation: int = 1) -> str:
    name = f"rfthub-{arn_tail(custom_model_arn)}"
    return name if generation <= 1 else f"{name}-{generation}"


# ---- status ------------------------------------------------------------------------------------

def job_status(native: dict) -> str:
    """An OpenAI job status for a GetModelCustomizationJob answer. InProgress is refined by its
    sub-tasks where Bedrock fills them in (documented for distillation; UNCONFIRMED for RFT)."""
    status = native.get("status")
    if status != "InProgress":
        return status or ""
    details = native.get("statusDetails") or {}
    phase = lambda key: (details.get(key) or {}).get("status")   # noqa: E731 - a one-line reader, local to this function
    if phase("validationDetails") == "InProgress":
        return "validating_files"
    if phase("dataProcessingDetails") == "InProgress" or \
            (phase("validationDetails") == "Completed" and phase("trainingDetails") in (None, "NotStarted")):
        return "queued"
    return "running"


# ---- training metrics (S3 CSV -> metrics events) -----------------------------------------------

METRICS_FILE = "step_wise_training_metrics.csv"
# Documented columns are SFT's (step_number, epoch_number, training_loss, perplexity); RFT's are
# UNCONFIRMED (an AWS SageMaker Nova RFT sample plots train_reward_mean, policy_entropy). Known
# names are also given the names Mantle's metrics events use, so the reward curve, Slack's
# sparkline and the registry read Nova jobs the same way; every column is kept as it is.
COLUMN_ALIASES = {
    "step_number": "step", "global_step": "step", "epoch_number": "epoch",
    "train_reward_mean": "critic_rewards_mean", "training_reward_mean": "critic_rewards_mean",
    "reward_mean": "critic_rewards_mean", "rewards_mean": "critic_rewards_mean", "mean_reward": "critic_rewards_mean",
    "train_reward_max": "critic_rewards_max", "reward_max": "critic_rewards_max",
    "train_reward_min": "critic_rewards_min", "reward_min": "critic_rewards_min",
    "policy_entropy": "actor_entropy", "entropy": "actor_entropy",
    "policy_loss": "actor_pg_loss", "pg_loss": "actor_pg_loss", "grad_norm": "actor_grad_norm",
    "advantages_mean": "critic_advantages_mean", "response_length": "response_length_mean",
    "mean_response_length": "response_length_mean",
}


def _value(text: str):
    text = text.strip()
    if text == "":
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return None
    return int(number) if number.is_integer() and re.fullmatch(r"[-+]?[0-9]+", text) else number


def parse_metrics_csv(text: str) -> list[dict]:
    """One dict per data row: every column with a value (numbers as numbers), plus the
    Mantle-style names of the columns it knows. Rows without any value are skipped."""
    rows = []
    reader = csv.DictReader(io.StringIO(text))
    for raw in reader:
        row: dict = {}
        for column, cell in raw.items():
            if column is None or cell is None:
                continue
            name = column.strip()
            value = _value(cell)
            if not name or value is None:
                continue
            row[name] = value
            alias = COLUMN_ALIASES.get(name.lower())
            if alias and alias not in row:
                row[alias] = value
        if row:
            rows.append(row)
    return rows


def metrics_event_id(job_key: str, index: int) -> str:
    """Stable per CSV row (the file only grows), so a re-read copies nothing twice."""
    return f"ftevent-nova-{hashlib.sha256(job_key.encode()).hexdigest()[:16]}-{index:06d}"


def metrics_events(job_key: str, rows: list[dict], created_at: int) -> list[dict]:
    """OpenAI `fine_tuning.job.event`s of type `metrics`, oldest first."""
    events = []
    for index, row in enumerate(rows):
        step = row.get("step", index + 1)
        total = row.get("total_steps")
        label = f"Step {step}/{total}" if total is not None else f"Step {step}"
        events.append({"id": metrics_event_id(job_key, index), "object": "fine_tuning.job.event",
                       "created_at": created_at, "level": "info", "message": f"{label}: training metrics",
                       "type": "metrics", "data": row})
    return events
