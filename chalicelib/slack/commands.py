"""Slack slash commands (`/rft ...`): verified with the signing secret and the timestamp window, answered
at once for reads, and queued for what takes longer (cancel), finished by the commands queue's consumer
through the command's `response_url`."""
from __future__ import annotations

import json
import os
import re
import urllib.parse

from pynamodb.exceptions import DoesNotExist

from chalicelib.adapters import queues
from chalicelib.adapters import slack as slack_http
from chalicelib.adapters.secrets import get_secret
from chalicelib.domain import slack_messages as messages
from chalicelib.errors import ApiError, Unauthorized
from chalicelib.inference import registry
from chalicelib.pipelines import runs as pipeline_runs
from chalicelib.pipelines import specs as pipeline_specs
from chalicelib.platform import teams
from chalicelib.slack import notifications
from chalicelib.spend import budgets
from chalicelib.store.models import Job, SlackChannel
from chalicelib.training import rewards as job_rewards
from chalicelib.training import state as job_state

HELP = ["`/rft help` this list", "`/rft jobs` recent jobs", "`/rft status <job>` one job",
        "`/rft usage` month-to-date spend against the budget", "`/rft models` tuned models and aliases",
        "`/rft keys` the team's API keys (role, models, expiry, last use)", "`/rft cancel <job>` cancel a running job",
        "`/rft pipeline run <name>` start a pipeline run", "`/rft pipeline status <name>` its newest runs"]


def verify(raw_body: bytes, headers: dict) -> dict:
    failed = Unauthorized("Request verification failed.", code="invalid_signature")
    timestamp, signature = headers.get("x-slack-request-timestamp"), headers.get("x-slack-signature")
    # Slack sends Unix seconds and "v0=<hex>"; anything else (e.g. "abc", "1e9", 5,000 digits, "") would
    # make the verifier raise (int(), UTF-8 decoding, compare_digest on non-ASCII) instead of saying no.
    if not (isinstance(timestamp, str) and re.fullmatch(r"[0-9]{1,12}", timestamp)
            and isinstance(signature, str) and re.fullmatch(r"v0=[0-9a-f]{64}", signature)):
        raise failed
    secret = get_secret(settings_secret_id())
    try:
        from slack_sdk.signature import SignatureVerifier  # only slash commands pay its import

        valid = SignatureVerifier(secret).is_valid(raw_body, timestamp, signature)
    except (ValueError, TypeError):   # e.g. a body that is not UTF-8
        valid = False
    if not valid:
        raise failed
    form = urllib.parse.parse_qs(raw_body.decode("utf-8", errors="replace"))
    return {k: v[0] for k, v in form.items()}


def settings_secret_id() -> str:
    return os.environ.get("RFT_SLACK_SIGNING_SECRET_ID", f"rfthub/{notifications.stage()}/slack-signing-secret")


def command(form: dict) -> dict:
    try:
        team_id = SlackChannel.get(form.get("team_id", ""), form.get("channel_id", "")).team_id
    except DoesNotExist:
        return messages.ephemeral("This channel is not linked to an rft-hub team yet. Ask your rft-hub admin to "
                                  "add it to the team's Slack settings.")
    words = (form.get("text") or "").split()
    name, args = (words[0].lower(), words[1:]) if words else ("help", [])
    if name == "help":
        return messages.ephemeral("rft-hub commands:", HELP)
    if name == "jobs":
        recent = job_state.list_jobs(team_id, 10, None)["data"]   # one query of 11 items, newest first
        lines = [f"`{j['id']}` {j['model']} *{j['status']}* best reward {_best(j['id'])}" for j in recent]
        return messages.ephemeral(f"{len(recent)} most recent jobs:" if recent else "No jobs yet.", lines)
    if name == "status":
        job = _job_arg(team_id, args)
        if isinstance(job, dict):
            return job
        path = " → ".join(job.status_path or [job.status])
        return messages.ephemeral(f"`{job.job_id}` ({job.model}) is *{job.status}*.",
                                  [f"Path: {path}", f"Best reward: {_best(job.job_id)}",
                                   f"Model: `{job.fine_tuned_model or '—'}`"] +
                                  ([f"Error: {job.error.get('message')}"] if job.error else []))
    if name == "usage":
        view = budgets.view(team_id)
        limit = f"${view['limit_usd']}" if view["limit_usd"] else "no budget set"
        return messages.ephemeral(f"Spent ${view['spent_usd']} in {view['current_period']} ({limit}).",
                                  [f"Reserved in flight: ${view['reserved_usd']}",
                                   f"Resets: <!date^{view['resets_at']}^{{date_short}}|next month>"])
    if name == "models":
        lines = [f"`{a['id']}` → `{a['rft_target']}` (v{a['rft_version']})" for a in registry.list_aliases(team_id)]
        lines += [f"`{m['id']}` best reward {m['rft_best_reward']}" for m in registry.list_tuned(team_id)]
        return messages.ephemeral("Your models:" if lines else "No tuned models yet.", lines)
    if name == "keys":
        return _keys(team_id)
    if name == "cancel":
        job = _job_arg(team_id, args)
        if isinstance(job, dict):
            return job
        queues.send(notifications.commands_queue(), json.dumps(
            {"command": "cancel", "team_id": team_id, "job_id": job.job_id, "response_url": form.get("response_url")}))
        return messages.ephemeral(f"Cancelling `{job.job_id}`… I will post here when it is done.")
    if name == "pipeline":
        return _pipeline(team_id, args, form.get("user_id"))
    return messages.ephemeral(f"Unknown command `{truncate_word(name)}`.", HELP)


