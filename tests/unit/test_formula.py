"""multi graders' `calculate_output` formulas (pure): bounded evaluation, refused at validate time."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chalicelib.domain.graders.formula import MAX_CHARS, FormulaError, compile_formula

NAMES = {"exact", "fuzzy", "judge"}
VALUES = {"exact": 1.0, "fuzzy": 0.5, "judge": 0.25}


def refused(formula: str) -> str:
    with pytest.raises(FormulaError) as err:
        compile_formula(formula, NAMES)
    return str(err.value)


def test_normal_formulas_keep_python_semantics_up_to_the_documented_limits():
    env = {"min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
           "sqrt": math.sqrt, "log": math.log, "round": round}
    for formula in ["0.7 * exact + 0.3 * fuzzy", "max(exact, fuzzy) / 2", "(exact + fuzzy + judge) / 3",
                    "exact ** 2 * fuzzy ** 0.5", "min(1, exact * 2)", "exact if fuzzy > 0.4 else 0",
                    "round(fuzzy / 3, 2)", "floor(judge * 10) / 10", "ceil(fuzzy)", "sqrt(judge)",
                    "log(1 + exact)", "log(8, 2)", "exp(-fuzzy)", "abs(judge - fuzzy)", "exact % 0.3",
                    "fuzzy // 0.2", "-exact + +fuzzy", "not exact", "exact and fuzzy or judge",
                    "2 ** -1 * exact", "True + exact", "0 < judge <= fuzzy < exact", "exact != fuzzy",
                    "10 ** 12 * judge", "exact ** fuzzy", "round(exact)", "2 ** 10 / 1024"]:
        expected = float(eval(formula, {"__builtins__": {}}, {**env, **VALUES}))   # trusted literals
        assert compile_formula(formula, NAMES)(VALUES) == expected, formula
    # the limits start exactly where docs/grading.md says
    assert compile_formula("exact ** 100 + 2 ** 100 + 10 ** 12", NAMES)(VALUES) == 1.0 + 2 ** 100 + 10 ** 12
    assert compile_formula("round(fuzzy, 100) + round(fuzzy, -100)", NAMES)(VALUES) == 0.5
    assert compile_formula("-" * 39 + "exact", NAMES)(VALUES) == -1.0                             # 40 levels
    for formula in ["exact ** 101", "10 ** 12 + 1000000000001", "-" * 40 + "exact",
                    "max(" + ",".join(["1"] * 200) + ")", "1" + " " * MAX_CHARS]:
        refused(formula)
    with pytest.raises(FormulaError):
        compile_formula("round(fuzzy, 101 * exact)", NAMES)(VALUES)


def test_huge_powers_are_refused_before_they_run():
    assert "exponent 4000000" in refused("4000000**4000000")        # ~35 s of CPU before the fix
    assert "exponent 387420489" in refused("9**9**9**9")
    assert "±100" in refused("exact ** 101") and "±100" in refused("exact ** -(50 * 3)")
    assert "±100" in refused("2 ** 1000")
    refused("(2 ** 100) ** 11")                                      # > 1,024 bits
    refused("(10 ** 12) ** 100")


def test_literals_size_and_shape_are_bounded():
    assert "too large" in refused("10000000000000 * exact")
    assert "too large" in refused("1e400 * exact")
    assert f"at most {MAX_CHARS} characters" in refused("exact + " * 200 + "1")
    assert "too complex" in refused("max(" + ",".join(["1"] * 250) + ")")   # short and shallow, too many nodes
    assert "nests too deeply" in refused("-" * 60 + "exact")
    assert "nests too deeply" in refused("(" * 45 + "exact" + " + 1)" * 45)
    for formula in ["'a' * 10", "exact.real", "[exact][0]", "exact in (1, 2)", "exact << 3", "exact | 1",
                    "(x := 1)", "min(*[exact])", "round(exact, ndigits=2)", "lambda: 1", "f'{exact}'", "None",
                    "exact(1)", "open('x')", "\x00", "exact;1", ""]:
        refused(formula)


def test_constant_parts_that_cannot_run_are_refused():
    assert "ZeroDivisionError" in refused("exact + 1 / 0")
    refused("exp(1000) * exact")
    refused("sqrt(-1) + exact")
    refused("(-8) ** 0.5 + exact")           # complex
    assert "OverflowError" in refused("((2 ** 100) ** 10 * 2 ** 23 - 1) * 2 + 1 + exact")   # 1,024 bits: no float

def test_runtime_failures_are_formula_errors_and_fast():
    cases = {"exact / (fuzzy - 0.5)": "ZeroDivisionError", "exp(exact * 1000)": "OverflowError",
             "sqrt(fuzzy - 1)": "ValueError", "(fuzzy - 1) ** 0.5": "complex", "exact ** (judge * 1000)": "±100",
             "round(exact, -(judge * 0 + 10 ** 7))": "round", "log(fuzzy - 0.5)": "ValueError",
             "exact * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * "
             "1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12 * 1e12": "finite"}
    for formula, text in cases.items():
        evaluate = compile_formula(formula, NAMES)
        with pytest.raises(FormulaError) as err:     # refused by the operand bounds, before any work
            evaluate(VALUES)
        assert text in str(err.value), (formula, str(err.value))


# ---- any formula from the grammar: evaluates or is refused, quickly -------------------------------

numbers = st.one_of(st.integers(-10 ** 13, 10 ** 13).map(str), st.integers(0, 12).map(str),
                    st.floats(allow_nan=False, allow_infinity=False).map(repr), st.sampled_from(["True", "False"]))
leaves = st.one_of(numbers, st.sampled_from(sorted(NAMES)))


def _compound(children):
    binop = st.tuples(children, st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "<", "<=", "==", "!=", ">",
                                                 "and", "or"]), children).map(lambda t: f"({t[0]} {t[1]} {t[2]})")
    unary = st.tuples(st.sampled_from(["-", "+", "not "]), children).map(lambda t: f"({t[0]}{t[1]})")
    ifexp = st.tuples(children, children, children).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})")
    call = st.tuples(st.sampled_from(["min", "max", "abs", "floor", "ceil", "exp", "sqrt", "log", "round"]),
                     st.lists(children, min_size=1, max_size=3)).map(lambda t: f"{t[0]}({', '.join(t[1])})")
    return st.one_of(binop, unary, ifexp, call)


formulas = st.recursive(leaves, _compound, max_leaves=12)
rewards = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@settings(max_examples=400, deadline=None)
@given(formulas, st.fixed_dictionaries({name: rewards for name in sorted(NAMES)}))
def test_any_formula_evaluates_or_is_refused_never_hangs(formula, values):
    try:
        evaluate = compile_formula(formula, NAMES)
    except FormulaError:
        evaluate = None
    if evaluate is not None:
        for sample in (values, {name: 0.0 for name in NAMES}, {name: 1.0 for name in NAMES}):
            try:
                result = evaluate(sample)
            except FormulaError:
                continue
            assert isinstance(result, float) and math.isfinite(result), (formula, sample, result)
