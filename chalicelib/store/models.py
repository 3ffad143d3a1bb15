"""DynamoDB tables (PynamoDB models).

No `host` in Meta: the endpoint comes from AWS_ENDPOINT_URL_DYNAMODB when set
(local stack, tests) and from the Lambda's region otherwise. Table names come
from RFT_TABLE_PREFIX, read at import time (Lambda and `chalice local` set the
environment before importing the app; tests set it in conftest).
"""
from __future__ import annotations

import functools

from pynamodb.attributes import (
    BooleanAttribute,
    JSONAttribute,
    ListAttribute,
    MapAttribute,
    NumberAttribute,
    TTLAttribute,
    UnicodeAttribute,
)
from pynamodb.connection import Connection
from pynamodb.indexes import AllProjection, GlobalSecondaryIndex, KeysOnlyProjection
from pynamodb.models import Model

from chalicelib.config import settings, table_name


class _Base(Model):
    class Meta:
        abstract = True
        billing_mode = "PAY_PER_REQUEST"
        # No retries inside PynamoDB/botocore: store/dynamo.py retries, knowing which writes are
        # idempotent (a blindly repeated ADD counts twice). Timeouts fit inside a 29 s request.
        max_retry_attempts = 0
        connect_timeout_seconds = settings().dynamodb_connect_timeout_seconds
        read_timeout_seconds = settings().dynamodb_read_timeout_seconds


class Team(_Base):
    class Meta(_Base.Meta):
        table_name = table_name("teams")

    team_id = UnicodeAttribute(hash_key=True)
    name = UnicodeAttribute()
    created_at = NumberAttribute()
    mantle_project = UnicodeAttribute(null=True)   # its Bedrock (Mantle) project, when projects are on


class KeysByTeam(GlobalSecondaryIndex):
    class Meta:
        index_name = "by_team"
        projection = AllProjection()

    team_id = UnicodeAttribute(hash_key=True)
    created_at = NumberAttribute(range_key=True)


class ApiKey(_Base):
    """A team's API key. Only the SHA-256 of the full key is stored."""
    class Meta(_Base.Meta):
        table_name = table_name("api_keys")

    key_id = UnicodeAttribute(hash_key=True)
    team_id = UnicodeAttribute()
    key_hash = UnicodeAttribute()
    prefix = UnicodeAttribute()
    created_at = NumberAttribute()
    revoked_at = NumberAttribute(null=True)
    # Scoped keys (issue #29; domain/scopes.py). Absent on keys made before: a full key, any model.
    name = UnicodeAttribute(null=True)
    owner = UnicodeAttribute(null=True)
    role = UnicodeAttribute(null=True)              # full | inference | read
    models = ListAttribute(null=True)               # model ids / aliases it may call; absent: any
    expires_at = NumberAttribute(null=True)         # unix s: refused from then (a rotation sets it too)
    replaced_by = UnicodeAttribute(null=True)       # the key a rotation issued in its place
    rotated_from = UnicodeAttribute(null=True)
    last_used_day = UnicodeAttribute(null=True)     # "YYYY-MM-DD", written at most once a day per key
    by_team = KeysByTeam()


class FilesByCreated(GlobalSecondaryIndex):
    """A team's files in time order: lists page on it (issue #12)."""
    class Meta:
        index_name = "by_created"
        projection = AllProjection()

    team_id = UnicodeAttribute(hash_key=True)
    created_at = NumberAttribute(range_key=True)


class FilesByExpiry(GlobalSecondaryIndex):
    """Sparse: only files uploaded with `expires_after` carry `expiring`, so the reconciler's sweep
    reads exactly the files due (one partition: expiring files are few, each read once when due).
    Not a DynamoDB TTL: TTL deletes the row up to days late and never the S3 object."""
    class Meta:
        index_name = "by_expiry"
        projection = KeysOnlyProjection()

    expiring = UnicodeAttribute(hash_key=True)
    expires_at = NumberAttribute(range_key=True)


class File(_Base):
    """A dataset: content in S3, metadata and validation report here."""
    class Meta(_Base.Meta):
        table_name = table_name("files")

    team_id = UnicodeAttribute(hash_key=True)
    file_id = UnicodeAttribute(range_key=True)
    filename = UnicodeAttribute()
    purpose = UnicodeAttribute()
    bytes = NumberAttribute()
    created_at = NumberAttribute()
    status = UnicodeAttribute()             # processed | error
    s3_key = UnicodeAttribute()
    validation = JSONAttribute(default=dict)
    bedrock_files = JSONAttribute(default=dict)   # {grader ref or "": Bedrock file id}
    expires_at = NumberAttribute(null=True)       # expires_after: gone (not served, not usable) from then
    expiring = UnicodeAttribute(null=True)        # "file" when expires_at is set: the by_expiry index's key
    by_created = FilesByCreated()
    by_expiry = FilesByExpiry()


class Upload(_Base):
    """A multipart upload in progress (OpenAI Uploads API)."""
    class Meta(_Base.Meta):
        table_name = table_name("uploads")

    team_id = UnicodeAttribute(hash_key=True)
    upload_id = UnicodeAttribute(range_key=True)
    filename = UnicodeAttribute()
    purpose = UnicodeAttribute()
    bytes = NumberAttribute()
    mime_type = UnicodeAttribute()
    created_at = NumberAttribute()
    expires_at = NumberAttribute()
    status = UnicodeAttribute()             # pending | completed | cancelled | expired
    file_id = UnicodeAttribute(null=True)
    file_expires_after = NumberAttribute(null=True)   # seconds: the file it makes expires that long after


