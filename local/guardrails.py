"""The local Bedrock's Guardrails (issue #29): `ApplyGuardrail` (bedrock-runtime, SigV4), its input
checked against botocore's service model as AWS checks it, and guardrails made through
`POST /_local/guardrails` (never AWS's CreateGuardrail: the local stack needs only what rft-hub calls).

A guardrail here has three policies, each as AWS reports it in `assessments`:
* blocked words (`wordPolicy.customWords`): a whole-word, case-insensitive match blocks;
* regexes (`sensitiveInformationPolicy.regexes`): action BLOCK or ANONYMIZE (the match becomes `{NAME}`);
* PII (`sensitiveInformationPolicy.piiEntities`): EMAIL, PHONE, US_SOCIAL_SECURITY_NUMBER,
  CREDIT_DEBIT_CARD_NUMBER, IP_ADDRESS, each BLOCK or ANONYMIZE (the match becomes `{TYPE}`).
A block answers GUARDRAIL_INTERVENED with the guardrail's blocked message as the only output; a mask
answers GUARDRAIL_INTERVENED with the masked text. Usage counts text units as AWS bills them: each
text block is ceil(characters / 1,000) units, per policy that ran (word and regex units are reported
and free; PII units are charged).
"""
from __future__ import annotations

import math
import re
import secrets
from urllib.parse import unquote

from flask import Blueprint, jsonify, request

from local import bedrock_native

PII_PATTERNS = {
    "EMAIL": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    "US_SOCIAL_SECURITY_NUMBER": r"\b\d{3}-\d{2}-\d{4}\b",
    "CREDIT_DEBIT_CARD_NUMBER": r"\b(?:\d[ -]?){13,16}\b",
    "PHONE": r"(?<!\d)(?:\+?1[ .-]?)?\(?\d{3}\)?[ .-]?\d{3}[ .-]\d{4}(?!\d)",
    "IP_ADDRESS": r"\b(?:\d{1,3}\.){3}\d{1,3}\b",
}
ACTIONS = {"BLOCK": "BLOCKED", "ANONYMIZE": "ANONYMIZED"}
UNIT_CHARS = 1000
IDENTIFIER = r"[a-z0-9]+|arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:[0-9]{12}:guardrail/[a-z0-9]+"
VERSION = r"[1-9][0-9]{0,7}|DRAFT"


def _units(texts: list[str]) -> int:
    return sum(max(1, math.ceil(len(t) / UNIT_CHARS)) for t in texts)


def _check_definition(body) -> dict:
    """A guardrail as POST /_local/guardrails takes it, or ValueError."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    unknown = set(body) - {"name", "blocked_words", "regexes", "pii", "blocked_input_messaging",
                           "blocked_outputs_messaging"}
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}")
    words = body.get("blocked_words", [])
    if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError("blocked_words must be a list of words")
    regexes = body.get("regexes", [])
    for r in regexes if isinstance(regexes, list) else [None]:
        if not isinstance(r, dict) or not isinstance(r.get("pattern"), str) or r.get("action", "BLOCK") not in ACTIONS:
            raise ValueError("regexes: [{name, pattern, action: BLOCK|ANONYMIZE}]")
        re.compile(r["pattern"])
    pii = body.get("pii", [])
    for p in pii if isinstance(pii, list) else [None]:
        if not isinstance(p, dict) or p.get("type") not in PII_PATTERNS or p.get("action", "ANONYMIZE") not in ACTIONS:
            raise ValueError(f"pii: [{{type: {'|'.join(PII_PATTERNS)}, action: BLOCK|ANONYMIZE}}]")
    return {"name": str(body.get("name") or "local"), "blocked_words": [w.strip() for w in words],
            "regexes": [{"name": r.get("name") or "regex", "pattern": r["pattern"], "action": r.get("action", "BLOCK")}
                        for r in regexes],
            "pii": [{"type": p["type"], "action": p.get("action", "ANONYMIZE")} for p in pii],
            "blocked_input_messaging": str(body.get("blocked_input_messaging") or "Sorry, I can't answer that."),
            "blocked_outputs_messaging": str(body.get("blocked_outputs_messaging") or "Sorry, I can't answer that.")}


def apply(guardrail: dict, source: str, texts: list[str]) -> dict:
    """ApplyGuardrail's answer for `texts` (the text blocks, in order)."""
    blocked = masked = False
    words, pii_found, regex_found = [], [], []
    out_texts = []
    for text in texts:
        for word in guardrail["blocked_words"]:
            if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE):
                words.append({"match": word, "action": "BLOCKED", "detected": True})
                blocked = True

        def rewrite(text: str, pattern: str, label: str, action: str, found: list, entry: dict) -> str:
            nonlocal blocked, masked
            for m in re.finditer(pattern, text):
                found.append({**entry, "match": m.group(0), "action": ACTIONS[action], "detected": True})
            if not re.search(pattern, text):
                return text
            if action == "BLOCK":
                blocked = True
                return text
            masked = True
            return re.sub(pattern, "{" + label + "}", text)

        for p in guardrail["pii"]:
            text = rewrite(text, PII_PATTERNS[p["type"]], p["type"], p["action"], pii_found, {"type": p["type"]})
        for r in guardrail["regexes"]:
            text = rewrite(text, r["pattern"], r["name"], r["action"], regex_found,
                           {"name": r["name"], "regex": r["pattern"]})
        out_texts.append(text)
    units = _units(texts)
    assessment: dict = {}
    if guardrail["blocked_words"]:
        assessment["wordPolicy"] = {"customWords": words, "managedWordLists": []}
    if guardrail["pii"] or guardrail["regexes"]:
        assessment["sensitiveInformationPolicy"] = {"piiEntities": pii_found, "regexes": regex_found}
    usage = {"topicPolicyUnits": 0, "contentPolicyUnits": 0,
             "wordPolicyUnits": units if guardrail["blocked_words"] else 0,
             "sensitiveInformationPolicyUnits": units if guardrail["pii"] else 0,
             "sensitiveInformationPolicyFreeUnits": units if guardrail["regexes"] else 0,
             "contextualGroundingPolicyUnits": 0}
    chars = sum(len(t) for t in texts)
    assessment["invocationMetrics"] = {"guardrailProcessingLatency": 1, "usage": usage,
                                       "guardrailCoverage": {"textCharacters": {"guarded": chars, "total": chars}}}
    intervened = blocked or masked
    if blocked:
        message = guardrail["blocked_input_messaging" if source == "INPUT" else "blocked_outputs_messaging"]
        outputs = [{"text": message}]
    else:
        outputs = [{"text": t} for t in out_texts] if masked else []
    return {"usage": usage, "action": "GUARDRAIL_INTERVENED" if intervened else "NONE",
            "actionReason": ("Guardrail blocked." if blocked else "Guardrail masked.") if intervened else
            "No action.", "outputs": outputs, "assessments": [assessment],
            "guardrailCoverage": {"textCharacters": {"guarded": chars, "total": chars}}}