def _pipeline(team_id: str, args: list[str], user: str | None) -> dict:
    """`/rft pipeline run|status <name>` (issue #27)."""
    if len(args) < 2 or args[0] not in ("run", "status"):
        return messages.ephemeral("Try `/rft pipeline run <name>` or `/rft pipeline status <name>`.")
    found = pipeline_specs.find_by_name(team_id, args[1])
    if found is None:
        return messages.ephemeral(f"No pipeline `{truncate_word(args[1])}` in this team.")
    if args[0] == "run":
        try:
            run = pipeline_runs.trigger(team_id, found.pipeline_id, "manual", by=f"slack:{user}")
        except ApiError as err:
            return messages.ephemeral(f"Could not start `{found.name}`: {err.message}")
        return messages.ephemeral(f"Pipeline `{found.name}`: run `{run['id']}` is *{run['status']}*.")
    recent = pipeline_runs.list_runs(team_id, found.pipeline_id, 5, None)["data"]
    lines = [f"`{r['id']}` *{r['status']}*" + (f" at {r['error']['step']}: {messages.truncate(r['error']['message'], 200)}"
                                               if r.get("error") and r["error"].get("message") else "")
             + (f", waiting on {r['waiting_on']}" if r.get("waiting_on") else "") for r in recent]
    heading = "newest runs:" if lines else "no runs yet."
    return messages.ephemeral(f"Pipeline `{found.name}` (v{found.version}): {heading}", lines)


def _keys(team_id: str) -> dict:
    """The team's keys, newest first: prefix, name, owner, role, models, status, expiry, last use. Never a
    secret (only the public prefix is stored with the hash)."""
    found = sorted(teams.team_keys(team_id), key=lambda k: k.created_at, reverse=True)
    lines = []
    for key in found[:20]:
        view = teams.key_view(key)
        models = ", ".join(f"`{m}`" for m in view["models"]) if view["models"] else "any model"
        expires = f" until <!date^{view['expires_at']}^{{date_short}}|{view['expires_at']}>" \
            if view["expires_at"] and view["status"] == "active" else ""
        who = " ".join(x for x in (messages.truncate(view["name"] or "", 60),
                                   f"({messages.truncate(view['owner'], 60)})" if view["owner"] else "") if x)
        lines.append(f"`{view['prefix']}` {who} *{view['role']}* {models}, {view['status']}{expires}, "
                     f"last used {view['last_used'] or 'never'}".replace("  ", " "))
    more = f" (newest 20 of {len(found)})" if len(found) > 20 else ""
    return messages.ephemeral(f"{len(found)} API keys{more}:" if found else "No API keys.", lines)


def truncate_word(word: str) -> str:
    return messages.truncate(re.sub(r"[`*_~<>]", "", word), 40)


def _best(job_id: str) -> str:
    best = job_rewards.best_reward(job_id)   # one GetItem (or a bounded window for older jobs)
    return f"{best:.3f}" if best is not None else "—"


def _job_arg(team_id: str, args: list[str]):
    if not args:
        return messages.ephemeral("Which job? Try `/rft jobs` for ids.")
    try:
        return Job.get(team_id, args[0])
    except DoesNotExist:   # another team's job looks exactly like a missing one
        return messages.ephemeral(f"No job `{truncate_word(args[0])}` in this team.")


def finish_command(body: str) -> str:
    """Queue consumer for slow commands: do the work, answer through response_url."""
    task = json.loads(body)
    if task.get("command") != "cancel":
        return "ignored"
    try:
        job = job_state.cancel(task["team_id"], task["job_id"])
        text = f"`{job['id']}` is now *{job['status']}*."
    except Exception as exc:  # noqa: BLE001 - the user gets an answer either way
        text = f"Could not cancel `{task['job_id']}`: {getattr(exc, 'message', type(exc).__name__)}"
    url = task.get("response_url") or ""
    if notifications.allowed_url(url):
        slack_http.post(url, messages.ephemeral(text))
    return text