class ActiveJobs(GlobalSecondaryIndex):
    """Sparse index of non-terminal jobs: the reconciler queries it instead of scanning."""
    class Meta:
        index_name = "active"
        projection = KeysOnlyProjection()

    active_shard = UnicodeAttribute(hash_key=True)
    job_id = UnicodeAttribute(range_key=True)


class JobsByBedrockId(GlobalSecondaryIndex):
    class Meta:
        index_name = "by_bedrock_id"
        projection = KeysOnlyProjection()

    bedrock_job_id = UnicodeAttribute(hash_key=True)


class JobsByCreated(GlobalSecondaryIndex):
    """A team's jobs in time order: `GET /v1/fine_tuning/jobs` pages on it newest first (issue #12)."""
    class Meta:
        index_name = "by_created"
        projection = AllProjection()

    team_id = UnicodeAttribute(hash_key=True)
    created_at = NumberAttribute(range_key=True)


class Job(_Base):
    class Meta(_Base.Meta):
        table_name = table_name("jobs")

    team_id = UnicodeAttribute(hash_key=True)
    job_id = UnicodeAttribute(range_key=True)
    status = UnicodeAttribute()
    model = UnicodeAttribute()
    training_file = UnicodeAttribute()
    validation_file = UnicodeAttribute(null=True)
    method = JSONAttribute()                # OpenAI-shaped method, as requested
    bedrock_method = JSONAttribute()        # exactly what is sent to Bedrock
    suffix = UnicodeAttribute(null=True)    # kept here: Bedrock rejects it
    metadata = JSONAttribute(null=True)
    seed = NumberAttribute(null=True)
    created_at = NumberAttribute()
    updated_at = NumberAttribute()
    finished_at = NumberAttribute(null=True)
    fine_tuned_model = UnicodeAttribute(null=True)
    error = JSONAttribute(null=True)
    estimate = JSONAttribute(default=dict)
    budget_reserved_micro = NumberAttribute(null=True)   # reserved against the team budget at creation
    budget_period = UnicodeAttribute(null=True)
    budget_settled = BooleanAttribute(null=True)
    budget_hold_id = UnicodeAttribute(null=True)
    judge_micro = NumberAttribute(null=True)             # judge calls of its grader during training
    request_hash = UnicodeAttribute()       # for Idempotency-Key replays
    # submission to Bedrock: pending -> submitting (leased) -> submitted | rejected
    submit_state = UnicodeAttribute()
    submit_lease_until = NumberAttribute(null=True)
    submit_attempts = NumberAttribute(default=0)
    preflight = JSONAttribute(null=True)
    preflight_state = UnicodeAttribute(null=True)    # queued -> running (leased) -> done | failed
    preflight_lease_until = NumberAttribute(null=True)
    preflight_mode = UnicodeAttribute(null=True)     # block | warn (the request's "preflight")
    preflight_sample_base = JSONAttribute(null=True)  # the request's "sample_base": base-model sampling
    grader_ref = UnicodeAttribute(null=True)   # hosted graders: "spec:<hash>", written into every row
    bedrock_job_id = UnicodeAttribute(null=True)
    mantle_project = UnicodeAttribute(null=True)   # the Mantle project it was submitted in (None: default)
    bedrock_status = UnicodeAttribute(null=True)
    last_event_at = NumberAttribute(null=True)
    active_shard = UnicodeAttribute(null=True)
    trained_tokens = NumberAttribute(null=True)
    cancel_requested = BooleanAttribute(default=False)
    status_path = ListAttribute(default=list)
    last_progress_at = NumberAttribute(null=True)   # a status change or new Bedrock events
    stalled_at = NumberAttribute(null=True)
    event_seq = NumberAttribute(default=0)               # orders job events as rft-hub recorded them
    bedrock_event_cursor = UnicodeAttribute(null=True)   # newest Bedrock event copied
    active = ActiveJobs()
    by_bedrock_id = JobsByBedrockId()
    by_created = JobsByCreated()


class JobEventsById(GlobalSecondaryIndex):
    """Where an event id sits in its job's sequence: `after=<event id>` resumes there (issue #12)."""
    class Meta:
        index_name = "by_event_id"
        projection = KeysOnlyProjection()

    event_id = UnicodeAttribute(hash_key=True)


class JobEvent(_Base):
    """OpenAI-shaped job events: rft-hub's own and those copied from Bedrock."""
    class Meta(_Base.Meta):
        table_name = table_name("job_events")

    job_id = UnicodeAttribute(hash_key=True)
    sort_key = UnicodeAttribute(range_key=True)   # "<job event seq:012d>"
    event_id = UnicodeAttribute()
    created_at = NumberAttribute()
    level = UnicodeAttribute()
    message = UnicodeAttribute()
    type = UnicodeAttribute()
    data = JSONAttribute(null=True)
    source = UnicodeAttribute()              # rft-hub | bedrock | event | poll
    # Only on a job's reward summary item (hash "<job id>#rewards", range "best"; no event fields):
    best_reward = NumberAttribute(null=True)
    by_event_id = JobEventsById()


class CheckpointsById(GlobalSecondaryIndex):
    """Where a checkpoint id sits in its job's steps: `after=<checkpoint id>` resumes there (issue #12)."""
    class Meta:
        index_name = "by_checkpoint_id"
        projection = KeysOnlyProjection()

    checkpoint_id = UnicodeAttribute(hash_key=True)


class Checkpoint(_Base):
    class Meta(_Base.Meta):
        table_name = table_name("checkpoints")

    job_id = UnicodeAttribute(hash_key=True)
    step_key = UnicodeAttribute(range_key=True)   # "<step:08d>#<id>"
    checkpoint_id = UnicodeAttribute()
    step_number = NumberAttribute()
    created_at = NumberAttribute()
    fine_tuned_model_checkpoint = UnicodeAttribute()
    metrics = JSONAttribute(default=dict)
    by_checkpoint_id = CheckpointsById()


