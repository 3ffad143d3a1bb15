"""The streaming dataset validator, tested directly (pure)."""
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from sample_data import arithmetic_rows, jsonl

from chalicelib.domain import datasets


def test_valid_file_counts_rows_bytes_tokens():
    data = jsonl(arithmetic_rows(150))
    report = datasets.validate([data])
    assert report["valid"] and report["rows"] == 150 and report["error_count"] == 0
    assert report["bytes"] == len(data)
    assert report["estimated_tokens"] > 150 * 5
    assert report["training_row_limits"] == {"min": 100, "max": 20000, "ok": True}


def test_errors_name_the_line():
    rows = [json.dumps(r) for r in arithmetic_rows(5)]
    rows[1] = '{"messages": [}'
    rows[3] = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    report = datasets.validate([("\n".join(rows) + "\n").encode()])
    assert not report["valid"]
    assert [e["line"] for e in report["errors"]] == [2, 4]
    assert "invalid JSON" in report["errors"][0]["message"]
    assert "last message must be the prompt turn" in report["errors"][1]["message"]


def test_each_rule():
    cases = {
        b"[]": "not a JSON object",
        b'{"messages": []}': "non-empty list",
        b'{"messages": [{"role": "robot", "content": "x"}]}': "role must be",
        b'{"messages": [{"role": "user", "content": 5}]}': "content must be",
        b'{"messages": [{"role": "user", "content": "x"}], "reference_answer": 3}': "reference_answer",
        b'{"messages": [{"role": "user", "content": "x"}], "id": 3}': "'id' must be a string",
        b"   ": "empty line",
        b"\xff\xfe": "UTF-8",
    }
    for line, expected in cases.items():
        report = datasets.validate([line + b"\n"])
        assert expected in report["errors"][0]["message"], (line, report["errors"])


def test_text_parts_and_extra_fields_are_accepted():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
           "reference_answer": {"solution": "x"}, "tags": ["a"], "id": "r1"}
    assert datasets.validate([json.dumps(row).encode()])["valid"]


def test_row_limits_are_reported_not_rejected():
    report = datasets.validate([jsonl(arithmetic_rows(99))])
    assert report["valid"] and not report["training_row_limits"]["ok"]
    assert "100-20000" in report["warnings"][0]


def test_error_list_is_capped_but_counted():
    report = datasets.validate([b"nope\n" * 500])
    assert report["error_count"] == 500 and len(report["errors"]) == datasets.MAX_REPORTED_ERRORS


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=30), st.integers(min_value=1, max_value=64))
def test_chunking_never_changes_the_result(chunks, size):
    data = b"".join(chunks)
    whole = datasets.validate([data])
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    assert datasets.validate(pieces) == whole


# ---- purpose "evals": OpenAI's eval rows -------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)


def test_eval_rows_are_validated_as_eval_rows_and_fine_tune_rows_stay_as_they_are():
    rows = arithmetic_rows(5)
    evals = [{"item": r, "sample": {"output_text": r["reference_answer"]}} for r in rows[:3]] + \
        [{"item": r} for r in rows[3:]]
    report = datasets.validate([jsonl(evals)], datasets.EVALS)
    assert report["valid"] and report["rows"] == 5 and report["eval_row_limits"] == {"max": 2000, "ok": True}
    assert "training_row_limits" not in report and not report["warnings"]
    # Each shape is refused in the other purpose, naming the line.
    assert datasets.validate([jsonl(rows)], datasets.EVALS)["errors"][0] == {
        "line": 1, "message": "'item' must be an object (an eval row is {\"item\": {...}} with an optional \"sample\")"}
    assert not datasets.validate([jsonl(evals)], datasets.FINE_TUNE)["valid"]
    bad = [{"item": rows[0], "extra": 1}, {"item": rows[0], "sample": "text"}, {"item": []}, []]
    report = datasets.validate([jsonl(bad)], datasets.EVALS)
    assert [e["line"] for e in report["errors"]] == [1, 2, 3, 4]
    assert "unknown field 'extra'" in report["errors"][0]["message"]
    assert "'sample' must be an object" in report["errors"][1]["message"]


def test_eval_row_limit_matches_the_eval_runs():
    from chalicelib.domain import evals

    assert datasets.EVAL_MAX_ROWS == evals.MAX_ITEMS


@settings(max_examples=300, deadline=None)
@given(JSON, st.one_of(st.none(), JSON), st.dictionaries(st.text(max_size=6), JSON, max_size=2))
def test_an_eval_row_is_exactly_an_item_object_and_an_optional_sample_object(item, sample, extra):
    row = {"item": item, **({} if sample is None else {"sample": sample}), **extra}
    problem, _ = datasets.check_eval_row(row)
    valid = isinstance(row["item"], dict) and set(row) <= {"item", "sample"} and \
        isinstance(row.get("sample", {}), dict)
    assert (problem is None) == valid, (row, problem)
    # And through the streaming validator, as bytes, it agrees.
    assert datasets.validate([json.dumps(row).encode()], datasets.EVALS)["valid"] == valid
