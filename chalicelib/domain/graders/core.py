"""Declarative graders in OpenAI's format, checked once and compiled, then run per sample. Pure:
the LLM judge and team Lambdas are passed in as callables (`Deps`).

Types: string_check, text_similarity, score_model, multi, lambda. `python` is refused
(arbitrary code); `label_model` and the `cosine` metric are not offered.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chalicelib.domain import numbers
from chalicelib.domain.graders import similarity
from chalicelib.domain.graders.contract import check_response, request_rows, size_batches
from chalicelib.domain.graders.formula import FormulaError, compile_formula
from chalicelib.domain.graders.templates import InvalidVariable, TemplateError, compile_template, make_sample

# Bedrock's LambdaGraderConfig.lambdaArn pattern (botocore), ASCII digits only, used with fullmatch (`$`
# would let a trailing newline through). Who may use which function: grading/lambda_graders.py.
LAMBDA_ARN = re.compile(
    r"arn:(aws[a-zA-Z-]*)?:lambda:[a-z]{2}(-gov)?-[a-z]+-[0-9]:[0-9]{12}:function:[a-zA-Z0-9-_\.]+"
    r"(:(\$LATEST|[a-zA-Z0-9-_]+))?")
ERROR_KINDS = ("formula_parse_error", "invalid_variable_error", "model_grader_parse_error",
               "model_grader_refusal_error", "model_grader_server_error", "other_error",
               "python_grader_runtime_error", "python_grader_server_error", "sample_parse_error",
               "truncated_observation_error", "unresponsive_reward_error",
               # rft-hub's own, for Lambda graders
               "lambda_error", "lambda_contract_error", "lambda_timeout")
MAX_DEPTH = 3
MAX_SPEC_BYTES = 64 * 1024   # a whole grader spec as compact JSON (UTF-8); checked before anything is stored


class GraderSpecError(ValueError):
    """A grader spec that cannot run; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


JUDGE_MAX_OUTPUT_TOKENS = 4096      # a judge's reply is a score; more output is only spend
JUDGE_DEFAULT_OUTPUT_TOKENS = 1024


