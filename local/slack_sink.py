"""A local stand-in for hooks.slack.com: incoming webhooks and response_url.

Records every message (GET /messages, and appended to a log file) and can answer like
Slack does when things go wrong, for the next `count` posts (POST /_local/fail, one fault at a time;
POST /_local/reset clears it and the messages):

* an error: {"status": 429, "count": 2, "retry_after": 1, "body": "rate_limited"};
* a redirect: {"status": 302, "count": 1, "location": "http://127.0.0.1:8005/services/elsewhere"};
* a hang: {"hang_seconds": 3, "count": 1} records the message (Slack posted it) and answers 200 only
  after 3 s, so a client with a shorter timeout cannot know it was posted; with "record": false the
  message is lost instead.

It also clicks buttons, as a person in Slack would: POST /_local/slack/click {"message": <index in
/messages, default the newest with buttons>, "action": "approve" | "reject", "user": "U..."} sends the
interactivity request Slack would send (a `block_actions` payload, form-encoded, signed with the
app's signing secret and the current time) to rft-hub's /slack/interactions, and answers with rft-hub's
status and body. The answer rft-hub posts to the request's `response_url` (/actions/<n>) is recorded
like any message, and a `replace_original` one replaces the clicked message in /messages.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from flask import Flask, Response, jsonify, request


def signed_request(secret: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The headers Slack signs a request with (v0, HMAC-SHA256 of "v0:<ts>:<body>")."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}",
            "Content-Type": "application/x-www-form-urlencoded"}


def _buttons(payload: dict) -> list[dict]:
    return [e for b in payload.get("blocks") or [] if b.get("type") == "actions" for e in b.get("elements") or []]


def create_app(log_path: str | None = None, signing_secret: str | None = None,
               interactions_url: str | None = None) -> Flask:
    app = Flask("local-slack")
    state = {"messages": [], "faults": [], "lock": threading.Lock()}
    app.config["sink"] = state
    app.config["signing_secret"] = signing_secret
    app.config["interactions_url"] = interactions_url

    @app.post("/actions/<int:index>")
    def respond(index):
        """A `response_url`: the answer to a click on message `index`."""
        try:
            payload = json.loads(request.get_data() or b"{}")
        except ValueError:
            return Response("invalid_payload", status=400)
        with state["lock"]:
            state["messages"].append({"path": request.path, "at": time.time(), "payload": payload})
            if payload.get("replace_original") and 0 <= index < len(state["messages"]):
                state["messages"][index]["payload"] = payload
        return Response("ok", status=200)

    @app.post("/_local/slack/click")
    def click():
        body = request.get_json(force=True, silent=True) or {}
        action, user = body.get("action"), body.get("user")
        if action not in ("approve", "reject") or not isinstance(user, str):
            return Response('{"error": "send {\"action\": \"approve\" | \"reject\", \"user\": \"U...\", '
                            '\"message\": <index>}"}', status=400, content_type="application/json")
        with state["lock"]:
            indexed = list(enumerate(state["messages"]))
        wanted = body.get("message")
        found = [(i, m) for i, m in indexed if _buttons(m["payload"]) and (wanted is None or i == wanted)]
        if not found:
            return jsonify({"error": "no message with buttons" + (f" at index {wanted}" if wanted is not None else "")}), 404
        index, message = found[-1]
        button = next((e for e in _buttons(message["payload"]) if e.get("action_id") == f"pipeline_{action}"), None)
        if button is None:
            return jsonify({"error": f"message {index} has no {action} button"}), 404
        hook = message["path"].split("/")
        payload = {"type": "block_actions", "user": {"id": user}, "team": {"id": hook[2] if len(hook) > 2 else "T"},
                   "channel": {"id": "CLOCAL"}, "api_app_id": "ALOCAL", "trigger_id": f"{time.time():.6f}",
                   "response_url": f"{request.host_url}actions/{index}", "container": {"type": "message"},
                   "message": message["payload"],
                   "actions": [{"type": "button", "action_id": button["action_id"], "value": button.get("value"),
                                "block_id": "", "action_ts": f"{time.time():.6f}"}]}
        data = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
        headers = signed_request(app.config["signing_secret"] or "", data)
        req = urllib.request.Request(app.config["interactions_url"], data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode()
        return jsonify({"message": index, "status": status, "body": text})

    @app.post("/services/<path:hook>")
    @app.post("/commands/<path:hook>")
    def receive(hook):
        with state["lock"]:
            fault = next((f for f in state["faults"] if f["count"] > 0), None)
            if fault:
                fault["count"] -= 1
        hang = float(fault.get("hang_seconds") or 0) if fault else 0
        if fault and not hang:
            headers = {"Retry-After": str(fault["retry_after"])} if fault.get("retry_after") else {}
            if fault.get("location"):
                headers["Location"] = fault["location"]
            return Response(fault.get("body", "error"), status=fault.get("status", 500), headers=headers)
        try:
            payload = json.loads(request.get_data() or b"{}")
        except ValueError:
            return Response("invalid_payload", status=400)
        if not (fault and fault.get("record") is False):
            entry = {"path": request.path, "at": time.time(), "payload": payload}
            with state["lock"]:
                state["messages"].append(entry)
            if log_path:
                with open(log_path, "a") as log:
                    log.write(json.dumps(entry) + "\n")
        if hang:
            time.sleep(min(hang, 60))
        return Response("ok", status=200)

    @app.get("/messages")
    def messages():
        with state["lock"]:
            return jsonify(state["messages"])

    @app.post("/_local/fail")
    def fail():
        fault = request.get_json(force=True, silent=True)
        if not isinstance(fault, dict) or not isinstance(fault.get("count", 1), int):
            return Response("a fault is an object; see the module docstring", status=400)
        with state["lock"]:
            state["faults"] = [{"count": 1, **fault}]
        return jsonify({"ok": True})

    @app.post("/_local/reset")
    def reset():
        with state["lock"]:
            state["messages"].clear()
            state["faults"].clear()
        return jsonify({"ok": True})

    return app


def main() -> None:
    from werkzeug.serving import make_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8005)
    parser.add_argument("--log", default=None)
    parser.add_argument("--interactions-url", default=None)
    args = parser.parse_args()
    app = create_app(args.log, os.environ.get("LOCAL_SLACK_SIGNING_SECRET"), args.interactions_url)
    make_server("127.0.0.1", args.port, app, threaded=True).serve_forever()


if __name__ == "__main__":
    main()
