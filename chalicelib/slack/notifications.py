"""Slack: per-team configuration and notifications from rft-hub's events (slash commands: slack/commands.py).

Notifications are decoupled: rft-hub's bus -> an SQS queue -> `deliver` (a queue consumer).
A state change is committed long before Slack is involved; Slack being down delays
messages, never job updates. Every event is posted at most once (dedupe on event id), a
job's state changes in order (an older one than already posted is dropped), and a post whose
outcome is unknown is never repeated (see `deliver`).
"""
from __future__ import annotations

import json
import os
import re
from datetime import timedelta

from pynamodb.exceptions import DoesNotExist, UpdateError

from chalicelib import metrics
from chalicelib.adapters import aws, queues
from chalicelib.adapters import slack as slack_http
from chalicelib.domain import ids, urls
from chalicelib.domain import jobs as job_rules
from chalicelib.domain import slack_messages as messages
from chalicelib.errors import InvalidRequest, NotFound
from chalicelib.log import logger
from chalicelib.spend import budgets
from chalicelib.store import dynamo
from chalicelib.store.models import Job, SlackChannel, SlackConfig, SlackDelivery, SlackJobCursor
from chalicelib.training import rewards as job_rewards

NOTIFY = ("job", "budget", "model", "eval", "pipeline")
LEASE_SECONDS = 60


class RetryLater(Exception):
    """Slack asked us to wait (429) or failed (5xx): leave the message on the queue."""


def stage() -> str:
    return os.environ.get("RFT_STAGE", "local")


def notify_queue() -> str:
    return os.environ.get("RFT_SLACK_QUEUE", f"rfthub-{stage()}-slack-notify")


def commands_queue() -> str:
    return os.environ.get("RFT_SLACK_COMMANDS_QUEUE", f"rfthub-{stage()}-slack-commands")


def dead_letter_queue() -> str:
    return os.environ.get("RFT_SLACK_DLQ", f"rfthub-{stage()}-slack-dlq")


def allowed_url(url: str) -> bool:
    prefixes = os.environ.get("RFT_SLACK_URL_PREFIXES", "https://hooks.slack.com/").split(",")
    return urls.allowed(url, prefixes)   # parsed: scheme, host and port equal, no userinfo


# ---- configuration ----------------------------------------------------------------------------

def config_view(team_id: str) -> dict:
    try:
        cfg = SlackConfig.get(team_id, consistent_read=True)
    except DoesNotExist:
        raise NotFound("Slack is not configured for this team.", param="team_id") from None
    return {"object": "slack_config", "team_id": team_id, "slack_team_id": cfg.slack_team_id,
            "channel_ids": list(cfg.channel_ids), "notify": list(cfg.notify),
            "webhook": {"set": bool(cfg.webhook_secret_id), "health": cfg.health or {"status": "unknown"}}}


