"""`calculate_output` formulas for multi graders: checked once, then evaluated safely and quickly.

Evaluation uses simpleeval (never `eval`) with rft-hub's own operator table, so that every
accepted formula evaluates in well under a millisecond per sample, whatever its sub-rewards:

- at validate time: at most MAX_CHARS characters, MAX_NODES expression nodes nested at most
  MAX_DEPTH deep; only numbers (|literal| <= MAX_LITERAL), the sub-grader names, arithmetic
  (+ - * / // % **), comparisons, and/or/not, `x if c else y` and the FUNCTIONS; every part that
  does not depend on a sub-grader is computed once (so `4000000**4000000` or `9**9**9**9` is refused
  here, not at run time), and a constant exponent must satisfy |e| <= MAX_EXPONENT;
- at run time: `**` refuses |exponent| > MAX_EXPONENT and an integer result over MAX_INT_BITS
  bits before computing it; every arithmetic result must be a finite real number whose integer
  part fits MAX_INT_BITS bits; `round`'s digits are bounded too. Any failure raises FormulaError
  (the sample scores 0 with `formula_parse_error`), never anything else.

Pure: no I/O.
"""
from __future__ import annotations

import ast
import math
import operator as op
from collections.abc import Callable
from typing import Any

MAX_CHARS = 1000
MAX_NODES = 200          # expression nodes (names, numbers, operations, calls)
MAX_DEPTH = 40           # nesting of expression nodes; keeps the evaluator's recursion shallow
MAX_LITERAL = 10 ** 12   # largest absolute value of a number written in a formula
MAX_EXPONENT = 100       # largest absolute exponent of `**`
MAX_INT_BITS = 1024      # larger integers could not become a finite float reward anyway
MAX_ROUND_DIGITS = 100   # round(x, n): |n| at most this

_NUMBER = (int, float)
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_UNARYOPS = (ast.USub, ast.UAdd, ast.Not)
_CMPOPS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_ALLOWED = "only numbers, the sub-grader names, + - * / // % **, comparisons, and/or/not, " \
           "`x if c else y` and min/max/abs/floor/ceil/exp/sqrt/log/round"


class FormulaError(ValueError):
    pass


def _value(x: Any) -> Any:
    """Every intermediate result: a finite real number of bounded size (bools pass as they are)."""
    if isinstance(x, bool):
        return x
    if isinstance(x, int):
        if x.bit_length() > MAX_INT_BITS:
            raise FormulaError(f"an intermediate value exceeds {MAX_INT_BITS} bits")
        return x
    if isinstance(x, float):
        if not math.isfinite(x):
            raise FormulaError(f"an intermediate value is {x!r}, not a finite number")
        return x
    raise FormulaError(f"an intermediate value is {type(x).__name__}, not a real number")


