"""A job's rewards, read with bounded work: the best (a summary item kept as events are saved), the
final, and the curve. Written by training/record.py (`_note_reward`), read by registration, Slack and
the console."""
from __future__ import annotations

from chalicelib.domain import numbers
from chalicelib.store import dynamo, pagination
from chalicelib.store.models import JobEvent

# The reward curve is read with bounded work, however long the job's history (issue #12):
# * best: the job's reward summary item in the job_events table (hash "<job id>#rewards", range
#   "best", outside the job's own partition), raised by one conditional write per improving metrics
#   event as events are saved (training/record.py `save_event`); one GetItem to read.
# * final, and curves: the newest metrics events, read newest first from the job's partition with a
#   `type = metrics` filter, at most REWARD_WINDOW events evaluated.
# * jobs whose events predate the summary: best over that same bounded window.
REWARDS_SUFFIX = "#rewards"
REWARDS_BEST = "best"
REWARD_WINDOW = 200


def rewards_key(job_id: str) -> str:
    return f"{job_id}{REWARDS_SUFFIX}"


def reward_of(data: dict | None) -> float | None:
    """A metrics event's reward (`critic_rewards_mean`), if it is a finite number."""
    value = (data or {}).get("critic_rewards_mean")
    return numbers.finite(value)     # never OverflowError on a huge int


def _newest_rewards(job_id: str, count: int) -> list[float]:
    """Rewards of the job's newest `count` metrics events, newest first; evaluates at most
    REWARD_WINDOW events (fewer when `count` metrics events come sooner)."""
    page_size = 50
    page = pagination.query(JobEvent, job_id, limit=count, filter_condition=JobEvent.type == "metrics",
                            keep=lambda e: reward_of(e.data) is not None, page_size=page_size,
                            max_pages=max(1, REWARD_WINDOW // page_size), what="reward curve")
    return [reward_of(e.data) for e in page.items]


def _stored_best(job_id: str) -> float | None:
    item = dynamo.get_or_none(JobEvent, rewards_key(job_id), REWARDS_BEST, what="best reward")
    return float(item.best_reward) if item is not None and item.best_reward is not None else None


def best_reward(job_id: str) -> float | None:
    best = _stored_best(job_id)
    if best is None:
        window = _newest_rewards(job_id, REWARD_WINDOW)
        best = max(window) if window else None
    return best


def rewards(job_id: str) -> tuple[float | None, float | None]:
    """(final, best) reward of a job, with bounded reads."""
    newest = _newest_rewards(job_id, 1)
    final = newest[0] if newest else None
    best = best_reward(job_id)
    if final is not None and (best is None or final > best):
        best = final
    return final, best


def reward_curve(job_id: str, points: int = 20) -> list[float]:
    """The newest `points` rewards, oldest first (a sparkline's data), with a bounded read."""
    return list(reversed(_newest_rewards(job_id, points)))
