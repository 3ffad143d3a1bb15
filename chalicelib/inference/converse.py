"""Inference on Amazon Nova through Converse: `converse_call` turns a gateway call on a Nova
model (base, tuned, alias) into Converse/ConverseStream (domain/converse.py), inside the gateway's
one metering path; the tuned model's deployment comes from inference/deployments.py.
"""
from __future__ import annotations

import json
import uuid

from chalicelib.adapters import bedrock_native as native
from chalicelib.domain import converse as translate
from chalicelib.domain import ids
from chalicelib.domain import nova as rules
from chalicelib.inference import deployments


class ConverseCall:
    """One gateway call translated to Converse: `call` answers whole, `open_stream` opens
    ConverseStream and returns an upstream whose lines are OpenAI's server-sent events."""

    def __init__(self, endpoint: str, body: dict, model_id: str, request: dict) -> None:
        self.endpoint, self.body, self.model_id, self.request = endpoint, body, model_id, request
        self.chat = endpoint == "/chat/completions"
        self.answer_model = body.get("model") or model_id
        self.id = ("chatcmpl-" if self.chat else "resp_") + uuid.uuid4().hex[:24]

    def call(self, deadline_s: float) -> tuple[int, str, bytes]:
        answer = native.converse(self.model_id, self.request, deadline_s)
        if self.chat:
            out = translate.chat_completion(answer, model=self.answer_model, id_=self.id, created=ids.now())
        else:
            out = translate.response_object(answer, body=self.body, model=self.answer_model, id_=self.id,
                                            created=ids.now())
        return 200, "application/json", json.dumps(out, separators=(",", ":")).encode()

    def open_stream(self, deadline_s: float) -> ConverseUpstream:
        events = native.converse_stream(self.model_id, self.request, deadline_s)
        if self.chat:
            translator = translate.ChatStream(model=self.answer_model, id_=self.id, created=ids.now())
        else:
            translator = translate.ResponsesStream(body=self.body, model=self.answer_model, id_=self.id,
                                                   created=ids.now())
        return ConverseUpstream(events, translator, self.chat)


class ConverseUpstream:
    """ConverseStream's events as the lines of OpenAI's event stream (what the gateway's Stream
    reads from an upstream response: `iter_lines()`, `close()`)."""

    def __init__(self, events, translator, chat: bool) -> None:
        self._events, self._translator, self._chat = events, translator, chat

    def iter_lines(self):
        for event in self._events:
            for out in self._translator.feed(event):
                if not self._chat:
                    yield f"event: {out['type']}"
                yield "data: " + json.dumps(out, separators=(",", ":"))
                yield ""
        if self._chat:
            yield "data: [DONE]"
            yield ""

    def close(self) -> None:
        try:
            self._events.close()
        except Exception:  # noqa: BLE001 - closing a finished or broken stream
            pass


def check_translatable(target, endpoint: str, body: dict) -> None:
    """Refuses (400 naming the parameter) what Converse could not take for a model it serves,
    before any call: e.g. a grader's judge, checked when the grader is."""
    if rules.is_nova(target.base_model):
        translate.chat_request(body) if endpoint == "/chat/completions" else translate.responses_request(body)


def converse_call(team_id: str, target, endpoint: str, body: dict) -> ConverseCall | None:
    """The Converse translation of a gateway call when its model is served by Converse (a base
    Nova model, a Nova custom model's Active deployment); None otherwise. Refuses before
    anything is held: a parameter Converse cannot take (400 naming it), a model not deployed."""
    if not rules.is_nova(target.base_model):
        return None
    request = translate.chat_request(body) if endpoint == "/chat/completions" else translate.responses_request(body)
    if target.upstream == target.base_model:
        model_id = target.upstream             # a base model, by its own id
    else:
        model_id = deployments.serving_arn(team_id, target.upstream)
    return ConverseCall(endpoint, body, model_id, request)