class TunedModel(_Base):
    """A model a team's job produced (the registry)."""
    class Meta(_Base.Meta):
        table_name = table_name("models")

    team_id = UnicodeAttribute(hash_key=True)
    model_id = UnicodeAttribute(range_key=True)     # Bedrock's fine_tuned_model
    base_model = UnicodeAttribute()
    job_id = UnicodeAttribute()
    grader = JSONAttribute()
    final_reward = NumberAttribute(null=True)
    best_reward = NumberAttribute(null=True)
    checkpoints = JSONAttribute(default=list)       # [{id, model, step}]
    created_at = NumberAttribute()
    # The training watch's verdict (issue #24): {state: quarantined | flagged | released, findings,
    # on_critical, released_by, reason, released_at}; absent when the job's watch found nothing critical.
    watch = JSONAttribute(null=True)


class Alias(_Base):
    """A team's name for a model; `version` counts re-points (alias@version addresses history)."""
    class Meta(_Base.Meta):
        table_name = table_name("aliases")

    team_id = UnicodeAttribute(hash_key=True)
    alias = UnicodeAttribute(range_key=True)
    model_id = UnicodeAttribute()
    base_model = UnicodeAttribute()
    version = NumberAttribute()
    updated_at = NumberAttribute()


class AliasChange(_Base):
    """Audit trail of every alias change."""
    class Meta(_Base.Meta):
        table_name = table_name("alias_history")

    team_alias = UnicodeAttribute(hash_key=True)    # "<team_id>#<alias>"
    version = NumberAttribute(range_key=True)
    model_id = UnicodeAttribute()
    base_model = UnicodeAttribute()
    previous_model_id = UnicodeAttribute(null=True)
    changed_by = UnicodeAttribute()                 # "key:<id>" | "job:<id>" | "admin"
    changed_at = NumberAttribute()


class GraderSpec(_Base):
    """Grader specs by content hash: immutable, so the hosted grader caches them forever."""
    class Meta(_Base.Meta):
        table_name = table_name("grader_specs")

    spec_hash = UnicodeAttribute(hash_key=True)
    spec = JSONAttribute()
    created_at = NumberAttribute()


class SavedGrader(_Base):
    """A team's named grader; each save of the same name is a new version."""
    class Meta(_Base.Meta):
        table_name = table_name("graders")

    team_id = UnicodeAttribute(hash_key=True)
    name = UnicodeAttribute(range_key=True)
    grader_id = UnicodeAttribute()
    latest_version = NumberAttribute()
    created_at = NumberAttribute()
    updated_at = NumberAttribute()


class GraderVersion(_Base):
    class Meta(_Base.Meta):
        table_name = table_name("grader_versions")

    grader_id = UnicodeAttribute(hash_key=True)
    version = NumberAttribute(range_key=True)
    team_id = UnicodeAttribute()
    name = UnicodeAttribute()
    spec_hash = UnicodeAttribute()
    created_at = NumberAttribute()


class PriceOverride(_Base):
    """Admin price overrides (USD per 1M tokens as exact decimal strings)."""
    class Meta(_Base.Meta):
        table_name = table_name("prices")

    model = UnicodeAttribute(hash_key=True)
    input = UnicodeAttribute()
    output = UnicodeAttribute()
    cached_input = UnicodeAttribute()
    updated_at = NumberAttribute()
    note = UnicodeAttribute(null=True)


class Budget(_Base):
    class Meta(_Base.Meta):
        table_name = table_name("budgets")

    team_id = UnicodeAttribute(hash_key=True)
    limit_micro = NumberAttribute()
    period = UnicodeAttribute()                     # "monthly" (calendar month, UTC)
    thresholds = ListAttribute(default=list)        # e.g. [0.5, 0.8, 1.0]
    updated_at = NumberAttribute()


class BudgetPeriod(_Base):
    """One team x one budget period. `committed` = spent + open holds. A hold is one entry of
    `holds` (hold id -> micro-dollars) added in the same conditional UpdateItem that raises
    `committed`, so a reservation can never pass the limit and is applied at most once; a
    settlement removes the entry in the update that moves the amount to `spent`."""
    class Meta(_Base.Meta):
        table_name = table_name("budget_periods")

    team_id = UnicodeAttribute(hash_key=True)
    period = UnicodeAttribute(range_key=True)       # "2026-11"
    committed = NumberAttribute(default=0)
    spent = NumberAttribute(default=0)
    holds = MapAttribute(default=dict)              # open holds: {hold id: micro}
    alerted = ListAttribute(default=list)           # thresholds already announced this period
    # A budget shard (`<team>#bNN`, spend/shards.py) also has: what the root granted it (= its
    # committed + room), its free room, the budget setting it was granted under, and its recent
    # grant ids (so a repeated grant is not applied twice).
    granted = NumberAttribute(null=True)
    room = NumberAttribute(null=True)
    setting = UnicodeAttribute(null=True)
    grants = MapAttribute(null=True)                # {grant id: unix ms}


class PendingUsage(GlobalSecondaryIndex):
    """Sparse: ledger entries not yet added to the daily totals (the aggregator drains it), keyed
    by the entry's own partition key so this index spreads a team's writes as the table does."""
    class Meta:
        index_name = "pending_usage"
        projection = AllProjection()

    agg_team = UnicodeAttribute(hash_key=True)
    sort_key = UnicodeAttribute(range_key=True)


