"""Posting to Slack (incoming webhooks and response_url).

A plain HTTP POST with `http.client`, so that every outcome is known precisely:

* the connection could not be opened (refused, DNS, connect timeout): nothing was sent, a retry is safe;
* Slack answered: its status says what happened;
* the request went out but no answer came back (read timeout, reset): `unknown` -- Slack may well
  have posted it, and webhooks have no idempotency key, so a caller must not repeat it blindly;
* a redirect (3xx) is never followed (the URL allow-list would not hold for its target): a
  permanent failure.

There is no retry in here (slack-sdk's WebhookClient retried connection errors on its own, and
followed redirects); the queue consumer decides.
"""
from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.parse
from dataclasses import dataclass

PERMANENT = {"no_service", "channel_not_found", "channel_is_archived", "action_prohibited", "invalid_token",
             "team_disabled", "user_not_found", "invalid_payload", "invalid_url"}
CONNECT_TIMEOUT_S = 3.0
MAX_BODY = 64 * 1024


@dataclass
class Delivery:
    ok: bool
    status: int
    body: str
    retry_after: float | None = None
    unknown: bool = False    # sent, but no answer: Slack may or may not have posted it

    @property
    def permanent(self) -> bool:
        """A webhook that will not work again by retrying (revoked, archived, forbidden, redirected)."""
        return not self.ok and not self.unknown and (self.body.strip() in PERMANENT
                                                     or self.status in (403, 404, 410)
                                                     or 300 <= self.status < 400)


def read_timeout() -> float:
    """Seconds to wait for Slack's answer once the request is sent (RFT_SLACK_TIMEOUT_SECONDS, default 10)."""
    return float(os.environ.get("RFT_SLACK_TIMEOUT_SECONDS", "10"))


def post(url: str, message: dict, timeout: float | None = None) -> Delivery:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return Delivery(False, 0, "invalid_url")
    if parts.scheme not in ("https", "http") or not parts.hostname or not url.isascii() \
            or any(c.isspace() or ord(c) < 32 for c in url):
        return Delivery(False, 0, "invalid_url")
    timeout = read_timeout() if timeout is None else timeout
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, port, timeout=min(CONNECT_TIMEOUT_S, timeout), context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=min(CONNECT_TIMEOUT_S, timeout))
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        body = json.dumps(message, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        return Delivery(False, 0, "invalid_payload")
    try:
        try:
            conn.connect()
        except Exception as exc:  # noqa: BLE001 - refused, DNS, TLS, connect timeout: nothing was sent
            return Delivery(False, 0, f"{type(exc).__name__} while connecting")
        try:
            conn.sock.settimeout(timeout)
            conn.request("POST", target, body=body, headers={"Content-Type": "application/json; charset=utf-8",
                                                             "User-Agent": "rft-hub"})
            resp = conn.getresponse()
        except Exception as exc:  # noqa: BLE001 - whatever it was, the request may have gone out
            return Delivery(False, 0, f"{type(exc).__name__} after the request was sent", unknown=True)
        try:
            text = resp.read(MAX_BODY).decode("utf-8", errors="replace")
        except (OSError, http.client.HTTPException):
            text = ""
    finally:
        conn.close()
    if 300 <= resp.status < 400:
        return Delivery(False, resp.status, f"redirect ({resp.status}) not followed: a webhook must answer itself")
    retry_after = resp.getheader("Retry-After")
    try:
        wait = float(retry_after) if retry_after else None
    except ValueError:
        wait = None
    return Delivery(resp.status == 200, resp.status, text, wait)
