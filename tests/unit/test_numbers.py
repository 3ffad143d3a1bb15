"""The strict parser (chalicelib/domain/numbers.py) and the parsers that route through it, under
property-based inputs: Unicode digits, lone surrogates, 38+ digit and 401-digit numbers, 1e400.
Pure and fast: no stack is started (no `stack` fixture)."""
from __future__ import annotations

import json
import math
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chalicelib.domain import budget, numbers, pricing
from chalicelib.domain.datasets import parse_json
from chalicelib.domain.evals import EvalRuleError, check_criteria, check_sampling
from chalicelib.domain.graders import templates
from chalicelib.domain.jobs import check_hyperparameters
from chalicelib.errors import InvalidRequest

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Digits of other scripts that str.isdigit() (or int()) accept: superscripts, Arabic-Indic, fullwidth.
UNICODE_DIGITS = "²³¹٣٤۵५০੬௭౮൯๙០᠑０９𝟘"
odd_text = st.text(alphabet=st.sampled_from(list(string.digits + UNICODE_DIGITS + "-+._ e\ud800\udfff")),
                   max_size=60)
huge_ints = st.one_of(st.integers(min_value=10 ** 38, max_value=10 ** 45),
                      st.integers(min_value=10 ** 400, max_value=10 ** 401),
                      st.integers(min_value=-(10 ** 401), max_value=-(10 ** 38)))
odd_numbers = st.one_of(huge_ints, st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                        st.integers(min_value=-(10 ** 6), max_value=10 ** 6), st.just(5e-324), odd_text)


@FAST
@given(odd_text)
def test_ascii_int_accepts_exactly_ascii_digits(text):
    got = numbers.ascii_int(text)
    is_ascii_number = 0 < len(text) <= numbers.MAX_ID_DIGITS and all(c in "0123456789" for c in text)
    assert (got is not None) == is_ascii_number
    if got is not None:
        assert got == int(text)


@pytest.mark.parametrize("text", ["²", "٣", "1²", "１", " 1", "1_0", "+1", "-1", "", "1" * 10])
def test_ascii_int_refuses_what_int_or_isdigit_would_take(text):
    assert numbers.ascii_int(text) is None


@FAST
@given(odd_numbers, st.booleans())
def test_check_never_raises_anything_but_number_error(value, integer):
    try:
        got = numbers.check(value, integer=integer, lo=-5, hi=10 ** 6)
    except numbers.NumberError:
        return
    assert not isinstance(got, bool) and isinstance(got, (int, float))
    assert math.isfinite(float(got)) and -5 <= got <= 10 ** 6
    assert not integer or isinstance(got, int)


@FAST
@given(huge_ints)
def test_huge_ints_are_refused_not_overflow(value):
    with pytest.raises(numbers.NumberError):
        numbers.check(value)
    assert numbers.to_float(value) is None


@FAST
@given(st.text(alphabet=st.sampled_from(list("0123456789.-") + ["\ud800", "²"]), max_size=90))
def test_dynamo_number_text_is_at_most_38_significant_digits(text):
    if numbers.dynamo_number_text(text):
        body = text.lstrip("-")
        assert len(body.replace(".", "").strip("0")) <= 38 and all(c in "0123456789." for c in body)


def test_dynamo_number_text_refuses_76_digits():
    assert numbers.dynamo_number_text("1" * 38 + "." + "0" * 5)
    assert numbers.dynamo_number_text("0.000" + "1" * 30)
    assert not numbers.dynamo_number_text("1" * 38 + "." + "1" * 38)
    assert not numbers.dynamo_number_text("1" * 20 + "." + "1" * 19)


def test_utf8_len_of_lone_surrogates_is_none():
    assert numbers.utf8_len("\ud800") is None
    assert numbers.utf8_len("é") == 2


@pytest.mark.parametrize("text", ["1e400", "-1e400", "[1, 1e999]", '{"range": [0, 1e400]}'])
def test_parse_json_refuses_floats_that_overflow(text):
    with pytest.raises(ValueError):
        parse_json(text)


@FAST
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_parse_json_keeps_every_finite_float(value):
    assert parse_json(json.dumps(value)) == value


@FAST
@given(st.dictionaries(st.sampled_from(sorted(numbers.REQUEST_LIMITS) + ["logit_bias", "other"]),
                       st.one_of(odd_numbers, st.none(), st.dictionaries(st.just("1"), odd_numbers, max_size=1)),
                       max_size=4))
def test_request_numbers_within_limits_or_named(body):
    bad = numbers.request_problem(body)
    if bad is None:
        for name, (integer, lo, hi) in numbers.REQUEST_LIMITS.items():
            value = body.get(name)
            if value is not None:
                assert isinstance(value, int if integer else (int, float)) and lo <= value <= hi
    else:
        assert bad[0].split(".")[0] in body


@pytest.mark.parametrize("body,field", [
    ({"max_tokens": 12345678901234567890123456789012345678901}, "max_tokens"),
    ({"max_completion_tokens": 1_000_001}, "max_completion_tokens"),
    ({"max_output_tokens": 10 ** 400}, "max_output_tokens"),
    ({"n": 129}, "n"), ({"n": 128, "max_tokens": 1_000_000}, "n"),
    ({"top_logprobs": 21}, "top_logprobs"), ({"seed": 2 ** 63}, "seed"),
    ({"temperature": 10 ** 400}, "temperature"), ({"logit_bias": {"5": 101}}, "logit_bias.5"),
])
def test_request_problem_names_the_field(body, field):
    assert numbers.request_problem(body)[0] == field