class JudgeRefused(Exception):
    """A judge call that may not be made (the team's budget is spent): stops the grading instead
    of scoring the sample 0, so the caller can answer 429 or stop the training job."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


@dataclass
class Deps:
    """What graders need from outside: an LLM judge and a Lambda invoker (Bedrock's contract)."""
    judge: Callable[[str, list[dict], dict], tuple[str, int]] | None = None
    invoke_lambda: Callable[[str, list[dict]], Any] | None = None


@dataclass
class Result:
    reward: float
    name: str
    type: str
    errors: set = field(default_factory=set)
    details: str | None = None
    sub_rewards: dict = field(default_factory=dict)
    token_usage: int = 0
    model: str | None = None


def _need(spec: dict, key: str, kind: type, path: str):
    if key not in spec:
        raise GraderSpecError(f"'{path}.{key}' is required", f"{path}.{key}")
    value = spec[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise GraderSpecError(f"'{path}.{key}' must be a {kind.__name__ if isinstance(kind, type) else 'value'}",
                              f"{path}.{key}")
    return value


def _only(spec: dict, allowed: set, path: str) -> None:
    extra = sorted(set(spec) - allowed)
    if extra:
        raise GraderSpecError(f"unknown field '{path}.{extra[0]}'", f"{path}.{extra[0]}")


def _template(spec: dict, key: str, path: str):
    text = _need(spec, key, str, path)
    try:
        return compile_template(text)
    except TemplateError as exc:
        raise GraderSpecError(f"'{path}.{key}': {exc}", f"{path}.{key}") from None


class Grader:
    type = ""

    def __init__(self, spec: dict, path: str):
        self.spec = spec
        self.name = spec.get("name") or self.type
        if "name" in spec and not isinstance(spec["name"], str):
            raise GraderSpecError(f"'{path}.name' must be a string", f"{path}.name")

    def grade(self, sample: dict, item: dict, deps: Deps) -> Result:
        raise NotImplementedError


class StringCheck(Grader):
    type = "string_check"
    OPS = ("eq", "ne", "like", "ilike")

    def __init__(self, spec, path):
        super().__init__(spec, path)
        _only(spec, {"type", "name", "input", "reference", "operation"}, path)
        self.input = _template(spec, "input", path)
        self.reference = _template(spec, "reference", path)
        self.op = _need(spec, "operation", str, path)
        if self.op not in self.OPS:
            raise GraderSpecError(f"'{path}.operation' must be one of {', '.join(self.OPS)}", f"{path}.operation")

    def grade(self, sample, item, deps):
        a, b = self.input(item, sample), self.reference(item, sample)
        if self.op == "eq":
            ok = a == b
        elif self.op == "ne":
            ok = a != b
        elif self.op == "like":
            ok = b in a
        else:
            ok = b.lower() in a.lower()
        return Result(1.0 if ok else 0.0, self.name, self.type)


class TextSimilarity(Grader):
    type = "text_similarity"

    def __init__(self, spec, path):
        super().__init__(spec, path)
        _only(spec, {"type", "name", "input", "reference", "evaluation_metric", "pass_threshold"}, path)
        self.input = _template(spec, "input", path)
        self.reference = _template(spec, "reference", path)
        self.metric = _need(spec, "evaluation_metric", str, path)
        if self.metric == "cosine":
            raise GraderSpecError(f"'{path}.evaluation_metric': cosine needs an embedding model and is not "
                                  f"offered; use one of {', '.join(similarity.METRICS)}", f"{path}.evaluation_metric")
        if self.metric not in similarity.METRICS:
            raise GraderSpecError(f"'{path}.evaluation_metric' must be one of {', '.join(similarity.METRICS)}",
                                  f"{path}.evaluation_metric")

    def grade(self, sample, item, deps):
        return Result(similarity.score(self.metric, self.input(item, sample), self.reference(item, sample)),
                      self.name, self.type)


_NUMBER = re.compile(r"-?[0-9]{1,38}(?:\.[0-9]{1,38})?")     # ASCII digits (\d takes any script's)
_REFUSAL = re.compile(r"^\s*(i'?m sorry|i cannot|i can't|i am unable)", re.I)


def parse_score(text: str, lo: float, hi: float) -> float | None:
    """A judge's score from its reply: JSON {"score": x}, "Score: x", or the last number in range."""
    stripped = text.strip()
    try:
        data = json.loads(stripped)
        if isinstance(data, dict) and numbers.to_float(data.get("score")) is not None:
            return numbers.to_float(data["score"])
        if numbers.to_float(data) is not None:
            return numbers.to_float(data)
    except ValueError:
        pass
    labelled = re.search(r"score\W{0,3}(-?[0-9]{1,38}(?:\.[0-9]{1,38})?)", stripped, re.I)
    if labelled:
        return float(labelled.group(1))
    candidates = [float(n) for n in _NUMBER.findall(stripped) if lo <= float(n) <= hi]
    return candidates[-1] if candidates else None


class ScoreModel(Grader):
    type = "score_model"
    SAMPLING = {"temperature", "top_p", "seed", "max_completions_tokens", "max_completion_tokens",
                "reasoning_effort"}

    def __init__(self, spec, path):
        super().__init__(spec, path)
        _only(spec, {"type", "name", "model", "input", "range", "sampling_params", "pass_threshold"}, path)
        self.model = _need(spec, "model", str, path)
        messages = _need(spec, "input", list, path)
        if not messages:
            raise GraderSpecError(f"'{path}.input' must list at least one message", f"{path}.input")
        self.messages = []
        for i, msg in enumerate(messages):
            mpath = f"{path}.input[{i}]"
            if not isinstance(msg, dict):
                raise GraderSpecError(f"'{mpath}' must be an object", mpath)
            _only(msg, {"role", "content", "type"}, mpath)
            role = _need(msg, "role", str, mpath)
            if role not in ("system", "developer", "user", "assistant"):
                raise GraderSpecError(f"'{mpath}.role' must be system, developer, user or assistant", f"{mpath}.role")
            content = msg.get("content")
            if isinstance(content, dict) and content.get("type") in ("input_text", "output_text"):
                content = content.get("text")
            if not isinstance(content, str):
                raise GraderSpecError(f"'{mpath}.content' must be text (images and audio are not supported)",
                                      f"{mpath}.content")
            try:
                self.messages.append((role, compile_template(content)))
            except TemplateError as exc:
                raise GraderSpecError(f"'{mpath}.content': {exc}", f"{mpath}.content") from None
        rng = spec.get("range", [0, 1])
        bounds = [numbers.to_float(x) for x in rng] if isinstance(rng, list) and len(rng) == 2 else [None]
        if None in bounds or not bounds[0] < bounds[1]:   # finite, at most 38 digits: never OverflowError
            raise GraderSpecError(f"'{path}.range' must be [min, max] with min < max (finite numbers)",
                                  f"{path}.range")
        self.lo, self.hi = bounds
        sampling = spec.get("sampling_params") or {}
        if not isinstance(sampling, dict):
            raise GraderSpecError(f"'{path}.sampling_params' must be an object", f"{path}.sampling_params")
        _only(sampling, self.SAMPLING, f"{path}.sampling_params")
        bad = numbers.request_problem(sampling)     # seed, temperature, top_p as the gateway bounds them
        if bad is not None:
            raise GraderSpecError(f"'{path}.sampling_params.{bad[0]}' {bad[1]}", f"{path}.sampling_params.{bad[0]}")
        # Every judge call is held to the team's budget: its output must be bounded.
        cap = sampling.get("max_completion_tokens", sampling.get("max_completions_tokens"))
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int)
                                or not 1 <= cap <= JUDGE_MAX_OUTPUT_TOKENS):
            field_ = "max_completion_tokens" if "max_completion_tokens" in sampling else "max_completions_tokens"
            raise GraderSpecError(f"'{path}.sampling_params.{field_}' must be an integer from 1 to "
                                  f"{JUDGE_MAX_OUTPUT_TOKENS}", f"{path}.sampling_params.{field_}")
        self.max_output = cap or JUDGE_DEFAULT_OUTPUT_TOKENS
        self.sampling = {**{k: v for k, v in sampling.items() if k != "max_completions_tokens"},
                         "max_completion_tokens": self.max_output}

    def grade(self, sample, item, deps):
        messages = [{"role": role, "content": render(item, sample)} for role, render in self.messages]
        if deps.judge is None:
            return Result(0.0, self.name, self.type, {"model_grader_server_error"}, "no judge available")
        try:
            text, tokens = deps.judge(self.model, messages, self.sampling)
        except JudgeRefused:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed judge call is a graded error, not a crash
            return Result(0.0, self.name, self.type, {"model_grader_server_error"}, str(exc)[:300], model=self.model)
        value = parse_score(text, self.lo, self.hi)
        if value is None:
            kind = "model_grader_refusal_error" if _REFUSAL.match(text) else "model_grader_parse_error"
            return Result(0.0, self.name, self.type, {kind}, text[:200], token_usage=tokens, model=self.model)
        return Result(min(self.hi, max(self.lo, value)), self.name, self.type, token_usage=tokens, model=self.model)