class LedgerEntry(_Base):
    """One metered call: the record of truth, written once (conditional put on its key).
    Kept for RFT_LEDGER_RETENTION_DAYS, then expired by TTL.

    A team's entries are spread over RFT_LEDGER_SHARDS partition keys (`<team>#<shard>`, the
    shard from the request id), so no partition key takes every call of a team; the sort key
    starts with the hold (or slice) the call was admitted against, so the entries of one slice
    are found with one prefix query per shard (spend/ledger.py)."""
    class Meta(_Base.Meta):
        table_name = table_name("ledger")

    pk = UnicodeAttribute(hash_key=True)            # "<team id>#<shard:02d>"
    sort_key = UnicodeAttribute(range_key=True)     # "<hold id or ->#<unix ms:013d>#<request id>"
    team_id = UnicodeAttribute()
    request_id = UnicodeAttribute()
    key_id = UnicodeAttribute(null=True)
    model = UnicodeAttribute()                      # what the caller asked for (alias, tuned or base)
    upstream_model = UnicodeAttribute()
    alias = UnicodeAttribute(null=True)
    endpoint = UnicodeAttribute()
    input_tokens = NumberAttribute(default=0)
    cached_tokens = NumberAttribute(default=0)
    output_tokens = NumberAttribute(default=0)
    cost_micro = NumberAttribute(default=0)
    reserved_micro = NumberAttribute(default=0)
    latency_ms = NumberAttribute(default=0)
    status = NumberAttribute()
    stream = BooleanAttribute(default=False)
    created_at = NumberAttribute()
    expires_at = TTLAttribute(null=True)
    kind = UnicodeAttribute(default="inference")   # inference | grader | abandoned
    outcome = UnicodeAttribute(default="served")   # served | error | abandoned
    hold_id = UnicodeAttribute(null=True)          # the hold or slice it was admitted against
    key_hold_id = UnicodeAttribute(null=True)      # the slice of its key's own budget, if the key has one
    job_id = UnicodeAttribute(null=True)           # grader calls made for a training job
    agg_team = UnicodeAttribute(null=True)         # = pk until aggregated (sparse index)
    pending_usage = PendingUsage()


class UsageDaily(_Base):
    """Per team x day x model x key totals, derived from the ledger by the aggregator."""
    class Meta(_Base.Meta):
        table_name = table_name("usage_daily")

    team_id = UnicodeAttribute(hash_key=True)
    bucket = UnicodeAttribute(range_key=True)       # "<YYYY-MM-DD>#<model>#<key id>#<kind>"
    day = UnicodeAttribute()
    model = UnicodeAttribute()
    key_id = UnicodeAttribute()
    kind = UnicodeAttribute(null=True)              # inference | grader | abandoned
    requests = NumberAttribute(default=0)
    errors = NumberAttribute(default=0)
    input_tokens = NumberAttribute(default=0)
    cached_tokens = NumberAttribute(default=0)
    output_tokens = NumberAttribute(default=0)
    cost_micro = NumberAttribute(default=0)


class SlackConfig(_Base):
    """A team's Slack settings. The webhook URL itself lives in Secrets Manager."""
    class Meta(_Base.Meta):
        table_name = table_name("slack_configs")

    team_id = UnicodeAttribute(hash_key=True)
    webhook_secret_id = UnicodeAttribute(null=True)
    slack_team_id = UnicodeAttribute(null=True)
    channel_ids = ListAttribute(default=list)
    notify = ListAttribute(default=list)
    health = JSONAttribute(default=dict)          # {"status": ok|broken|unknown, "error", "at"}
    updated_at = NumberAttribute()


class SlackChannel(_Base):
    """Which rft-hub team a Slack workspace's channel belongs to (for slash commands)."""
    class Meta(_Base.Meta):
        table_name = table_name("slack_channels")

    slack_team_id = UnicodeAttribute(hash_key=True)
    channel_id = UnicodeAttribute(range_key=True)
    team_id = UnicodeAttribute()


class SlackDelivery(_Base):
    """Dedupe of notifications by event id (a lease while sending, then "sent")."""
    class Meta(_Base.Meta):
        table_name = table_name("slack_deliveries")

    event_id = UnicodeAttribute(hash_key=True)
    status = UnicodeAttribute()                   # sending | sent | failed
    lease_until = NumberAttribute(default=0)
    attempts = NumberAttribute(default=0)
    last_error = UnicodeAttribute(null=True)
    expires_at = TTLAttribute(null=True)


class PendingOutbox(GlobalSecondaryIndex):
    class Meta:
        index_name = "pending"
        projection = AllProjection()

    pending_shard = UnicodeAttribute(hash_key=True)
    created_at = NumberAttribute(range_key=True)


class OutboxEvent(_Base):
    """rft-hub events to publish, written in the same transaction as the change they describe."""
    class Meta(_Base.Meta):
        table_name = table_name("outbox")

    event_id = UnicodeAttribute(hash_key=True)
    detail_type = UnicodeAttribute()
    detail = JSONAttribute()
    created_at = NumberAttribute()
    attempts = NumberAttribute(default=0)
    last_error = UnicodeAttribute(null=True)
    pending_shard = UnicodeAttribute(null=True)     # "pending" until published
    pending = PendingOutbox()


ALL_MODELS = (Team, ApiKey, File, Upload, Job, JobEvent, Checkpoint, TunedModel, Alias, AliasChange, OutboxEvent,
              GraderSpec, SavedGrader, GraderVersion, PriceOverride, Budget, BudgetPeriod, LedgerEntry, UsageDaily,
              SlackConfig, SlackChannel, SlackDelivery)


@functools.lru_cache(maxsize=1)
def connection() -> Connection:
    """One connection per process for transactions (building a botocore client costs ~70 ms)."""
    return Connection(region=settings().region, max_retry_attempts=0,
                      connect_timeout_seconds=settings().dynamodb_connect_timeout_seconds,
                      read_timeout_seconds=settings().dynamodb_read_timeout_seconds)