def configure(team_id: str, body: dict) -> dict:
    allowed = {"webhook_url", "slack_team_id", "channel_ids", "notify"}
    extra = sorted(set(body) - allowed)
    if extra:
        raise InvalidRequest(f"Invalid '{extra[0]}': unknown field.", param=extra[0])
    url = body.get("webhook_url")
    if url is not None and (not isinstance(url, str) or not allowed_url(url)):
        raise InvalidRequest("webhook_url must be a Slack incoming-webhook URL (https://hooks.slack.com/services/...).",
                             param="webhook_url")
    notify = body.get("notify", list(NOTIFY))
    if not isinstance(notify, list) or any(n not in NOTIFY for n in notify):
        raise InvalidRequest(f"notify must list some of {', '.join(NOTIFY)}.", param="notify")
    channels = body.get("channel_ids", [])
    if not isinstance(channels, list) or any(not isinstance(c, str) or not re.match(r"^[A-Z0-9]{1,30}$", c)
                                             for c in channels):
        raise InvalidRequest("channel_ids must be Slack channel ids like C0123456789.", param="channel_ids")
    slack_team = body.get("slack_team_id")
    if slack_team is not None and (not isinstance(slack_team, str) or not re.match(r"^T[A-Z0-9]{1,30}$", slack_team)):
        raise InvalidRequest("slack_team_id must be a Slack workspace id like T0123456789.", param="slack_team_id")
    try:
        cfg = SlackConfig.get(team_id, consistent_read=True)
    except DoesNotExist:
        cfg = SlackConfig(team_id, updated_at=ids.now())
    if url is not None:
        cfg.webhook_secret_id = _store_webhook(team_id, url)
        cfg.health = {"status": "unknown", "error": None, "at": ids.now()}
    for old in list(cfg.channel_ids or []):
        if cfg.slack_team_id and (old not in channels or slack_team != cfg.slack_team_id):
            SlackChannel(cfg.slack_team_id, old).delete()
    cfg.slack_team_id, cfg.channel_ids, cfg.notify, cfg.updated_at = slack_team, channels, notify, ids.now()
    cfg.save()
    if slack_team:
        for channel in channels:
            SlackChannel(slack_team, channel, team_id=team_id).save()
    return config_view(team_id)


def _store_webhook(team_id: str, url: str) -> str:
    """Write-only: the URL is a credential, kept in Secrets Manager (KMS-encrypted), never returned.

    Returns what SlackConfig.webhook_secret_id keeps: "<secret name>#<version id>". Every notifier
    instance caches webhook URLs by that reference, and a version's value never changes, so a
    rotation applies to the very next message everywhere (no cache to wait out or invalidate).
    """
    name = f"rfthub/{stage()}/slack-webhook/{team_id}"
    sm = aws.secrets()
    try:
        version = sm.put_secret_value(SecretId=name, SecretString=url)["VersionId"]
    except sm.exceptions.ResourceNotFoundException:
        version = sm.create_secret(Name=name, SecretString=url)["VersionId"]
    return f"{name}#{version}"


_webhooks: dict[str, str] = {}   # "<secret name>#<version id>" -> URL (immutable, so never stale)


def _webhook_url(ref: str) -> str:
    name, _, version = ref.partition("#")   # '#' cannot occur in a secret name
    if not version:   # stored before versions were recorded: read the current value, uncached
        return aws.secrets().get_secret_value(SecretId=name)["SecretString"]
    url = _webhooks.get(ref)
    if url is None:
        url = aws.secrets().get_secret_value(SecretId=name, VersionId=version)["SecretString"]
        if len(_webhooks) >= 1000:
            _webhooks.clear()
        _webhooks[ref] = url
    return url


def _mark_health(team_id: str, status: str, error: str | None) -> None:
    SlackConfig(team_id).update(actions=[SlackConfig.health.set({"status": status, "error": error, "at": ids.now()})])


# ---- notifications (queue consumer) -------------------------------------------------------------

def _conditional_failed(exc: UpdateError) -> bool:
    return dynamo.is_condition(exc)


def _claim(event_id: str) -> str:
    """"claimed" (a lease to post it), "duplicate" (posted, being posted, or settled), or "unknown":
    an earlier attempt stopped between claiming and recording its outcome, so it may have posted;
    it is not posted again."""
    now = ids.now()
    try:   # not repeated after an unknown outcome (503; the queue retries, and finds the lease if it took)
        dynamo.call(lambda: SlackDelivery(event_id).update(
            actions=[SlackDelivery.status.set("sending"), SlackDelivery.lease_until.set(now + LEASE_SECONDS),
                     SlackDelivery.attempts.add(1), SlackDelivery.expires_at.set(timedelta(days=14))],
            condition=SlackDelivery.status.does_not_exist() | (SlackDelivery.status == "failed")),
            idempotent=False, what="slack claim")
        return "claimed"
    except UpdateError as exc:
        if not _conditional_failed(exc):
            raise
    try:
        dynamo.call(lambda: SlackDelivery(event_id).update(
            actions=[SlackDelivery.status.set("unknown"),
                     SlackDelivery.last_error.set("an earlier attempt stopped while sending; not re-posted")],
            condition=(SlackDelivery.status == "sending") & (SlackDelivery.lease_until < now)),
            idempotent=True, what="slack claim")
        return "unknown"
    except UpdateError as exc:
        if not _conditional_failed(exc):
            raise
        return "duplicate"