class LambdaGrader(Grader):
    """A team's own reward Lambda, called with Bedrock's contract (for dry runs and preflight)."""
    type = "lambda"

    def __init__(self, spec, path):
        super().__init__(spec, path)
        _only(spec, {"type", "name", "lambda"}, path)
        ref = _need(spec, "lambda", dict, path)
        _only(ref, {"function"}, f"{path}.lambda")
        self.arn = _need(ref, "function", str, f"{path}.lambda")
        if not LAMBDA_ARN.fullmatch(self.arn) or len(self.arn) > 512:
            raise GraderSpecError(f"'{path}.lambda.function' must be exactly a Lambda function ARN like "
                                  "arn:aws:lambda:us-west-2:123456789012:function:rft-grader-<name> (no spaces or "
                                  "line breaks)", f"{path}.lambda.function")

    def grade(self, sample, item, deps):
        return self.grade_batch([(sample, item)], deps)[0]

    def grade_batch(self, pairs: list[tuple[dict, dict]], deps: Deps) -> list[Result]:
        """One invocation per group of rows that fits Lambda's 6 MB request limit."""
        rows = request_rows(pairs)
        out: list[Result | None] = [None] * len(rows)
        batches, too_large = size_batches(rows)
        for i in too_large:
            out[i] = Result(0.0, self.name, self.type, {"lambda_error"},
                            "the sample is larger than a Lambda invocation takes (6 MB)")
        for batch in batches:
            for i, result in zip(batch, self._invoke([rows[i] for i in batch], deps)):
                out[i] = result
        return out

    def _invoke(self, rows: list[dict], deps: Deps) -> list[Result]:
        try:
            response = deps.invoke_lambda(self.arn, rows)
        except TimeoutError:
            return [Result(0.0, self.name, self.type, {"lambda_timeout"}, "the Lambda timed out")] * len(rows)
        except Exception as exc:  # noqa: BLE001 - reported as the Lambda's error
            return [Result(0.0, self.name, self.type, {"lambda_error"}, str(exc)[:300])] * len(rows)
        scores, problems = check_response(rows, response)
        if problems:
            detail = "; ".join(problems[:5])
            return [Result(0.0, self.name, self.type, {"lambda_contract_error"}, detail)] * len(rows)
        return [Result(s, self.name, self.type) for s in scores]


