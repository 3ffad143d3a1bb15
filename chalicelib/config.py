"""Settings, read from the environment once per process.

Every deployment difference lives in environment variables set by
`.chalice/config.json` (per stage) or by the local stack. AWS endpoints are
*not* settings: boto3 and PynamoDB read `AWS_ENDPOINT_URL_<SERVICE>` themselves,
and the Bedrock Mantle adapter reads `AWS_ENDPOINT_URL_BEDROCK_MANTLE` the same way.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

# Base models teams may fine-tune (Bedrock open-weight RFT, see shared docs §3.1).
DEFAULT_RFT_MODELS = ("openai.gpt-oss-20b", "qwen.qwen3-32b-v1:0", "nvidia.nemotron-nano-3-30b")
# Amazon Nova models trained through Bedrock's native API (shared docs §4).
DEFAULT_NOVA_MODELS = ("amazon.nova-2-lite-v1:0:256k",)


def _csv(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = os.environ.get(name)
    if not raw:
        return default
    return tuple(part.strip() for part in raw.split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    stage: str
    region: str
    table_prefix: str
    datasets_bucket: str
    admin_key_secret_id: str
    rft_models: tuple[str, ...]
    auth_cache_seconds: int
    max_json_body_bytes: int
    max_upload_part_bytes: int
    max_file_bytes: int
    bedrock_retry_deadline_seconds: float
    job_poll_min_seconds: float
    stall_seconds: int
    reconcile_deadline_seconds: float
    reconcile_concurrency: int
    dynamodb_connect_timeout_seconds: float
    dynamodb_read_timeout_seconds: float
    # Amazon Nova (native API): the models, and the service role Bedrock assumes for a job
    # (reads the training data, writes the output prefix, invokes the grader Lambdas).
    nova_models: tuple[str, ...] = DEFAULT_NOVA_MODELS
    bedrock_service_role_arn: str | None = None
    # One Mantle project per team, selected with the OpenAI-Project header (UNCONFIRMED by AWS).
    mantle_projects: bool = False


@functools.lru_cache(maxsize=1)
def settings() -> Settings:
    stage = os.environ.get("RFT_STAGE", "local")
    return Settings(
        stage=stage,
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-west-2",
        table_prefix=os.environ.get("RFT_TABLE_PREFIX", f"rfthub-{stage}-"),
        datasets_bucket=os.environ.get("RFT_DATASETS_BUCKET", f"rfthub-{stage}-datasets"),
        admin_key_secret_id=os.environ.get("RFT_ADMIN_KEY_SECRET_ID", f"rfthub/{stage}/admin-key"),
        rft_models=_csv("RFT_MODELS", DEFAULT_RFT_MODELS),
        auth_cache_seconds=int(os.environ.get("RFT_AUTH_CACHE_SECONDS", "30")),
        # API Gateway + Lambda cap a synchronous request near 6 MB.
        max_json_body_bytes=int(os.environ.get("RFT_MAX_JSON_BODY_BYTES", str(1024 * 1024))),
        # A part travels base64-encoded in the Lambda event (6,291,456 bytes at most): 4.5 MB fits.
        max_upload_part_bytes=int(os.environ.get("RFT_MAX_UPLOAD_PART_BYTES", str(4_500_000))),
        max_file_bytes=int(os.environ.get("RFT_MAX_FILE_BYTES", str(512 * 1024 * 1024))),
        bedrock_retry_deadline_seconds=float(os.environ.get("RFT_BEDROCK_RETRY_DEADLINE", "20")),
        # Reads of a running job poll Bedrock at most this often (the reconciler covers the rest).
        job_poll_min_seconds=float(os.environ.get("RFT_JOB_POLL_MIN_SECONDS", "5")),
        stall_seconds=int(os.environ.get("RFT_STALL_SECONDS", "3600")),
        # The reconciler Lambda runs for at most 5 minutes; stop starting work well before.
        reconcile_deadline_seconds=float(os.environ.get("RFT_RECONCILE_DEADLINE", "240")),
        reconcile_concurrency=int(os.environ.get("RFT_RECONCILE_CONCURRENCY", "16")),
        # A stalled DynamoDB must cost a request seconds, not minutes (API Gateway gives up at 29 s).
        dynamodb_connect_timeout_seconds=float(os.environ.get("RFT_DYNAMODB_CONNECT_TIMEOUT", "1")),
        dynamodb_read_timeout_seconds=float(os.environ.get("RFT_DYNAMODB_READ_TIMEOUT", "3")),
        nova_models=_csv("RFT_NOVA_MODELS", DEFAULT_NOVA_MODELS),
        bedrock_service_role_arn=os.environ.get("RFT_BEDROCK_SERVICE_ROLE_ARN") or None,
        mantle_projects=os.environ.get("RFT_MANTLE_PROJECTS", "").lower() in ("1", "true", "yes", "on"),
    )


def jobs_queue() -> str:
    """The job worker's SQS queue (named here: app.py needs it at import, without the jobs service)."""
    stage = os.environ.get("RFT_STAGE", "local")
    return os.environ.get("RFT_JOBS_QUEUE", f"rfthub-{stage}-jobs")


def evals_queue() -> str:
    """The eval worker's SQS queue (named here for the same reason as jobs_queue)."""
    stage = os.environ.get("RFT_STAGE", "local")
    return os.environ.get("RFT_EVALS_QUEUE", f"rfthub-{stage}-evals")


def _stage_name(env: str, suffix: str) -> str:
    stage = os.environ.get("RFT_STAGE", "local")
    return os.environ.get(env, f"rfthub-{stage}-{suffix}")


def pipeline_steps_queue() -> str:
    """Where the pipeline state machine sends each step with its task token (the pipeline worker's)."""
    return _stage_name("RFT_PIPELINE_STEPS_QUEUE", "pipeline-steps")


def pipeline_triggers_queue() -> str:
    """Where schedules, new data under a pipeline's prefix and trigger events arrive."""
    return _stage_name("RFT_PIPELINE_TRIGGERS_QUEUE", "pipeline-triggers")


def pipeline_state_machine_arn() -> str:
    """The one state machine every pipeline run executes (deploy/pipeline.asl.json); its ARN is set by
    the template (and by .chalice/config.json's local stage)."""
    return os.environ.get("RFT_PIPELINE_STATE_MACHINE_ARN", "")


def pipeline_schedule_group() -> str:
    return _stage_name("RFT_PIPELINE_SCHEDULE_GROUP", "pipelines")


def pipeline_scheduler_role_arn() -> str:
    """The role EventBridge Scheduler assumes to send a schedule's trigger to the triggers queue."""
    return os.environ.get("RFT_PIPELINE_SCHEDULER_ROLE_ARN", "")


def table_name(short: str) -> str:
    """Full DynamoDB table name; read at import time by the PynamoDB models."""
    stage = os.environ.get("RFT_STAGE", "local")
    return os.environ.get("RFT_TABLE_PREFIX", f"rfthub-{stage}-") + short