def _checked(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def apply(a, b):
        return _value(fn(a, b))
    return apply


def _power(base, exponent):
    if not isinstance(base, _NUMBER) or not isinstance(exponent, _NUMBER):
        raise FormulaError("'**' needs numbers")
    if abs(exponent) > MAX_EXPONENT:
        raise FormulaError(f"exponent {exponent!r} is outside ±{MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 \
            and base.bit_length() * exponent > 2 * MAX_INT_BITS:
        # then the result has more than MAX_INT_BITS bits (at least (bits-1)*exponent + 1): refused
        # before computing it; below this bound it is cheap to compute and _value decides exactly
        raise FormulaError(f"{base} ** {exponent} exceeds {MAX_INT_BITS} bits")
    try:
        result = base ** exponent
    except OverflowError:
        raise FormulaError(f"{base!r} ** {exponent!r} overflows") from None
    return _value(result)


OPERATORS = {
    ast.Add: _checked(op.add), ast.Sub: _checked(op.sub), ast.Mult: _checked(op.mul),
    ast.Div: _checked(op.truediv), ast.FloorDiv: _checked(op.floordiv), ast.Mod: _checked(op.mod),
    ast.Pow: _power,
    ast.USub: op.neg, ast.UAdd: op.pos, ast.Not: op.not_,
    ast.Eq: op.eq, ast.NotEq: op.ne, ast.Lt: op.lt, ast.LtE: op.le, ast.Gt: op.gt, ast.GtE: op.ge,
}


def _round(x, ndigits=None):
    if ndigits is not None and (not isinstance(ndigits, int) or abs(ndigits) > MAX_ROUND_DIGITS):
        raise FormulaError(f"round's digits must be an integer within ±{MAX_ROUND_DIGITS}")
    return round(x) if ndigits is None else round(x, ndigits)


def _numeric(fn: Callable) -> Callable:
    def call(*args):
        if not all(isinstance(a, _NUMBER) for a in args):
            raise FormulaError(f"{fn.__name__}() takes numbers")
        return _value(fn(*args))
    call.__name__ = fn.__name__
    return call


FUNCTIONS = {name: _numeric(fn) for name, fn in {
    "min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
    "sqrt": math.sqrt, "log": math.log, "round": _round}.items()}


def _evaluate(node: ast.expr, values: dict) -> float:
    try:
        # A fresh evaluator per call: graders are shared across threads.
        from simpleeval import SimpleEval  # imported where formulas run, not at every cold start

        result = SimpleEval(operators=OPERATORS, functions=FUNCTIONS, names=values).eval("", previously_parsed=node)
        return float(_value(result))   # float() of a 1,024-bit integer can overflow
    except FormulaError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. 1/0, sqrt(-1), log(0): a formula error, never a crash
        raise FormulaError(f"{type(exc).__name__}: {exc}"[:200]) from None


def _check_shape(tree: ast.Expression, names: set[str]) -> None:
    nodes, stack = 0, [(tree.body, 1)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise FormulaError(f"is too complex: at most {MAX_NODES} numbers, names and operations")
        if depth > MAX_DEPTH:
            raise FormulaError(f"nests too deeply: at most {MAX_DEPTH} levels")
        if isinstance(node, ast.Constant):
            value = node.value
            if not isinstance(value, _NUMBER):   # True/False are numbers too
                raise FormulaError(f"{value!r} is not allowed; {_ALLOWED}")
            if not abs(value) <= MAX_LITERAL:
                raise FormulaError(f"the number {ast.unparse(node)[:40]} is too large "
                                   f"(numbers are at most {MAX_LITERAL:,} in absolute value)")
            continue
        if isinstance(node, ast.Name):
            if node.id not in names:
                raise FormulaError(f"unknown name '{node.id}'; use the sub-grader names {sorted(names)}")
            continue
        if isinstance(node, ast.BinOp) and isinstance(node.op, _BINOPS):
            children = [node.left, node.right]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, _UNARYOPS):
            children = [node.operand]
        elif isinstance(node, ast.BoolOp):
            children = list(node.values)
        elif isinstance(node, ast.Compare) and all(isinstance(o, _CMPOPS) for o in node.ops):
            children = [node.left, *node.comparators]
        elif isinstance(node, ast.IfExp):
            children = [node.test, node.body, node.orelse]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            if node.func.id not in FUNCTIONS:
                raise FormulaError(f"unknown function '{node.func.id}'; {_ALLOWED}")
            if any(isinstance(a, ast.Starred) for a in node.args):
                raise FormulaError(f"*arguments are not allowed; {_ALLOWED}")
            children = list(node.args)
        else:
            raise FormulaError(_ALLOWED)
        stack.extend((child, depth + 1) for child in children)


def _uses_names(node: ast.expr) -> bool:
    """Whether the value of `node` depends on a sub-grader (a name other than a called function)."""
    called = {id(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}
    return any(isinstance(n, ast.Name) and id(n) not in called for n in ast.walk(node))


def _check_constants(node: ast.expr) -> Any:
    """Computes each part of the formula that does not depend on a sub-grader (refusing what fails),
    and checks constant exponents. Returns the node's value if it is constant, else None."""
    if not _uses_names(node):
        try:
            return _evaluate(node, {})
        except FormulaError as exc:
            raise FormulaError(f"'{ast.unparse(node)[:60]}' cannot be evaluated: {exc}") from None
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.expr) and not (isinstance(node, ast.Call) and child is node.func):
            value = _check_constants(child)
            if value is not None and isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) \
                    and child is node.right and abs(value) > MAX_EXPONENT:
                raise FormulaError(f"exponent {ast.unparse(child)[:60]} is outside ±{MAX_EXPONENT}")
    return None


def compile_formula(formula: str, names: set[str]) -> Callable[[dict], float]:
    """Checks a formula over the sub-grader `names`; returns `evaluate(values) -> float`, which raises
    only FormulaError. Raises FormulaError (a message for the user) if the formula is refused."""
    if not isinstance(formula, str) or not formula.strip() or len(formula) > MAX_CHARS:
        raise FormulaError(f"must be a non-empty expression of at most {MAX_CHARS} characters")
    try:
        tree = ast.parse(formula.strip(), mode="eval")
    except SyntaxError as exc:
        raise FormulaError(f"not a valid expression ({exc.msg})") from None
    except (ValueError, RecursionError, MemoryError):   # e.g. a NUL character; absurd nesting
        raise FormulaError("not a valid expression") from None
    _check_shape(tree, names)
    _check_constants(tree.body)
    body = tree.body

    def evaluate(values: dict) -> float:
        return _evaluate(body, values)
    return evaluate