def create_tables() -> None:
    """Idempotent: used by the local stack and the tests (deployed tables come from the template).
    A table kept from an older `make run` gets the indexes added since, one at a time (as
    DynamoDB allows)."""
    for model in ALL_MODELS:
        if not model.exists():
            model.create_table(wait=True)
            continue
        described = model._get_connection().describe_table()
        have = {i["IndexName"] for i in described.get("GlobalSecondaryIndexes", [])}
        schema = model._get_schema()
        for index in schema.get("global_secondary_indexes", []):
            if index["index_name"] in have:
                continue
            _add_index(model.Meta.table_name, schema["attribute_definitions"], index)


def _add_index(table: str, definitions: list[dict], index: dict) -> None:
    import time

    import boto3

    client = boto3.client("dynamodb", region_name=settings().region)
    client.update_table(TableName=table, AttributeDefinitions=definitions, GlobalSecondaryIndexUpdates=[{"Create": {
        "IndexName": index["index_name"], "KeySchema": index["key_schema"], "Projection": index["projection"]}}])
    for _ in range(600):
        state = client.describe_table(TableName=table)["Table"]
        if all(i.get("IndexStatus") == "ACTIVE" for i in state.get("GlobalSecondaryIndexes", [])):
            return
        time.sleep(0.1)


# ---- Lambda grader registrations and Slack ordering (issue #19) ----------------------------------

class LambdaGraderRegistration(_Base):
    """A team's reward Lambda, registered by an admin: a team may use only its registered functions."""
    class Meta(_Base.Meta):
        table_name = table_name("lambda_graders")

    team_id = UnicodeAttribute(hash_key=True)
    function_name = UnicodeAttribute(range_key=True)   # in rft-hub's own account and region
    function_arn = UnicodeAttribute()                  # unqualified
    created_at = NumberAttribute()


class LambdaGraderOwner(_Base):
    """Which team a registered function belongs to: one team at most (a conditional put)."""
    class Meta(_Base.Meta):
        table_name = table_name("lambda_grader_owners")

    function_name = UnicodeAttribute(hash_key=True)
    team_id = UnicodeAttribute()
    created_at = NumberAttribute()


class SlackJobCursor(_Base):
    """Per job, the newest state change posted (or being posted) to Slack; older ones are dropped."""
    class Meta(_Base.Meta):
        table_name = table_name("slack_job_cursors")

    job_key = UnicodeAttribute(hash_key=True)    # "<team id>#<job id>"
    rank = NumberAttribute()                      # the status's phase (monotonic along a job's path)
    seq = NumberAttribute(null=True)              # detail.status_seq when the producer sends it
    event_id = UnicodeAttribute()
    expires_at = TTLAttribute(null=True)


ALL_MODELS += (LambdaGraderRegistration, LambdaGraderOwner, SlackJobCursor)


# ---- evals and promotion gates (issue #17) --------------------------------------------------------

class EvalsByCreated(GlobalSecondaryIndex):
    """A team's evals in time order: `GET /v1/evals` pages on it."""
    class Meta:
        index_name = "by_created"
        projection = AllProjection()

    team_id = UnicodeAttribute(hash_key=True)
    created_at = NumberAttribute(range_key=True)


class EvalDefinition(_Base):
    """An eval (OpenAI's Evals API): an item schema and testing criteria, run on models later."""
    class Meta(_Base.Meta):
        table_name = table_name("evals")

    team_id = UnicodeAttribute(hash_key=True)
    eval_id = UnicodeAttribute(range_key=True)
    name = UnicodeAttribute()
    data_source_config = JSONAttribute()          # as sent (type custom: item_schema, include_sample_schema)
    testing_criteria = JSONAttribute()            # as sent, each with its name filled in
    metadata = JSONAttribute(null=True)
    created_at = NumberAttribute()
    updated_at = NumberAttribute()
    by_created = EvalsByCreated()


class EvalRunRecord(_Base):
    """One run of an eval on one model (or on given outputs). Run ids sort by creation time."""
    class Meta(_Base.Meta):
        table_name = table_name("eval_runs")

    eval_id = UnicodeAttribute(hash_key=True)
    run_id = UnicodeAttribute(range_key=True)     # "evalrun_<created ms, hex><random>"
    team_id = UnicodeAttribute()
    name = UnicodeAttribute()
    status = UnicodeAttribute()                   # queued | in_progress | completed | failed | canceled
    model = UnicodeAttribute()                    # as requested (alias, tuned, checkpoint, base); "" for jsonl
    upstream_model = UnicodeAttribute(null=True)  # what the request resolved to when the run was created
    base_model = UnicodeAttribute(null=True)
    alias = UnicodeAttribute(null=True)
    data_source = JSONAttribute()
    metadata = JSONAttribute(null=True)
    created_at = NumberAttribute()
    updated_at = NumberAttribute()
    started_at = NumberAttribute(null=True)
    finished_at = NumberAttribute(null=True)
    error = JSONAttribute(null=True)              # {"code", "message"}
    summary = JSONAttribute(default=dict)         # result counts, per criterion, per model usage, cost
    max_micro = NumberAttribute(null=True)        # the run's cost cap
    key_id = UnicodeAttribute(null=True)          # the key that started it (its calls are metered under it)
    job_id = UnicodeAttribute(null=True)          # started for this fine-tuning job (rft_eval)
    role = UnicodeAttribute(null=True)            # for a job's runs: base | tuned | checkpoint
    lease_token = UnicodeAttribute(null=True)     # the worker running it now
    lease_until = NumberAttribute(null=True)
    enqueued_at = NumberAttribute(null=True)
    attempts = NumberAttribute(default=0)
    data_sha256 = UnicodeAttribute(null=True)     # the rows it ran on (evaluation/evals.rows_sha256): gates pin it


