"""Posting to Slack (incoming webhooks and response_url) with slack-sdk's WebhookClient."""
from __future__ import annotations

from dataclasses import dataclass

from slack_sdk.webhook import WebhookClient

PERMANENT = {"no_service", "channel_not_found", "channel_is_archived", "action_prohibited", "invalid_token",
             "team_disabled", "user_not_found", "invalid_payload"}


@dataclass
class Delivery:
    ok: bool
    status: int
    body: str
    retry_after: float | None = None

    @property
    def permanent(self) -> bool:
        """A webhook that will not work again by retrying (revoked, archived, forbidden)."""
        return not self.ok and (self.body.strip() in PERMANENT or self.status in (403, 404, 410))


def post(url: str, message: dict, timeout: int = 10) -> Delivery:
    try:
        resp = WebhookClient(url, timeout=timeout).send(**message)
    except Exception as exc:  # noqa: BLE001 - network trouble is retryable
        return Delivery(False, 0, f"{type(exc).__name__}")
    retry_after = resp.headers.get("Retry-After") or resp.headers.get("retry-after")
    if isinstance(retry_after, list):
        retry_after = retry_after[0]
    return Delivery(resp.status_code == 200, resp.status_code, resp.body or "",
                    float(retry_after) if retry_after else None)
