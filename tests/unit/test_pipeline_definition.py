"""The pipeline's state machine definition (deploy/pipeline.asl.json) and its spec rules, without servers.

The definition is the file the template deploys and the local stack runs: checked here by moto's ASL
parser (the Step Functions interpreter the local stack executes it with) and by the structure every run
relies on: every transition lands on a state, every state is reachable, every task names a step the
pipeline worker has, and the Choice states read what those steps answer.
"""
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chalicelib.domain import pipelines as rules
from chalicelib.errors import InvalidRequest

ASL = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "pipeline.asl.json").read_text())


def _targets(state: dict) -> list[str]:
    out = [state[k] for k in ("Next", "Default") if k in state]
    out += [c["Next"] for c in state.get("Choices", [])] + [c["Next"] for c in state.get("Catch", [])]
    return out


def test_moto_parses_the_definition_the_template_deploys():
    from moto.stepfunctions.parser.models import StepFunctionsParserBackend

    StepFunctionsParserBackend._validate_definition(definition=json.dumps(ASL))


def test_every_transition_lands_and_every_state_is_reached():
    states = ASL["States"]
    for name, state in states.items():
        for target in _targets(state):
            assert target in states, f"{name} -> {target}"
        assert state["Type"] in ("Succeed", "Fail") or state.get("End") or _targets(state), name
    seen, todo = set(), [ASL["StartAt"]]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _targets(states[name])
    assert seen == set(states)


def test_every_task_is_a_step_the_worker_does_and_every_wait_has_a_limit():
    from chalicelib.pipelines.steps import FINISHING, HANDLERS

    tasks = {n: s for n, s in ASL["States"].items() if s["Type"] == "Task"}
    steps = {s["Parameters"]["MessageBody"]["step"] for s in tasks.values()}
    assert steps == set(HANDLERS), steps ^ set(HANDLERS)
    assert set(rules.STEPS) <= steps and set(FINISHING) <= steps
    for name, state in tasks.items():
        assert state["Resource"] == "arn:aws:states:::sqs:sendMessage.waitForTaskToken", name
        assert state["Parameters"]["MessageBody"]["token.$"] == "$$.Task.Token"
        assert "TimeoutSeconds" in state or "TimeoutSecondsPath" in state, name   # never waits forever
        if name not in ("RunFailed",):       # a failed step fails the run with its step and reason
            assert any(c["Next"] == "RunFailed" for c in state.get("Catch", [])), name
    assert ASL["States"]["Approval"]["TimeoutSecondsPath"] == "$.approval.timeout_seconds"


def test_the_choices_read_what_the_steps_answer():
    paths = {c["Variable"] for s in ASL["States"].values() if s["Type"] == "Choice" for c in s["Choices"]}
    assert paths == {"$.results.check_data.changed", "$.results.gate.passed", "$.approval.mode"}
    start = rules.execution_input("t", "p", "r", {"mode": "slack", "approvers": ["U1"], "timeout_seconds": 60})
    assert start["approval"] == {"mode": "slack", "timeout_seconds": 60}
    source = (Path(__file__).resolve().parents[2] / "chalicelib" / "pipelines" / "steps.py").read_text()
    assert re.search(r'return \{"changed": False', source) and re.search(r'return \{"passed": not failures', source)


# ---- the spec's rules ---------------------------------------------------------------------------

def test_schedules_and_approvals():
    assert rules.check_schedule("rate(5 minutes)") == "rate(5 minutes)"
    assert rules.check_schedule("cron(0 9 ? * MON *)") == "cron(0 9 ? * MON *)"
    for bad in ("rate(1 minute)", "rate(0 days)", "every day", "cron(0 9 * *)", "rate(5 weeks)"):
        with pytest.raises(InvalidRequest) as err:
            rules.check_schedule(bad)
        assert err.value.param == "triggers.schedule"
    assert rules.check_approval(None) == {"mode": "auto"}
    with pytest.raises(InvalidRequest) as err:
        rules.check_approval({"mode": "slack", "approvers": ["not-a-user"]})
    assert err.value.param == "approval.approvers[0]"
    with pytest.raises(InvalidRequest) as err:
        rules.check_approval({"mode": "slack", "approvers": ["U0A1"], "timeout_seconds": 5})
    assert err.value.param == "approval.timeout_seconds"


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=20)
FIELDS = st.fixed_dictionaries({}, optional={k: JSON for k in sorted(rules.TOP_KEYS)})


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON, FIELDS), st.booleans())
def test_any_body_is_a_spec_or_a_400_naming_its_field(body, partial):
    try:
        out = rules.check_spec(body, partial=partial)
    except InvalidRequest as err:
        assert err.param and err.status == 400
        return
    assert isinstance(out, dict) and set(out) <= rules.TOP_KEYS
