"""ApplyGuardrail's price (inference/guardrails.cost_micro): exact, rounded up, never free by accident."""
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from chalicelib.inference import guardrails

COUNTERS = st.sampled_from(list(guardrails.PRICE_PER_1000_UNITS) + ["newPolicyUnits", "automatedReasoningPolicies"])


def test_known_prices():
    assert guardrails.cost_micro({"contentPolicyUnits": 1000}) == 150_000          # $0.15 per 1,000 units
    assert guardrails.cost_micro({"sensitiveInformationPolicyUnits": 1}) == 100      # $0.0001
    assert guardrails.cost_micro({"wordPolicyUnits": 10 ** 6, "sensitiveInformationPolicyFreeUnits": 5}) == 0
    assert guardrails.cost_micro({"topicPolicyUnits": 1, "contentPolicyUnits": 1}) == 300
    assert guardrails.cost_micro({}) == guardrails.cost_micro(None) == 0


@given(st.dictionaries(COUNTERS, st.one_of(st.integers(min_value=-5, max_value=10 ** 9), st.booleans(), st.none(),
                                           st.floats(allow_nan=True), st.text(max_size=3))))
@settings(deadline=None)    # no timed assertion: a loaded machine is not a failure
def test_any_usage_is_an_exact_integer_never_negative(usage):
    cost = guardrails.cost_micro(usage)
    assert isinstance(cost, int) and cost >= 0
    usd = sum(Decimal(v) * guardrails.PRICE_PER_1000_UNITS.get(k, guardrails.UNKNOWN_PRICE) / 1000
              for k, v in usage.items() if type(v) is int and v > 0 and k not in guardrails.NOT_UNITS)
    assert cost - 1 < usd * 1_000_000 <= cost                                       # rounded up, to the micro-dollar
    if usage.get("newPolicyUnits") is not None and type(usage["newPolicyUnits"]) is int and usage["newPolicyUnits"] > 0:
        assert cost > 0                                                              # an unknown policy is charged