class Multi(Grader):
    type = "multi"

    def __init__(self, spec, path, depth):
        super().__init__(spec, path)
        _only(spec, {"type", "name", "graders", "calculate_output"}, path)
        graders = _need(spec, "graders", dict, path)
        if "type" in graders:   # a single grader object, as the SDK's type hints allow
            graders = {graders.get("name") or graders["type"]: graders}
        if not graders:
            raise GraderSpecError(f"'{path}.graders' must name at least one grader", f"{path}.graders")
        self.graders = {}
        for name, sub in graders.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise GraderSpecError(f"'{path}.graders.{name}': names must be identifiers usable in the formula",
                                      f"{path}.graders.{name}")
            self.graders[name] = build(sub, f"{path}.graders.{name}", depth + 1)
        self.formula = _need(spec, "calculate_output", str, path)
        try:
            self.evaluate = compile_formula(self.formula, set(self.graders))
        except FormulaError as exc:
            raise GraderSpecError(f"'{path}.calculate_output': {exc}", f"{path}.calculate_output") from None

    def grade(self, sample, item, deps):
        subs = {name: run(g, sample, item, deps) for name, g in self.graders.items()}
        errors = set().union(*(r.errors for r in subs.values()))
        tokens = sum(r.token_usage for r in subs.values())
        values = {name: r.reward for name, r in subs.items()}
        try:
            reward = self.evaluate(values)   # bounded: milliseconds at most, whatever the values
        except FormulaError as exc:  # e.g. division by zero in the team's formula
            return Result(0.0, self.name, self.type, errors | {"formula_parse_error"}, str(exc)[:200], values, tokens)
        return Result(reward, self.name, self.type, errors, None, values, tokens)


_TYPES = {"string_check": StringCheck, "text_similarity": TextSimilarity, "score_model": ScoreModel,
          "lambda": LambdaGrader}


