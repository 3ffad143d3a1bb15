"""Preflight probes for graders that read `{{sample.output_json.<field>}}` (issue #24): each probe is
graded the way the grader reads answers (its text in that field of a JSON object), so a sound
grader with plain-string references ("540") is not refused -- for every field path and reference
(property-based), through the real graders, and through the API."""
import json

from helpers import http
from hypothesis import given, settings
from hypothesis import strategies as st
from sample_data import jsonl

from chalicelib.domain.graders import Deps, build, run_text
from chalicelib.domain.graders.preflight import (
    CRITICAL,
    PROBES,
    context,
    findings,
    json_paths,
    others_for,
    stats,
)

FIELD = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True)
REFERENCE = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF, exclude_categories=("Cs",)),
                    min_size=1, max_size=12)


def _report(spec, references):
    """The preflight's probe statistics and findings, exactly as grading/preflight.py computes them."""
    grader = build(spec)
    items = [{"id": f"row-{i}", "messages": [{"role": "user", "content": f"Question {i}?"}],
              "reference_answer": ref} for i, ref in enumerate(references)]
    by_probe = {p: [] for p in PROBES}
    for item, others in zip(items, others_for(items)):
        ctx = context(spec, others)
        for probe, make in PROBES.items():
            text = make(item, ctx)
            if text is not None:
                by_probe[probe].append(run_text(grader, text, item, Deps())[0])
    total = sum(len(rs) for rs in by_probe.values())
    kinds = {}
    for rs in by_probe.values():
        for r in rs:
            for k in r.errors:
                kinds[k] = kinds.get(k, 0) + 1
    probes = {p: stats([r.reward for r in rs if not r.errors], sum(1 for r in rs if r.errors))
              for p, rs in by_probe.items()}
    return probes, findings(probes, kinds, total)


@settings(max_examples=60, deadline=None)
@given(st.lists(FIELD, min_size=1, max_size=3), st.lists(REFERENCE, min_size=3, max_size=6, unique=True))
def test_an_output_json_grader_with_plain_string_references_is_not_refused(path, references):
    field = ".".join(path)
    spec = {"type": "string_check", "name": "json", "input": f"{{{{sample.output_json.{field}}}}}",
            "reference": "{{item.reference_answer}}", "operation": "eq"}
    assert json_paths(spec) == [tuple(path)]
    probes, found = _report(spec, references)
    assert probes["reference"]["mean"] == 1.0 and probes["reference"]["errors"] == 0
    assert not [f for f in found if f["severity"] == CRITICAL], found
    assert probes["wrong_field"]["mean"] == 0.0 and probes["plausible_wrong"]["mean"] == 0.0


def test_an_output_json_grader_that_pays_for_anything_is_still_refused():
    blind = {"type": "string_check", "name": "json", "input": "{{sample.output_json.answer}}",
             "reference": "{{item.reference_answer}}", "operation": "ne"}
    _, found = _report(blind, ["540", "120", "60"])
    assert {f["code"] for f in found if f["severity"] == CRITICAL} >= {"reference_scores_low"}
    text = {"type": "string_check", "name": "text", "input": "{{sample.output_text}}",
            "reference": "{{item.reference_answer}}", "operation": "eq"}
    assert json_paths(text) == [] and PROBES["reference"]({"reference_answer": "540"}, context(text, [])) == "540"


def test_the_api_preflight_passes_a_sound_output_json_grader_with_plain_references(client):
    rows = [{"messages": [{"role": "user", "content": f"How many seconds are in {m} minutes?"}],
             "reference_answer": str(60 * m)} for m in range(2, 122)]
    f = client.files.create(file=("t.jsonl", jsonl(rows)), purpose="fine-tune")
    spec = {"type": "string_check", "name": "json", "input": "{{sample.output_json.answer}}",
            "reference": "{{item.reference_answer}}", "operation": "eq"}
    status, report = http("POST", f"{str(client.base_url).rstrip('/')}/graders/preflight", client.api_key,
                          {"grader": spec, "file_id": f.id, "sample_size": 10})
    assert status == 200, report
    assert report["passed"], json.dumps(report["findings"])
    assert report["probes"]["reference"]["mean"] == 1.0 and report["probes"]["reference"]["errors"] == 0