def _settle(event_id: str, status: str, error: str | None = None) -> None:
    actions = [SlackDelivery.status.set(status)]
    if error:
        actions.append(SlackDelivery.last_error.set(error[:200]))
    dynamo.call(lambda: SlackDelivery(event_id).update(actions=actions), idempotent=True, what="slack delivery")


def _order(detail_type: str, detail: dict) -> tuple[str, int, int | None] | None:
    """(job key, rank, seq) of a job state change; None for events that are not ordered.

    A job's status only moves forward (the rules in domain/jobs: monotonic, a terminal status is final, one
    terminal status per job), so the status's place in STATUSES orders a job's state changes. When
    the producer sends `status_seq` (the new status's position in the job's status_path), it is
    used as well.
    """
    if detail_type != "rft-hub.job.state_changed":
        return None
    job_id, status = (detail.get("job") or {}).get("job_id"), detail.get("status")
    if not isinstance(job_id, str) or not job_id or status not in job_rules.STATUSES:
        return None
    seq = detail.get("status_seq")
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0 else None
    return f"{detail['team_id']}#{job_id}", job_rules.STATUSES.index(status), seq


def _take_turn(job_key: str, rank: int, seq: int | None, event_id: str) -> bool:
    """One conditional write on the job's cursor: True unless a newer state change of the job was
    already posted (or is being posted). The same event may take its turn again (a retry)."""
    cursor = SlackJobCursor
    newer = cursor.rank < rank
    if seq is not None:   # the producer's sequence, when both have one; else the status order
        newer = (cursor.seq.exists() & (cursor.seq < seq)) | (cursor.seq.does_not_exist() & newer)
    actions = [cursor.rank.set(rank), cursor.event_id.set(event_id), cursor.expires_at.set(timedelta(days=30)),
               cursor.seq.set(seq) if seq is not None else cursor.seq.remove()]
    try:
        dynamo.call(lambda: cursor(job_key).update(
            actions=actions, condition=cursor.job_key.does_not_exist() | (cursor.event_id == event_id) | newer),
            idempotent=True, what="slack job order")   # a repeat is the same event taking its turn again
        return True
    except UpdateError as exc:
        if not _conditional_failed(exc):
            raise
        return False


def _job_message(detail: dict) -> dict:
    job_id = (detail.get("job") or {}).get("job_id")
    rewards, path, budget_line = [], [], None
    try:
        job = Job.get(detail["team_id"], job_id)
        path = list(job.status_path or [])
        rewards = job_rewards.reward_curve(job_id, 40)      # bounded read, whatever the job's history
        view = budgets.view(detail["team_id"])
        estimate = (job.estimate or {}).get("estimated_usd")
        budget_line = f"~${estimate} (estimate)" if estimate else "unpriced"
        if view["limit_usd"]:
            budget_line += f" · team ${view['spent_usd']} of ${view['limit_usd']} this month"
    except DoesNotExist:
        pass
    return messages.job_message(detail, rewards, path, budget_line)


