"""Evals that bind (issue #23): a run's cost cap counts what is sent (M1), and an eval worker
that meets an unexpected failure on an item fails the run instead of redelivering it for ever (L8)."""
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from chalicelib.domain import budget as budget_rules
from chalicelib.domain.graders.templates import compile_template, make_sample
from chalicelib.services import eval_worker
from chalicelib.store.models import LedgerEntry
from helpers import wait_run
from test_evals import JUDGE, TUNED, _eval, _inline, _team_id

FILLER = "Context. " * 3_000          # 27,000 characters of fixed text in every call


def _run_entries(team_id, run_id):
    return [e for e in LedgerEntry.query(team_id, consistent_read=True) if e.request_id.startswith(run_id + ".")]


def test_a_run_cost_cap_counts_the_rendered_template_and_judge_inputs(client, bedrock):
    """The finding's reproduction: a template (and a judge) with a long fixed text, a small cap."""
    team_id = _team_id(client)
    judge = {**JUDGE, "input": [{"role": "user", "content": FILLER + "Reference: {{item.reference_answer}}\n"
                                 "Answer: {{sample.output_text}}"}]}
    ev = _eval(client, TUNED, judge, name="cap-template")
    source = _inline("openai.gpt-oss-120b", 6)
    source["input_messages"]["template"][0]["content"]["text"] = FILLER + "Say {{item.reference_answer}}."
    # Each item sends ~27,000 characters twice (the generation and the judge): about $0.0010 each
    # at the local Bedrock's count; a cap of $0.0050 admits at most a couple of items.
    cap = 5_000
    run = client.evals.runs.create(ev.id, data_source=source, extra_body={"rft_max_usd": "0.005000"})
    done = wait_run(client, ev.id, run.id)
    assert done.status == "canceled" and done.error.code == "cost_cap_reached", done.error
    entries = _run_entries(team_id, run.id)
    spent = sum(e.cost_micro for e in entries)
    assert entries and {e.kind for e in entries} == {"inference", "grader"}    # items ran, judges too
    assert spent <= cap, (spent, len(entries))


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60)


@settings(max_examples=200, deadline=None)
@given(fixed=st.lists(_TEXT, min_size=1, max_size=4), refs=st.lists(st.sampled_from(
    ["{{sample.output_text}}", "{{ sample.output_text }}", "{{sample.output_json.a}}"]), max_size=3),
    reference=_TEXT, output=_TEXT)
def test_a_judge_input_never_exceeds_its_estimate(fixed, refs, reference, output):
    """Whatever the judge's template and the sample: its rendered input's estimate (what the
    gateway holds) is within the worker's bound for it."""
    text = "".join(f + r for f, r in zip(fixed, refs + [""] * len(fixed))) + "{{item.reference_answer}}"
    spec = {"input": [{"role": "user", "content": text}]}
    item, sample_text = {"reference_answer": reference}, json.dumps({"a": output})
    out_tokens = budget_rules.prompt_tokens_estimate(sample_text)      # as the worker counts a given sample
    parts, count = eval_worker._judge_input(spec)
    bound = budget_rules.prompt_tokens_estimate([{"role": r, "content": p(item, {})} for r, p in parts]) \
        + count * (out_tokens + eval_worker.JOIN_TOKENS)
    sent = [{"role": "user", "content": compile_template(text)(item, make_sample(sample_text))}]
    assert budget_rules.prompt_tokens_estimate(sent) <= bound