class EvalOutputItem(_Base):
    """One item's result in a run, stored once (conditional put): a resumed run skips it."""
    class Meta(_Base.Meta):
        table_name = table_name("eval_output_items")

    run_id = UnicodeAttribute(hash_key=True)
    item_index = NumberAttribute(range_key=True)  # the item's position in the data source (datasource_item_id)
    eval_id = UnicodeAttribute()
    status = UnicodeAttribute()                   # pass | fail
    errored = BooleanAttribute(default=False)
    datasource_item = JSONAttribute()
    sample = JSONAttribute()
    results = JSONAttribute()
    usage = JSONAttribute(default=dict)           # {model: [calls, prompt, completion, cached]}
    cost_micro = NumberAttribute(default=0)
    created_at = NumberAttribute()


class JobEvalLink(_Base):
    """A fine-tuning job's `rft_eval`: the eval to run on its base and tuned models when it succeeds."""
    class Meta(_Base.Meta):
        table_name = table_name("eval_job_links")

    team_id = UnicodeAttribute(hash_key=True)
    job_id = UnicodeAttribute(range_key=True)
    eval_id = UnicodeAttribute()
    options = JSONAttribute(default=dict)         # file_id, input_messages, sampling_params, max_items
    run_ids = JSONAttribute(null=True)            # {run id: role}, once started
    enqueued = BooleanAttribute(default=False)
    reported = BooleanAttribute(default=False)    # the comparison was posted to the job's events
    created_at = NumberAttribute()


class AliasGate(_Base):
    """An alias's promotion gate (range "gate") and, per alias version, the evidence of the move
    (range "v<version:09d>": the run that justified it, the comparison, an admin's override)."""
    class Meta(_Base.Meta):
        table_name = table_name("alias_gates")

    team_alias = UnicodeAttribute(hash_key=True)   # "<team_id>#<alias>"
    entry = UnicodeAttribute(range_key=True)       # "gate" | "v<version:09d>"
    gate = JSONAttribute(null=True)                # {eval_id, criteria: {name: min}, no_worse_than_current}
    evidence = JSONAttribute(null=True)            # {eval_id, run_id, baseline_run_id, comparison, override_reason}
    updated_at = NumberAttribute()
    updated_by = UnicodeAttribute(null=True)


ALL_MODELS += (EvalDefinition, EvalRunRecord, EvalOutputItem, JobEvalLink, AliasGate)


# ---- the training watch (issue #16) ---------------------------------------------------------------

class RolloutWindow(_Base):
    """A job's rollouts by window (consecutive reward invocations): additive statistics, ADDed by
    each invocation of the hosted grader (domain/watch.py STATS; no read before the write). The
    job's watch settings and invocation counter live under "<team>#<job>#summary", window 0."""
    class Meta(_Base.Meta):
        table_name = table_name("rollout_windows")

    job_key = UnicodeAttribute(hash_key=True)       # "<team_id>#<job_id>" (or "...#summary")
    window = NumberAttribute(range_key=True)        # 1, 2, ... (0: the summary item)
    invocations = NumberAttribute(default=0)        # the summary's counter; a window's invocation count
    first_at = NumberAttribute(null=True)           # ms of the window's first and last invocation
    last_at = NumberAttribute(null=True)
    samples = NumberAttribute(null=True)
    reward_sum = NumberAttribute(null=True)
    reward_sq = NumberAttribute(null=True)
    errors = NumberAttribute(null=True)
    timeouts = NumberAttribute(null=True)
    length_sum = NumberAttribute(null=True)
    groups = NumberAttribute(null=True)
    flat_groups = NumberAttribute(null=True)
    same_text_groups = NumberAttribute(null=True)
    varied_groups = NumberAttribute(null=True)
    sxy = NumberAttribute(null=True)
    sxx = NumberAttribute(null=True)
    syy = NumberAttribute(null=True)
    degenerate = NumberAttribute(null=True)
    degenerate_reward = NumberAttribute(null=True)
    duplicates = NumberAttribute(null=True)
    duplicate_reward = NumberAttribute(null=True)
    audit_n = NumberAttribute(null=True)
    audit_reward = NumberAttribute(null=True)
    audit_score = NumberAttribute(null=True)
    audit_gap_sq = NumberAttribute(null=True)       # sum of (reward - audit)^2: the gap's noise (issue #24)
    shape_duplicates = NumberAttribute(null=True)   # same frame as another prompt's answer (issue #24)
    shape_duplicate_reward = NumberAttribute(null=True)
    on_critical = UnicodeAttribute(null=True)       # summary: alert | cancel
    audit_ref = UnicodeAttribute(null=True)         # summary: the audit grader's spec ref
    per_window = NumberAttribute(null=True)         # summary: invocations per window


class RolloutsByReward(GlobalSecondaryIndex):
    """A window's kept rollouts by reward (reward_desc / reward_asc pages)."""
    class Meta:
        index_name = "by_reward"
        projection = AllProjection()

    window_key = UnicodeAttribute(hash_key=True)
    reward_key = UnicodeAttribute(range_key=True)


class RolloutsByRandom(GlobalSecondaryIndex):
    """A window's kept rollouts in a fixed pseudo-random order (order=random pages)."""
    class Meta:
        index_name = "by_random"
        projection = AllProjection()

    window_key = UnicodeAttribute(hash_key=True)
    random_key = UnicodeAttribute(range_key=True)