def create_blueprint(state) -> Blueprint:
    """Register before the Mantle endpoint's bearer-token gate: ApplyGuardrail is SigV4-signed."""
    bp = Blueprint("bedrock_guardrails", __name__)
    guardrails: dict[str, dict] = {}
    state.guardrail_calls = []                 # [{id, version, source, texts}]: what rft-hub sent

    @bp.before_app_request
    def guardrail_first():
        if not request.path.startswith("/guardrail/"):
            return None
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("AWS4-HMAC-SHA256 ") or "/bedrock/aws4_request" not in auth:
            return bedrock_native.aws_error(403, "AccessDeniedException", "Missing or invalid SigV4 signature "
                                                                           "(signing name 'bedrock').")
        # The path as decoded: an ARN's '/' (sent as %2F) is back in it, so the label is matched greedily.
        route = re.fullmatch(r"/guardrail/(.*)/version/([^/]*)/apply", request.path)
        if request.method != "POST" or route is None:
            return bedrock_native.aws_error(404, "UnknownOperationException", "Unknown operation.")
        try:
            p = bedrock_native.request_params("bedrock-runtime", "ApplyGuardrail",
                                              {"guardrailIdentifier": route.group(1), "guardrailVersion": route.group(2)})
        except bedrock_native.AwsError as err:
            return bedrock_native.aws_error(err.status, err.code, err.message)
        # botocore's patterns are searched, not anchored (an empty alternative matches anything); held
        # here as the whole value, which is at least as strict as AWS.
        ident, version = unquote(p["guardrailIdentifier"]), p["guardrailVersion"]
        if not re.fullmatch(IDENTIFIER, ident) or not re.fullmatch(VERSION, version):
            return bedrock_native.aws_error(400, "ValidationException", "1 validation error detected: the guardrail "
                                            "identifier or version does not satisfy its pattern.")
        ident = ident.rsplit("/", 1)[-1]
        with state.lock:
            found = guardrails.get(ident)
            if found is None or (version != "DRAFT" and int(version) > found["version"]):
                return bedrock_native.aws_error(404, "ResourceNotFoundException",
                                                 f"The guardrail {p['guardrailIdentifier']} (version {version}) "
                                                 "was not found.")
            texts = [block["text"]["text"] for block in p["content"] if "text" in block]
            state.guardrail_calls.append({"id": ident, "version": version, "source": p["source"], "texts": texts})
        return jsonify(apply(found, p["source"], texts))

    @bp.post("/_local/guardrails")
    def create():
        try:
            definition = _check_definition(request.get_json(silent=True))
        except (ValueError, re.error) as exc:
            return jsonify({"error": str(exc)}), 400
        ident = secrets.token_hex(6)
        arn = f"arn:aws:bedrock:{state.region}:{state.account}:guardrail/{ident}"
        with state.lock:
            guardrails[ident] = {**definition, "version": 1, "arn": arn}
        return jsonify({"guardrailId": ident, "guardrailArn": arn, "version": "1"}), 201

    @bp.get("/_local/guardrails")
    def inspect():
        with state.lock:
            return jsonify({"guardrails": guardrails, "calls": state.guardrail_calls[-200:]})

    return bp
