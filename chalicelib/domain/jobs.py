"""RFT jobs: the create request, its checks, the state machine and the cost estimate. Pure."""
from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import Field

from chalicelib.domain import nova, numbers, pricing
from chalicelib.errors import InvalidRequest

# ---- the create request ----------------------------------------------------------------------

# Bedrock documents only these three for OpenAI-compatible RFT. Ranges: UNCONFIRMED for Mantle;
# n_epochs mirrors the native epochCount (1-50); batch_size admits the notebooks' 4 and the native
# maximum 512; learning_rate_multiplier is a positive multiplier.
HYPERPARAMETER_RANGES = {
    "n_epochs": (int, 1, 50),
    "batch_size": (int, 1, 512),
    "learning_rate_multiplier": (float, 1e-6, 10.0),
}
UNSUPPORTED_OPENAI_HYPERPARAMETERS = {"eval_interval", "eval_samples", "reasoning_effort", "compute_multiplier"}


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", defer_build=True)


class Reinforcement(_Strict):
    grader: dict[str, Any]
    hyperparameters: dict[str, Any] | None = None
    # rft-hub extra, never sent to Bedrock: a second grader (typically a score_model judge with
    # another rubric) that the training watch runs on a sample of rollouts (docs/watch.md).
    audit_grader: dict[str, Any] | None = None


class Watch(_Strict):
    """rft-hub extra on the create request: what a critical finding of the training watch does."""
    on_critical: Literal["alert", "cancel"] = "alert"


class Method(_Strict):
    type: str
    reinforcement: Reinforcement | None = None
    supervised: dict | None = None
    dpo: dict | None = None


class SampleBase(_Strict):
    """Optional base-model sampling in a preflight: k responses per sampled prompt (metered)."""
    model: str | None = Field(default=None, min_length=1, max_length=256)   # default: the first RFT model
    k: int = Field(default=4, ge=2, le=16)
    max_usd: str = Field(default="1.00", min_length=1, max_length=20)
    prompts: int | None = Field(default=None, ge=1, le=50)                  # default: min(rows, 8)
    max_tokens: int = Field(default=512, ge=1, le=4096)