def _check_size(spec: dict, path: str) -> None:
    try:
        size = len(json.dumps(spec, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (ValueError, TypeError, RecursionError):
        raise GraderSpecError(f"'{path}' must be plain JSON, nested a reasonable depth", path) from None
    if size > MAX_SPEC_BYTES:
        raise GraderSpecError(f"'{path}' is {size:,} bytes as JSON; the limit is {MAX_SPEC_BYTES:,} bytes "
                              "(shorten names, prompts or the number of sub-graders)", path)


def build(spec: Any, path: str = "grader", depth: int = 0) -> Grader:
    """Checks a grader spec and compiles it. Raises GraderSpecError naming the field."""
    if not isinstance(spec, dict):
        raise GraderSpecError(f"'{path}' must be an object", path)
    if depth == 0:
        _check_size(spec, path)
    kind = spec.get("type")
    if kind == "python":
        raise GraderSpecError("python graders run arbitrary code and are not accepted; package the code as an "
                              "AWS Lambda function and use {\"type\": \"lambda\", \"lambda\": {\"function\": <ARN>}}",
                              f"{path}.type")
    if kind == "multi":
        if depth >= MAX_DEPTH:
            raise GraderSpecError(f"'{path}': multi graders nest at most {MAX_DEPTH} deep", path)
        return Multi(spec, path, depth)
    if kind == "label_model":
        raise GraderSpecError(f"'{path}.type': label_model is not supported; use score_model", f"{path}.type")
    if kind not in _TYPES:
        raise GraderSpecError(f"'{path}.type' must be one of string_check, text_similarity, score_model, multi, "
                              f"lambda; got {kind!r}", f"{path}.type")
    return _TYPES[kind](spec, path)


def run(grader: Grader, sample: dict, item: dict, deps: Deps) -> Result:
    """Grades one sample. Never raises (but for JudgeRefused); the reward is always a finite number."""
    try:
        result = grader.grade(sample, item, deps)
    except JudgeRefused:
        raise
    except InvalidVariable as exc:
        return Result(0.0, grader.name, grader.type, {"invalid_variable_error"}, str(exc))
    except Exception as exc:  # noqa: BLE001 - one bad sample never fails the batch
        return Result(0.0, grader.name, grader.type, {"other_error"}, f"{type(exc).__name__}: {exc}"[:300])
    if numbers.to_float(result.reward) is None:     # never OverflowError on a huge int
        return Result(0.0, grader.name, grader.type, result.errors | {"other_error"}, "non-finite reward",
                      result.sub_rewards, result.token_usage)
    result.reward = float(result.reward)
    return result


def judge_specs(spec: Any, path: str = "grader") -> list[tuple[dict, str]]:
    """Every score_model judge in a (checked) spec, with its param path."""
    if not isinstance(spec, dict):
        return []
    if spec.get("type") == "score_model":
        return [(spec, path)]
    subs = spec.get("graders") if spec.get("type") == "multi" else None
    if not isinstance(subs, dict):
        return []
    if "type" in subs:
        subs = {subs.get("name") or subs["type"]: subs}
    return [found for name, sub in subs.items() for found in judge_specs(sub, f"{path}.graders.{name}")]


def judge_models(spec: Any, path: str = "grader") -> list[tuple[str, str, int]]:
    """(model, its param path, output cap) of every score_model judge in a (checked) spec."""
    found = []
    for judge, where in judge_specs(spec, path):
        sampling = judge.get("sampling_params") or {}
        cap = sampling.get("max_completion_tokens", sampling.get("max_completions_tokens"))
        found.append((judge.get("model"), f"{where}.model", cap or JUDGE_DEFAULT_OUTPUT_TOKENS))
    return found


def calls_out(spec: Any) -> bool:
    """Whether grading calls something outside (an LLM judge, a team Lambda): slow and billed,
    so its preflight runs in the job worker, not on the request path."""
    if not isinstance(spec, dict):
        return False
    if spec.get("type") in ("score_model", "lambda"):
        return True
    subs = spec.get("graders") if spec.get("type") == "multi" else None
    if not isinstance(subs, dict):
        return False
    return calls_out(subs) if "type" in subs else any(calls_out(sub) for sub in subs.values())


def run_text(grader: Grader, output_text: str, item: dict, deps: Deps) -> tuple[Result, float]:
    started = time.perf_counter()
    result = run(grader, make_sample(output_text), item, deps)
    return result, time.perf_counter() - started