def build_message(detail_type: str, detail: dict) -> dict | None:
    if detail_type == "rft-hub.job.state_changed":
        return _job_message(detail)
    if detail_type == "rft-hub.job.stalled":
        return messages.stalled_message(detail)
    if detail_type == "rft-hub.job.watch_finding":
        return messages.watch_finding_message(detail)
    if detail_type in ("rft-hub.model.registered", "rft-hub.alias.changed"):
        return messages.model_message(detail_type, detail)
    if detail_type == "rft-hub.budget.threshold_crossed":
        return messages.budget_message(detail)
    if detail_type == "rft-hub.model.deployment_changed":
        return messages.deployment_message(detail)
    if detail_type == "rft-hub.eval.run_finished":
        return messages.eval_run_message(detail)
    if detail_type == "rft-hub.eval.compared":
        return messages.eval_comparison_message(detail)
    if detail_type == "rft-hub.pipeline.approval_requested":
        return messages.pipeline_approval_message(detail)
    if detail_type == "rft-hub.pipeline.run_finished":
        return messages.pipeline_run_message(detail)
    return None


def deliver(body: str, receipt_handle: str | None = None) -> str:
    """Posts one rft-hub event to its team's webhook. Raises RetryLater to leave it queued.

    * At most once per event id (a lease while sending, then a final status).
    * In order per job: a state change older than one already posted (or being posted) for the
      same job is dropped as "superseded" (the newer message shows the whole status path).
    * Unknown outcomes are never re-posted: when the request went out and no answer came back
      (a timeout), or an attempt died while sending, Slack may already show the message and
      incoming webhooks cannot dedupe, so a second post would be the duplicate issue #19 saw.
      The delivery is recorded as "unknown" and the message leaves the queue; a lost
      notification costs less than a wrong or repeated one, and the job's state stays in rft-hub
      (`/rft status`, the next state change's message).
    * Only answers that say the post did not happen (429, 5xx, a connection that never opened) are
      retried; 3xx and the permanent errors mark the webhook broken and dead-letter the message.
    """
    try:
        event = json.loads(body)
        detail_type, detail = event["detail-type"], event["detail"]
        event_id, team_id = detail["event_id"], detail["team_id"]
    except (ValueError, KeyError, TypeError):
        logger.warning("unreadable notification dropped")
        return "dropped"
    if detail_type == "rft-hub.budget.threshold_crossed":
        # Every rft-hub event passes through this queue (a rule on the bus), Slack configured or not.
        metrics.budget_threshold(team_id, detail.get("threshold"))
    if not isinstance(team_id, str) or not team_id:
        return "not-wanted"         # an event of no team (an audit entry of a price change): no channel
    try:
        # consistent: a rotated webhook applies to the next message
        cfg = dynamo.call(lambda: SlackConfig.get(team_id, consistent_read=True), idempotent=True, what="slack config")
    except DoesNotExist:
        return "not-configured"
    wanted = detail_type in messages.ALWAYS or messages.CATEGORY.get(detail_type) in (cfg.notify or [])
    if not cfg.webhook_secret_id or not wanted:
        return "not-wanted"
    if (cfg.health or {}).get("status") == "broken":
        return "webhook-broken"
    message = build_message(detail_type, detail)
    if message is None:
        return "dropped"
    # Everything that can fail comes before the claim (an exception leaves the message queued); after
    # it there is only the post, which never raises.
    url = _webhook_url(cfg.webhook_secret_id)
    order = _order(detail_type, detail)
    if order and not _take_turn(*order, event_id):
        return "superseded"
    claimed = _claim(event_id)
    if claimed != "claimed":
        return claimed
    result = slack_http.post(url, message)
    if result.ok:
        _settle(event_id, "sent")
        if (cfg.health or {}).get("status") != "ok":
            _mark_health(team_id, "ok", None)
        return "sent"
    if result.unknown:
        _settle(event_id, "unknown", f"{result.body}; not re-posted")
        logger.warning("slack delivery outcome unknown; not re-posted", extra={"event_id": event_id})
        metrics.slack_delivery_failed()
        return "unknown"
    error = f"{result.status} {result.body}"[:200]
    _settle(event_id, "failed", error)
    metrics.slack_delivery_failed()
    if result.permanent:
        _mark_health(team_id, "broken", error)
        _dead_letter(body, f"permanent: {error}")
        return "dead-lettered"
    delay = result.retry_after if result.status == 429 and result.retry_after else None
    _delay(receipt_handle, delay)
    raise RetryLater(f"Slack answered {result.status}; retrying")