class CreateJob(_Strict):
    model: str = Field(min_length=1, max_length=200)
    training_file: str = Field(min_length=1, max_length=200)
    validation_file: str | None = Field(default=None, max_length=200)
    method: Method
    suffix: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$")
    metadata: dict[str, str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    hyperparameters: dict | None = None     # deprecated top-level form: refused with a pointer
    integrations: list | None = None        # not supported: refused
    preflight: Literal["block", "warn"] = "block"   # rft-hub extra (grader preflight)
    sample_base: SampleBase | None = None            # rft-hub extra: base-model sampling in that preflight
    watch: Watch | None = None                       # rft-hub extra (training watch)
    rft_eval: dict[str, Any] | None = None           # rft-hub extra: eval to run on success (evaluation/evals.py)


def check_create(req: CreateJob, allowed_models: tuple[str, ...]) -> dict:
    """Returns the validated hyperparameters; raises InvalidRequest naming the field."""
    if req.model not in allowed_models:
        raise InvalidRequest(f"Model '{req.model}' cannot be fine-tuned here. Allowed models: "
                             f"{', '.join(allowed_models)}.", param="model", code="model_not_allowed")
    if req.hyperparameters is not None:
        raise InvalidRequest("Top-level 'hyperparameters' is deprecated; pass them in "
                             "method.reinforcement.hyperparameters.", param="hyperparameters")
    if req.integrations:
        raise InvalidRequest("integrations are not supported by rft-hub.", param="integrations")
    if req.metadata is not None:
        if len(req.metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in req.metadata.items()):
            raise InvalidRequest("metadata holds at most 16 pairs; keys up to 64 and values up to 512 "
                                 "characters.", param="metadata")
    if req.method.type != "reinforcement":
        raise InvalidRequest(f"method.type must be 'reinforcement' (rft-hub runs reinforcement "
                             f"fine-tuning); got '{req.method.type}'.", param="method.type")
    if req.method.reinforcement is None:
        raise InvalidRequest("method.reinforcement is required.", param="method.reinforcement")
    hp = req.method.reinforcement.hyperparameters or {}
    if nova.is_nova(req.model):     # Bedrock's native API: its own names and ranges (domain/nova.py)
        return nova.check_hyperparameters(hp)
    nova.refuse_nova_only(hp)
    return check_hyperparameters(hp)


def check_hyperparameters(hp: dict) -> dict:
    out = {}
    for name, value in hp.items():
        param = f"method.reinforcement.hyperparameters.{name}"
        if name in UNSUPPORTED_OPENAI_HYPERPARAMETERS:
            raise InvalidRequest(f"Hyperparameter '{name}' is not supported by Amazon Bedrock RFT; "
                                 f"supported: {', '.join(HYPERPARAMETER_RANGES)}.", param=param)
        if name not in HYPERPARAMETER_RANGES:
            raise InvalidRequest(f"Unknown hyperparameter '{name}'; supported: "
                                 f"{', '.join(HYPERPARAMETER_RANGES)}.", param=param)
        if value == "auto":
            continue  # OpenAI's "let the service choose": simply not sent
        kind, lo, hi = HYPERPARAMETER_RANGES[name]
        value = numbers.finite(value, integer=kind is int)   # a 401-digit int: 400, not OverflowError
        if value is None:
            raise InvalidRequest(f"'{name}' must be {'an integer' if kind is int else 'a number'} "
                                 "(finite, at most 38 digits) or 'auto'.",
                                 param=param)
        if not lo <= value <= hi:
            raise InvalidRequest(f"'{name}' must be between {lo} and {hi}; got {value}.", param=param)
        out[name] = int(value) if kind is int else float(value)
    return out


def bedrock_method(lambda_arn: str, hyperparameters: dict, model: str | None = None) -> dict:
    """The method exactly as Bedrock documents it (sent via extra_body); for Amazon Nova, what
    CreateModelCustomizationJob takes (customizationType, customizationConfig.rftConfig)."""
    if nova.is_nova(model):
        return nova.bedrock_method(lambda_arn, hyperparameters)
    return {"type": "reinforcement", "reinforcement": {
        "grader": {"type": "lambda", "lambda": {"function": lambda_arn}},
        "hyperparameters": hyperparameters}}


# ---- the state machine -----------------------------------------------------------------------

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
_RANK = {"validating_files": 0, "queued": 1, "running": 2, "succeeded": 3, "failed": 3, "cancelled": 3}
STATUSES = tuple(_RANK)

# Native Bedrock statuses (EventBridge detail.jobStatus, GetModelCustomizationJob).
BEDROCK_NATIVE = {"InProgress": "running", "Completed": "succeeded", "Failed": "failed",
                  "Stopping": "running", "Stopped": "cancelled"}


def normalise_status(observed: str | None) -> str | None:
    """Maps a Bedrock status (OpenAI-style or native) onto rft-hub's; None if unknown."""
    if observed in _RANK:
        return observed
    if observed == "paused":  # newer OpenAI status; not a terminal state
        return "running"
    return BEDROCK_NATIVE.get(observed or "")


def transition(current: str, observed: str) -> str | None:
    """The next status, or None when `observed` changes nothing.

    Idempotent (the same status is a no-op), monotonic (never back to an earlier phase)
    and final (a terminal status never changes). Events and polling both use this.
    """
    if current in TERMINAL or observed not in _RANK or observed == current:
        return None
    if _RANK[observed] <= _RANK[current]:
        return None
    return observed


# ---- the cost estimate -----------------------------------------------------------------------

# Assumptions Bedrock does not publish (UNCONFIRMED): rollouts per prompt (native
# trainingSamplePerPrompt is 2-16) and response length. They are shown with the estimate.
SAMPLES_PER_PROMPT = 4
RESPONSE_TOKENS = 1024
DEFAULT_EPOCHS = 1


JUDGE_TEMPLATE_TOKENS = 200   # a judge prompt's own text around the rollout, per call


def estimate_cost(price: pricing.Price | None, rows: int, prompt_tokens: int, n_epochs: int | None,
                  judges: list[tuple[pricing.Price, int]] = (), samples_per_prompt: int | None = None) -> dict:
    """Rollout tokens at `price` (the effective price: admin override or the repository's), and
    the expected cost of the grader's LLM judges (one call per rollout per judge, at the judge's
    price, its full output cap). Judge calls are held and metered one by one as they happen, so
    only the rollouts are held for the job."""
    epochs = n_epochs or DEFAULT_EPOCHS
    samples = samples_per_prompt or SAMPLES_PER_PROMPT     # a Nova job may set it (trainingSamplePerPrompt)
    rollouts = rows * epochs * samples
    avg_prompt = prompt_tokens // rows if rows else 0
    input_tokens = rollouts * avg_prompt
    output_tokens = rollouts * RESPONSE_TOKENS
    estimate = {
        "formula": "rows x n_epochs x samples_per_prompt x (avg_prompt_tokens x input_rate + "
                   "response_tokens x output_rate)",
        "rows": rows, "n_epochs": epochs, "samples_per_prompt": samples,
        "avg_prompt_tokens": avg_prompt, "response_tokens": RESPONSE_TOKENS,
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "note": "Rollout tokens priced at the base model's on-demand rates: a lower bound, since Bedrock "
                "publishes no RFT training price (UNCONFIRMED). A team Lambda grader's own cost is extra.",
    }
    if price is None:
        return {**estimate, "priced": False, "estimated_micro_usd": None, "estimated_usd": None, "rates": None}
    micro = pricing.micro_usd(input_tokens, price.input) + pricing.micro_usd(output_tokens, price.output)
    judge_in = avg_prompt + RESPONSE_TOKENS + JUDGE_TEMPLATE_TOKENS
    judge = sum(rollouts * (pricing.micro_usd(judge_in, p.input) + pricing.micro_usd(cap, p.output))
                for p, cap in judges)
    estimate["judge"] = {"calls": rollouts * len(judges), "estimated_micro_usd": judge,
                         "estimated_usd": pricing.usd(judge),
                         "formula": "rollouts x judges x ((avg_prompt + response + template) tokens x input_rate "
                                    "+ output cap x output_rate)"}
    estimate["total_estimated_usd"] = pricing.usd(micro + judge)
    return {**estimate, "priced": True, "estimated_micro_usd": micro, "estimated_usd": pricing.usd(micro),
            "rates": {"input_usd_per_1m": str(price.input), "output_usd_per_1m": str(price.output),
                      "source": price.source, "indicative": price.indicative}}