def test_worst_case_of_the_largest_allowed_request_is_storable():
    # The priciest output an admin can set (MAX_PRICE_PER_1M USD per 1M tokens = that many micro-dollars
    # per token) times the most output a request may ask for, plus a 1 MB prompt: far under 38 digits.
    price = pricing.Price("m", pricing.Decimal(budget.MAX_PRICE_PER_1M), pricing.Decimal(budget.MAX_PRICE_PER_1M),
                          pricing.Decimal(budget.MAX_PRICE_PER_1M), "test", "2026-12", False)
    worst = budget.worst_case_micro(price, 1_000_000, numbers.MAX_OUTPUT_TOKENS, 16)
    assert len(str(worst)) <= numbers.DYNAMO_DIGITS


@FAST
@given(st.integers(min_value=-(10 ** 60), max_value=10 ** 60))
def test_usd_is_exact_for_any_size(micro):
    text = pricing.usd(micro)
    whole, frac = text.lstrip("-").split(".")
    assert len(frac) == 6 and (int(whole) * 10 ** 6 + int(frac)) * (-1 if text.startswith("-") else 1) == micro


@FAST
@given(st.one_of(odd_text, st.text(max_size=45), odd_numbers))
def test_to_micro_is_a_value_error_or_exact(value):
    try:
        micro = budget.to_micro(value)
    except ValueError:
        return
    assert isinstance(micro, int) and 0 <= micro < 10 ** 38


@pytest.mark.parametrize("field", ["²", "٣", "１", "\ud800", "9" * 40])
def test_template_item_reference_with_unicode_digits_is_invalid_variable(field):
    with pytest.raises(templates.InvalidVariable):
        templates.walk({"messages": [{"role": "user", "content": "x"}]}, ("messages", field), "item.messages")


@FAST
@given(odd_numbers)
def test_eval_thresholds_and_ranges_are_400s(value):
    try:
        check_criteria([{"type": "string_check", "name": "s", "input": "{{sample.output_text}}",
                         "reference": "x", "operation": "eq", "pass_threshold": value}])
        check_criteria([{"type": "score_model", "name": "j", "model": "m", "range": [0, value],
                         "input": [{"role": "user", "content": "{{sample.output_text}}"}]}])
        check_sampling({"temperature": value, "seed": value})
    except (EvalRuleError, InvalidRequest):
        pass


@FAST
@given(st.sampled_from(["n_epochs", "batch_size", "learning_rate_multiplier"]), odd_numbers)
def test_job_hyperparameters_are_400s(name, value):
    try:
        check_hyperparameters({name: value})
    except InvalidRequest:
        pass


# ---- URL prefixes (Slack webhooks, response_url) and key-like ids in messages --------------------

PREFIXES = ["https://hooks.slack.com/", "http://127.0.0.1:"]
hosts = st.sampled_from(["hooks.slack.com", "127.0.0.1", "evil.example.com", "hooks.slack.com.evil.example.com",
                         "127.0.0.1.nip.io"])


@FAST
@given(st.sampled_from(["http", "https", "HTTPS"]), st.one_of(st.none(), hosts), hosts,
       st.one_of(st.none(), st.integers(0, 70000), st.just("")), st.text(max_size=20))
def test_url_prefixes_are_compared_parsed(scheme, userinfo_host, host, port, path):
    from chalicelib.domain import urls

    netloc = (f"{userinfo_host}:1@" if userinfo_host else "") + host + ("" if port is None else f":{port}")
    url = f"{scheme}://{netloc}/{path}"
    if urls.allowed(url, PREFIXES):
        assert "@" not in netloc and "\\" not in url and url.isascii()
        assert host == "hooks.slack.com" and scheme.lower() == "https" and port in (None, 443) \
            or host == "127.0.0.1" and scheme == "http" and port not in ("",)


@pytest.mark.parametrize("url", ["http://127.0.0.1:1@evil.example.com/", "https://hooks.slack.com@evil/",
                                 "https://hooks.slack.com:444/services", "http://127.0.0.1:9\\@evil/"])
def test_the_attacks_url_shapes_are_refused(url):
    from chalicelib.domain import urls

    assert not urls.allowed(url, PREFIXES)


def test_error_messages_never_repeat_a_key():
    from chalicelib.errors import NotFound

    key = "rfth_0123456789abcdef_" + "A" * 43
    for text in (f"No eval with id '{key}'.", f"The model 'sk-{'x' * 40}' does not exist",
                 "No such file: 'bedrock-api-key-YmVkcm9jay5hbWF6b25hd3MuY29t'."):
        message = NotFound(text).body()["error"]["message"]
        assert "{redacted}" in message and key not in message and "sk-x" not in message
    assert NotFound("No eval with id 'eval_123'.").message == "No eval with id 'eval_123'."


def test_the_data_plane_takes_adapter_headers_only_from_the_adapter(monkeypatch):
    from chalicelib.dataplane.app import _adapter_headers

    forged = [("x-amzn-request-context", '{"requestId":"beef"}')]
    monkeypatch.delenv("AWS_LWA_INVOKE_MODE", raising=False)
    assert _adapter_headers(forged, None) == {}                                     # not behind LWA
    assert _adapter_headers(forged, "secret") == {}                                 # no local token
    assert _adapter_headers(forged + [("x-rft-adapter-token", "other")], "secret") == {}
    assert _adapter_headers(forged + [("X-RFT-Adapter-Token", "secret")], "secret") == dict(forged)
    monkeypatch.setenv("AWS_LWA_INVOKE_MODE", "response_stream")
    assert _adapter_headers(forged, None) == dict(forged)                           # LWA overwrote any copy
    assert _adapter_headers(forged + [("x-amzn-request-context", "{}")], None) == {}   # LWA appended: neither