class Rollout(_Base):
    """A rollout whose full text was kept (the best, the worst and a few at random per invocation);
    the text itself is in S3 (rollouts/<team>/<job>/<invocation>.jsonl.gz, line `line`)."""
    class Meta(_Base.Meta):
        table_name = table_name("rollouts")

    window_key = UnicodeAttribute(hash_key=True)    # "<team_id>#<job_id>#<window:08d>"
    rollout_id = UnicodeAttribute(range_key=True)   # "<invocation>.<index:05d>"
    reward_key = UnicodeAttribute()                 # "<sortable reward>#<rollout id>"
    random_key = UnicodeAttribute()                 # "<hash>#<rollout id>"
    window = NumberAttribute()
    invocation = UnicodeAttribute()
    sample_id = UnicodeAttribute()
    prompt_key = UnicodeAttribute()
    reward = NumberAttribute()
    errors = ListAttribute(default=list)
    response_length = NumberAttribute()
    fingerprint = UnicodeAttribute()
    degenerate = BooleanAttribute(default=False)
    audit_score = NumberAttribute(null=True)
    kept = UnicodeAttribute()                       # top | bottom | random
    s3_key = UnicodeAttribute()
    line = NumberAttribute()
    created_at = NumberAttribute()
    expires_at = TTLAttribute(null=True)
    by_reward = RolloutsByReward()
    by_random = RolloutsByRandom()


class WatchFinding(_Base):
    """A finding of a job's training watch, recorded once per code and severity (conditional put)."""
    class Meta(_Base.Meta):
        table_name = table_name("watch_findings")

    job_key = UnicodeAttribute(hash_key=True)       # "<team_id>#<job_id>"
    finding_key = UnicodeAttribute(range_key=True)  # "<code>#<severity>"
    code = UnicodeAttribute()
    severity = UnicodeAttribute()
    title = UnicodeAttribute()
    message = UnicodeAttribute()
    evidence = JSONAttribute(default=dict)
    window = NumberAttribute()
    action = UnicodeAttribute()                     # alert | cancel
    event_id = UnicodeAttribute()
    created_at = NumberAttribute()


ALL_MODELS += (RolloutWindow, Rollout, WatchFinding)


# ---- Amazon Nova custom models and their deployments (issue #15) ----------------------------------

class NovaPending(GlobalSecondaryIndex):
    """Sparse: Nova models whose deployment the reconciler must watch or finish (created, being
    created, being deleted); the reconciler queries it instead of scanning."""
    class Meta:
        index_name = "pending"
        projection = KeysOnlyProjection()

    pending_shard = UnicodeAttribute(hash_key=True)
    team_model = UnicodeAttribute(range_key=True)


class NovaModel(_Base):
    """A Nova custom model a native job produced (registered in `models` like any tuned model) and
    its on-demand deployment, which Converse needs as the modelId."""
    class Meta(_Base.Meta):
        table_name = table_name("nova_models")

    team_id = UnicodeAttribute(hash_key=True)
    model_id = UnicodeAttribute(range_key=True)         # rft-hub's id: "<base>:ft:<custom model id>"
    team_model = UnicodeAttribute()                     # "<team_id>#<model_id>" (the pending index's range)
    job_id = UnicodeAttribute()
    base_model = UnicodeAttribute()
    custom_model_arn = UnicodeAttribute()
    # requested (to be created) -> Creating -> Active | Failed; Deleting -> Deleted
    deployment_status = UnicodeAttribute(null=True)
    deployment_arn = UnicodeAttribute(null=True)
    deployment_name = UnicodeAttribute(null=True)
    generation = NumberAttribute(default=0)             # deployments created so far (names and tokens)
    failure_message = UnicodeAttribute(null=True)
    announced = UnicodeAttribute(null=True)             # "<arn>#<status>" last put on rft-hub's bus
    pending_shard = UnicodeAttribute(null=True)         # "pending" while the reconciler must look at it
    created_at = NumberAttribute()
    updated_at = NumberAttribute()
    pending = NovaPending()


ALL_MODELS += (NovaModel,)


class ConsoleSessionRevocation(_Base):
    """A signed-out console session, kept until the session would have expired anyway (TTL)."""
    class Meta(_Base.Meta):
        table_name = table_name("console_sessions")

    session_id = UnicodeAttribute(hash_key=True)
    revoked_at = NumberAttribute()
    expires_at = TTLAttribute()


ALL_MODELS += (ConsoleSessionRevocation,)


# ---- the audit log (issue #29) ----------------------------------------------------------------------

class AuditByTeam(GlobalSecondaryIndex):
    """A team's entries, newest first (sparse: entries of no team, e.g. a price change, are absent)."""
    class Meta:
        index_name = "by_team"
        projection = AllProjection()

    team_id = UnicodeAttribute(hash_key=True)
    entry_id = UnicodeAttribute(range_key=True)


class AuditEntry(_Base):
    """One security-relevant act, written in the same transaction as the change it records, with a
    condition that the entry is new; never updated or deleted (the functions' IAM denies both).
    One partition: security acts are rare (admin changes, sign-ins), far under a partition's
    1,000 writes a second, and one partition lists every entry in time order."""
    class Meta(_Base.Meta):
        table_name = table_name("audit_log")

    log = UnicodeAttribute(hash_key=True)           # "audit"
    entry_id = UnicodeAttribute(range_key=True)     # "aud_<unix ms:013d>_<random>": sorts by time
    created_at = NumberAttribute()                  # unix ms
    action = UnicodeAttribute()                     # e.g. key.created, budget.set (docs/controls.md)
    actor = UnicodeAttribute()                      # "admin" | "key:<id>" | "console:<session>" | "system"
    target = UnicodeAttribute()                     # what was changed, e.g. "key:<id>", "team:<id>"
    team_id = UnicodeAttribute(null=True)           # the team concerned, if any (the by_team index)
    before = JSONAttribute(null=True)
    after = JSONAttribute(null=True)
    request_id = UnicodeAttribute(null=True)
    by_team = AuditByTeam()