def _delay(receipt_handle: str | None, seconds: float | None) -> None:
    """Honours Retry-After (or backs off) by hiding the message for that long."""
    if not receipt_handle:
        return
    try:
        aws.sqs().change_message_visibility(QueueUrl=queues.url(notify_queue()), ReceiptHandle=receipt_handle,
                                            VisibilityTimeout=int(min(900, max(1, seconds or 30))))
    except Exception:  # noqa: BLE001 - the queue's own visibility timeout applies instead
        logger.warning("could not delay the notification")


def _dead_letter(body: str, reason: str) -> None:
    queues.send(dead_letter_queue(), body,
                MessageAttributes={"reason": {"DataType": "String", "StringValue": reason[:250]}})


# ---- the platform's own channel: CloudWatch alarms (SNS -> alarm_notifier) --------------------

def ops_webhook_secret_id() -> str:
    """The secret holding the incoming-webhook URL of the platform's own channel (a credential)."""
    return os.environ.get("RFT_OPS_SLACK_WEBHOOK_SECRET_ID", f"rfthub/{stage()}/ops-slack-webhook")


def _change_ms(text: str) -> int | None:
    """CloudWatch's StateChangeTime ("2026-12-05T08:01:02.345+0000") in epoch milliseconds."""
    from datetime import datetime

    for fmt in ("%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S%z"):
        try:
            return int(datetime.strptime(text, fmt).timestamp() * 1000)
        except (TypeError, ValueError):
            continue
    return None


def post_alarm(sns_message: str) -> str:
    """Posts one alarm state change to the platform's channel: once per state change (its alarm,
    time and new state are the delivery's id), in order per alarm (an older change than one
    already posted is dropped), never repeated after an unknown outcome; 429/5xx raise RetryLater
    (SNS retries the invocation)."""
    try:
        alarm = json.loads(sns_message)
        name, state, changed = alarm["AlarmName"], alarm["NewStateValue"], alarm["StateChangeTime"]
        if not all(isinstance(v, str) and v for v in (name, state, changed)):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        logger.warning("unreadable alarm notification dropped")
        return "dropped"
    seq = _change_ms(changed)
    if seq is None:
        logger.warning("alarm notification without a readable time dropped", extra={"alarm": name[:255]})
        return "dropped"
    try:
        url = aws.secrets().get_secret_value(SecretId=ops_webhook_secret_id())["SecretString"]
    except aws.secrets().exceptions.ResourceNotFoundException:
        return "not-configured"
    event_id = ids.stable_id("alarm", name, changed, state)
    if not _take_turn(f"alarm#{name}", 0, seq, event_id):
        return "superseded"
    claimed = _claim(event_id)
    if claimed != "claimed":
        return claimed
    result = slack_http.post(url, messages.alarm_message(alarm))
    if result.ok:
        _settle(event_id, "sent")
        metrics.alarm_posted()
        return "sent"
    metrics.slack_delivery_failed()
    if result.unknown:
        _settle(event_id, "unknown", f"{result.body}; not re-posted")
        return "unknown"
    _settle(event_id, "failed", f"{result.status} {result.body}"[:200])
    if result.permanent:
        logger.error("the platform's alarm webhook refuses posts", extra={"status": result.status})
        return "failed"
    raise RetryLater(f"Slack answered {result.status}; retrying")


def post_alarms(event: dict) -> list[str]:
    """An SNS delivery to the alarm notifier: each record's message, in order. A raise (RetryLater)
    makes Lambda retry the whole event; records already sent are then duplicates, not re-posted."""
    records = event.get("Records") if isinstance(event, dict) else None
    return [post_alarm((r.get("Sns") or {}).get("Message") or "") if isinstance(r, dict) else "dropped"
            for r in records or []]
