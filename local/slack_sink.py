"""A local stand-in for hooks.slack.com: incoming webhooks and response_url.

Records every message (GET /messages, and appended to a log file) and can answer like
Slack does when things go wrong, for the next `count` posts (POST /_local/fail, one fault at a time;
POST /_local/reset clears it and the messages):

* an error: {"status": 429, "count": 2, "retry_after": 1, "body": "rate_limited"};
* a redirect: {"status": 302, "count": 1, "location": "http://127.0.0.1:8005/services/elsewhere"};
* a hang: {"hang_seconds": 3, "count": 1} records the message (Slack posted it) and answers 200 only
  after 3 s, so a client with a shorter timeout cannot know it was posted; with "record": false the
  message is lost instead.
"""
from __future__ import annotations

import argparse
import json
import threading
import time

from flask import Flask, Response, jsonify, request


def create_app(log_path: str | None = None) -> Flask:
    app = Flask("local-slack")
    state = {"messages": [], "faults": [], "lock": threading.Lock()}
    app.config["sink"] = state

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
    args = parser.parse_args()
    make_server("127.0.0.1", args.port, create_app(args.log), threaded=True).serve_forever()


if __name__ == "__main__":
    main()
