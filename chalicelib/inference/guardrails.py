"""Amazon Bedrock Guardrails on the gateway (issue #29): an admin attaches a guardrail (identifier
and version) to a team or to one of its aliases (the alias's wins); the gateway checks a call's
prompt with ApplyGuardrail before the upstream call (`check_input`) and its output after it
(`check_output`, or `OutputGuard` for a stream, in chunks of CHUNK_CHARS characters).

An intervention answers as OpenAI answers for its own content filter: a blocked prompt is a 400 with
code `content_filter` (`blocked_error`), nothing sent upstream; a blocked output ends with
`finish_reason: "content_filter"`; a masked output (PII anonymized) is the masked text. Every
ApplyGuardrail call is priced (`Verdict.cost_micro`, integer micro-dollars) for the ledger's
`kind: guardrail` entry (the metering path's owner records it).

Streams: output is held back until its chunk has been checked, so what the client receives has
passed the guardrail (or is masked); a chunk is CHUNK_CHARS characters (one ApplyGuardrail text
unit), cut at the last whitespace inside it so a word or an e-mail address is rarely split across
two checks. A blocked chunk is never sent: the stream ends with what came before it.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal

from chalicelib import deadline
from chalicelib.adapters import bedrock_native
from chalicelib.cache import TTLCache
from chalicelib.errors import InvalidRequest, NotFound, UpstreamError
from chalicelib.platform import audit
from chalicelib.store import dynamo
from chalicelib.store.models import GuardrailAttachment

TEAM = "team"
CHUNK_CHARS = 1000          # a text unit: ApplyGuardrail bills each text block per 1,000 characters
# botocore's bedrock-runtime model: GuardrailIdentifier and GuardrailVersion (the empty string aside).
IDENTIFIER = re.compile(r"[a-z0-9]+|arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:[0-9]{12}:guardrail/[a-z0-9]+")
VERSION = re.compile(r"[1-9][0-9]{0,7}|DRAFT")

# USD per 1,000 text units, per policy, as ApplyGuardrail's `usage` reports units. UNCONFIRMED: not in
# shared/docs; from AWS's Bedrock pricing page as last known (content filters and denied topics $0.15,
# PII filters and contextual grounding $0.10, word filters and regex filters free). The free unit
# counters are kept at 0 and every counter rft-hub does not know is charged at the highest known rate,
# so an unknown policy errs towards charging, never towards serving for free.
PRICE_PER_1000_UNITS = {
    "topicPolicyUnits": Decimal("0.15"),
    "contentPolicyUnits": Decimal("0.15"),
    "wordPolicyUnits": Decimal("0"),
    "sensitiveInformationPolicyUnits": Decimal("0.10"),
    "sensitiveInformationPolicyFreeUnits": Decimal("0"),
    "contextualGroundingPolicyUnits": Decimal("0.10"),
}
UNKNOWN_PRICE = max(PRICE_PER_1000_UNITS.values())
NOT_UNITS = {"automatedReasoningPolicies"}   # a count of policies, not of text units


@dataclass(frozen=True)
class Guardrail:
    identifier: str
    version: str
    scope: str


@dataclass
class Verdict:
    guardrail: Guardrail
    action: str                          # NONE | GUARDRAIL_INTERVENED
    blocked: bool                        # intervened without a masked text to give (a block)
    texts: list[str]                     # what to use instead when intervened (masked text, or the message)
    cost_micro: int
    units: dict = field(default_factory=dict)
    reason: str | None = None

    @property
    def intervened(self) -> bool:
        return self.action == "GUARDRAIL_INTERVENED"


def cost_micro(usage: dict) -> int:
    """What an ApplyGuardrail call costs, in micro-dollars, rounded up (exact: Decimal, never float)."""
    usd = Decimal(0)
    for name, units in (usage or {}).items():
        if name in NOT_UNITS or not isinstance(units, int) or isinstance(units, bool) or units <= 0:
            continue
        usd += Decimal(units) * PRICE_PER_1000_UNITS.get(name, UNKNOWN_PRICE) / 1000
    return math.ceil(usd * 1_000_000)


# ---- attachments ------------------------------------------------------------------------------------

def scope_of(alias: str | None) -> str:
    return f"alias:{alias}" if alias else TEAM


def view(item: GuardrailAttachment) -> dict:
    alias = item.scope.split(":", 1)[1] if item.scope.startswith("alias:") else None
    return {"object": "guardrail_attachment", "team_id": item.team_id, "alias": alias,
            "guardrail_identifier": item.guardrail_identifier, "guardrail_version": item.guardrail_version,
            "updated_at": item.updated_at}


_FIELDS = ("guardrail_identifier", "guardrail_version")
_attached = TTLCache(ttl_seconds=30)   # another instance's change is honoured within 30 s


def attach(team_id: str, identifier: str, version: str, alias: str | None, now: int) -> dict:
    if not IDENTIFIER.fullmatch(identifier or ""):
        raise InvalidRequest("guardrail_identifier must be a guardrail id (lowercase letters and digits) or its "
                             "ARN.", param="guardrail_identifier")
    if not VERSION.fullmatch(version or ""):
        raise InvalidRequest("guardrail_version must be a version number (1-99999999) or DRAFT.",
                             param="guardrail_version")
    scope = scope_of(alias)
    before = dynamo.get_or_none(GuardrailAttachment, team_id, scope, what="guardrail", consistent_read=True)
    item = GuardrailAttachment(team_id, scope, guardrail_identifier=identifier, guardrail_version=version,
                               updated_at=now)
    audit.save(item, action="guardrail.attached", target=f"guardrail:{scope}", team_id=team_id, fields=_FIELDS,
               before_item=before, what="guardrail attach")
    _attached.invalidate()
    return view(item)


def detach(team_id: str, alias: str | None) -> dict:
    scope = scope_of(alias)
    item = dynamo.get_or_none(GuardrailAttachment, team_id, scope, what="guardrail", consistent_read=True)
    if item is None:
        raise NotFound(f"No guardrail is attached to {'alias ' + repr(alias) if alias else 'the team'}.",
                       param="alias" if alias else "team_id")
    audit.delete(item, action="guardrail.detached", target=f"guardrail:{scope}", team_id=team_id, fields=_FIELDS,
                 condition=GuardrailAttachment.updated_at == item.updated_at, what="guardrail detach")
    _attached.invalidate()
    return {**view(item), "deleted": True}


def list_attached(team_id: str) -> list[dict]:
    found = dynamo.call(lambda: list(GuardrailAttachment.query(team_id, consistent_read=True)), idempotent=True,
                        what="guardrail list")
    return [view(g) for g in found]


def for_call(team_id: str, alias: str | None) -> Guardrail | None:
    """The guardrail a call is checked with: its alias's, else its team's, else none."""
    def load():
        scopes = [scope_of(alias), TEAM] if alias else [TEAM]
        for scope in scopes:
            item = dynamo.get_or_none(GuardrailAttachment, team_id, scope, what="guardrail")
            if item is not None:
                return Guardrail(item.guardrail_identifier, item.guardrail_version, scope)
        return None
    return _attached.get((team_id, alias), load)


# ---- checks -------------------------------------------------------------------------------------------

def _texts_of(content) -> list[str]:
    if isinstance(content, str):
        return [content]
    out = []
    for part in content if isinstance(content, list) else []:
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif isinstance(part, dict) and part.get("type") == "message":
            out += _texts_of(part.get("content"))
    return out


def prompt_texts(body: dict, endpoint: str) -> list[str]:
    """The text a call sends: chat messages' contents, or a response's instructions and input."""
    texts: list[str] = []
    if endpoint.endswith("chat/completions"):
        for message in body.get("messages") or []:
            if isinstance(message, dict):
                texts += _texts_of(message.get("content"))
    else:
        if isinstance(body.get("instructions"), str):
            texts.append(body["instructions"])
        texts += _texts_of(body.get("input"))
    return [t for t in texts if t]


def _apply(guardrail: Guardrail, source: str, texts: list[str]) -> Verdict:
    try:
        answer = bedrock_native.apply_guardrail(guardrail.identifier, guardrail.version, source, texts,
                                                max(1.0, deadline.remaining()))
    except NotFound:    # the attachment names a guardrail Bedrock does not have: rft-hub's setup, not the call's
        raise UpstreamError(f"The guardrail attached to this {'alias' if guardrail.scope != TEAM else 'team'} "
                            f"({guardrail.identifier}, version {guardrail.version}) does not exist on Amazon "
                            "Bedrock; an admin must attach an existing one.", code="guardrail_not_found") from None
    outputs = [o.get("text") or "" for o in answer.get("outputs") or []]
    intervened = answer.get("action") == "GUARDRAIL_INTERVENED"
    # A mask gives one output per block sent; a block gives the guardrail's message (UNCONFIRMED that
    # AWS never masks and blocks in one answer: a block is read as a block whatever the outputs).
    blocked = intervened and _any_blocked(answer.get("assessments") or [])
    return Verdict(guardrail, answer.get("action") or "NONE", blocked, outputs, cost_micro(answer.get("usage") or {}),
                   dict(answer.get("usage") or {}), answer.get("actionReason"))


def _any_blocked(value) -> bool:
    """Whether any assessment entry says BLOCKED (the policies' lists, at any depth)."""
    if isinstance(value, dict):
        return value.get("action") == "BLOCKED" or any(_any_blocked(v) for v in value.values())
    if isinstance(value, list):
        return any(_any_blocked(v) for v in value)
    return False


# "Not looked up yet": a caller that has the call's guardrail (or knows there is none) passes it on,
# so one call looks it up once (issue #29); a caller without it leaves the lookup to the check.
LOOK_UP = object()


def _given(team_id: str, alias: str | None, guardrail) -> Guardrail | None:
    return for_call(team_id, alias) if guardrail is LOOK_UP else guardrail


def check_input(team_id: str, alias: str | None, body: dict, endpoint: str, *,
                guardrail=LOOK_UP) -> Verdict | None:
    """The prompt checked before the upstream call (None: no guardrail applies, or no text)."""
    guardrail = _given(team_id, alias, guardrail)
    texts = prompt_texts(body, endpoint) if guardrail else []
    return _apply(guardrail, "INPUT", texts) if texts else None


def check_output(team_id: str, alias: str | None, text: str, *, guardrail=LOOK_UP) -> Verdict | None:
    guardrail = _given(team_id, alias, guardrail)
    return _apply(guardrail, "OUTPUT", [text]) if guardrail and text else None


def blocked_error(verdict: Verdict) -> InvalidRequest:
    """OpenAI's answer to a prompt its content filter blocks: 400, code content_filter."""
    return InvalidRequest("The prompt was blocked by the team's guardrail (Amazon Bedrock Guardrails"
                          f"{': ' + verdict.reason if verdict.reason else ''}). Change the prompt and retry.",
                          param="messages", code="content_filter")


class OutputGuard:
    """A stream's output checked chunk by chunk: `feed(delta)` returns the text cleared to send now
    (possibly masked; "" while a chunk fills), `finish()` the rest; once a chunk is blocked,
    `blocked` is set and nothing more is cleared (end the stream with finish_reason content_filter).
    `cost_micro` sums every check's price."""

    def __init__(self, team_id: str, alias: str | None, chunk_chars: int = CHUNK_CHARS, *,
                 guardrail=LOOK_UP) -> None:
        self.guardrail = _given(team_id, alias, guardrail)
        self.chunk_chars = chunk_chars
        self.pending = ""
        self.blocked = False
        self.cost_micro = 0
        self.checks = 0

    def _check(self, text: str) -> str:
        verdict = _apply(self.guardrail, "OUTPUT", [text])
        self.cost_micro += verdict.cost_micro
        self.checks += 1
        if verdict.blocked:
            self.blocked = True
            return ""
        return "".join(verdict.texts) if verdict.intervened else text

    def feed(self, delta: str) -> str:
        if self.guardrail is None:
            return delta
        if self.blocked:
            return ""
        self.pending += delta
        cleared = []
        while len(self.pending) >= self.chunk_chars and not self.blocked:
            cut = self.pending.rfind(" ", 0, self.chunk_chars) + 1 or self.chunk_chars
            chunk, self.pending = self.pending[:cut], self.pending[cut:]
            cleared.append(self._check(chunk))
        return "".join(cleared)

    def finish(self) -> str:
        if self.guardrail is None or self.blocked or not self.pending:
            return ""
        rest, self.pending = self.pending, ""
        return self._check(rest)


def filter_answer(team_id: str, alias: str | None, raw: bytes, style: str, *,
                  guardrail=LOOK_UP) -> tuple[bytes, int]:
    """A plain (not streamed) answer's text checked with source OUTPUT: (the answer to send, the checks'
    cost in micro-dollars). `style`: "chat" (each choice's message content) or "responses" (each
    output_text). Blocked: the text emptied, a chat choice's finish_reason "content_filter", a
    response "incomplete" with incomplete_details.reason "content_filter" (OpenAI's values); masked:
    the masked text. An answer that is not JSON, or has no text, is returned as it came."""
    guardrail = _given(team_id, alias, guardrail)
    if guardrail is None:
        return raw, 0
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw, 0
    cost, changed = 0, False
    for holder, key, on_block in _answer_texts(body, style):
        verdict = check_output(team_id, alias, holder[key], guardrail=guardrail)
        if verdict is None:
            continue
        cost += verdict.cost_micro
        if verdict.blocked:
            holder[key] = ""
            on_block()
            changed = True
        elif verdict.intervened:
            holder[key] = "".join(verdict.texts)
            changed = True
    return (json.dumps(body).encode() if changed else raw), cost


def _answer_texts(body, style: str):
    """(holder, key, on_block) for each text of an answer."""
    if not isinstance(body, dict):
        return
    if style == "chat":
        for choice in body.get("choices") or []:
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict) and isinstance(message.get("content"), str) and message["content"]:
                yield message, "content", lambda choice=choice: choice.__setitem__("finish_reason", "content_filter")
        return

    def incomplete():
        body["status"] = "incomplete"
        body["incomplete_details"] = {"reason": "content_filter"}
    for item in body.get("output") or []:
        for part in (item.get("content") or []) if isinstance(item, dict) else []:
            if isinstance(part, dict) and part.get("type") == "output_text" and isinstance(part.get("text"), str) \
                    and part["text"]:
                yield part, "text", incomplete