ALL_MODELS += (AuditEntry,)


class GuardrailAttachment(_Base):
    """A Bedrock guardrail an admin attached to a team (scope "team") or to one of its aliases
    (scope "alias:<name>", which wins over the team's): the gateway checks calls with it."""
    class Meta(_Base.Meta):
        table_name = table_name("guardrails")

    team_id = UnicodeAttribute(hash_key=True)
    scope = UnicodeAttribute(range_key=True)        # "team" | "alias:<alias>"
    guardrail_identifier = UnicodeAttribute()       # id or ARN
    guardrail_version = UnicodeAttribute()          # "1", "2", ... or "DRAFT"
    updated_at = NumberAttribute()


ALL_MODELS += (GuardrailAttachment,)


# ---- pipelines (issue #27): specs, their versions, runs ------------------------------------------

class PipelineRecord(_Base):
    """A team's pipeline: its current spec and version, and the one run it may have going
    (`active_run`, set and cleared by conditional writes: one run at a time)."""
    class Meta(_Base.Meta):
        table_name = table_name("pipelines")

    team_id = UnicodeAttribute(hash_key=True)
    pipeline_id = UnicodeAttribute(range_key=True)
    name = UnicodeAttribute()
    version = NumberAttribute()
    spec = JSONAttribute()
    created_at = NumberAttribute()
    updated_at = NumberAttribute()
    created_by = UnicodeAttribute(null=True)
    active_run = UnicodeAttribute(null=True)
    queued_trigger = JSONAttribute(null=True)          # on_busy "queue": the one trigger waiting
    last_data_sha256 = UnicodeAttribute(null=True)     # the data of the last run that succeeded
    last_run = UnicodeAttribute(null=True)


class PipelineVersion(_Base):
    class Meta(_Base.Meta):
        table_name = table_name("pipeline_versions")

    pipeline_id = UnicodeAttribute(hash_key=True)
    version = NumberAttribute(range_key=True)
    team_id = UnicodeAttribute()
    spec = JSONAttribute()
    created_at = NumberAttribute()
    created_by = UnicodeAttribute(null=True)


class PipelineRun(_Base):
    """One run: its steps with their times, the job, the eval comparison, who approved, the money
    it holds, and the task token of the step waiting on something outside the run."""
    class Meta(_Base.Meta):
        table_name = table_name("pipeline_runs")

    pipeline_id = UnicodeAttribute(hash_key=True)
    run_id = UnicodeAttribute(range_key=True)          # time-ordered: newest last
    team_id = UnicodeAttribute()
    pipeline_version = NumberAttribute()
    status = UnicodeAttribute()
    trigger = JSONAttribute()
    created_at = NumberAttribute()
    updated_at = NumberAttribute()
    ended_at = NumberAttribute(null=True)
    execution_arn = UnicodeAttribute(null=True)
    steps = JSONAttribute(default=list)
    waiting_step = UnicodeAttribute(null=True)
    task_token = UnicodeAttribute(null=True)
    data = JSONAttribute(null=True)                    # file id, sha256, rows
    job_id = UnicodeAttribute(null=True)
    candidate_model = UnicodeAttribute(null=True)
    current_model = UnicodeAttribute(null=True)
    eval_runs = JSONAttribute(null=True)               # {"candidate": run id, "current": run id}
    comparison = JSONAttribute(null=True)
    approval = JSONAttribute(null=True)                # who decided, what, when
    hold = JSONAttribute(null=True)                    # the run's estimate held against the budget
    error = JSONAttribute(null=True)                   # {"step", "message"}
    alias_version = NumberAttribute(null=True)


ALL_MODELS += (PipelineRecord, PipelineVersion, PipelineRun)


class RateLimit(_Base):
    """Request and token limits a minute: a team's (scope "team"), the team's for one model it calls
    ("model:<name>") or one key's ("key:<id>")."""
    class Meta(_Base.Meta):
        table_name = table_name("rate_limits")

    team_id = UnicodeAttribute(hash_key=True)
    scope = UnicodeAttribute(range_key=True)        # "team" | "model:<name>" | "key:<key id>"
    rpm = NumberAttribute(null=True)                # requests a minute
    tpm = NumberAttribute(null=True)                # tokens a minute (prompt estimate + output limit)
    updated_at = NumberAttribute()


class RateWindow(_Base):
    """One limit's one minute: what instances have carved out of it as slices (inference/ratelimits.py).
    A new item each minute, expired by TTL an hour later: no counter is ever reset."""
    class Meta(_Base.Meta):
        table_name = table_name("rate_windows")

    window = UnicodeAttribute(hash_key=True)        # "<team>#<scope>#<unix minute>"
    requests = NumberAttribute(default=0)
    tokens = NumberAttribute(default=0)
    slices = MapAttribute(default=dict)             # slice id -> requests (a repeated take is a no-op)
    expires_at = TTLAttribute(null=True)


ALL_MODELS += (RateLimit, RateWindow)


class RateLimitRow(RateLimit):
    """A RateLimit row read and written with its concurrent-requests limit (issue #29): the same
    table and keys as RateLimit (so no table of its own, and no ALL_MODELS entry), one attribute
    more. Each instance's leases of concurrency units live in the rate_windows table
    (inference/concurrency.py)."""
    concurrent = NumberAttribute(null=True)         # requests in flight at once
