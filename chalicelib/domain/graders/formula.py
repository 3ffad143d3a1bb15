"""`calculate_output` formulas for multi graders, evaluated safely (simpleeval, never eval)."""
from __future__ import annotations

import ast
import math
from typing import Callable

from simpleeval import SimpleEval

FUNCTIONS = {"min": min, "max": max, "abs": abs, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
             "sqrt": math.sqrt, "log": math.log, "round": round}


class FormulaError(ValueError):
    pass


def compile_formula(formula: str, names: set[str]) -> Callable[[dict], float]:
    if not formula.strip() or len(formula) > 1000:
        raise FormulaError("must be a non-empty expression of at most 1000 characters")
    try:
        tree = ast.parse(formula, mode="eval")
    except SyntaxError as exc:
        raise FormulaError(f"not a valid expression ({exc.msg})") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in names and node.id not in FUNCTIONS:
            raise FormulaError(f"unknown name '{node.id}'; use the sub-grader names {sorted(names)}")
        if isinstance(node, (ast.Attribute, ast.Subscript, ast.Lambda, ast.comprehension)):
            raise FormulaError("only arithmetic, comparisons and min/max/abs/floor/ceil/exp/sqrt/log/round")
    parsed = SimpleEval(functions=FUNCTIONS).parse(formula)

    def evaluate(values: dict) -> float:
        # A fresh evaluator per call: graders are shared across threads.
        result = SimpleEval(names=values, functions=FUNCTIONS).eval(formula, previously_parsed=parsed)
        if isinstance(result, bool):
            result = float(result)
        if not isinstance(result, (int, float)) or not math.isfinite(result):
            raise FormulaError(f"the formula gave {result!r}, not a finite number")
        return float(result)
    return evaluate
