"""Datasets through the unmodified openai SDK: files and chunked uploads."""
import json

import openai
import pytest
from sample_data import arithmetic_rows, jsonl


def test_upload_list_retrieve_delete(client):
    data = jsonl(arithmetic_rows(150))
    f = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert f.status == "processed" and f.bytes == len(data) and f.purpose == "fine-tune"
    report = f.model_extra["rft_validation"]
    assert report["rows"] == 150 and report["training_row_limits"]["ok"]

    assert client.files.retrieve(f.id).filename == "train.jsonl"
    assert f.id in [x.id for x in client.files.list(purpose="fine-tune")]
    assert client.files.content(f.id).read() == data
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_malformed_line_is_rejected_with_its_line_number(client):
    rows = [json.dumps(r) for r in arithmetic_rows(150)]
    rows[41] = rows[41][:-3]
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("bad.jsonl", ("\n".join(rows)).encode()), purpose="fine-tune")
    assert "line 42" in err.value.message and "invalid JSON" in err.value.message
    assert err.value.body["param"] == "file"


def test_other_purposes_are_refused(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="assistants")
    assert "purpose" in err.value.message and err.value.body["param"] == "purpose"


def test_99_rows_upload_with_a_warning(client):
    f = client.files.create(file=("small.jsonl", jsonl(arithmetic_rows(99))), purpose="fine-tune")
    report = f.model_extra["rft_validation"]
    assert not report["training_row_limits"]["ok"] and "100-20000" in report["warnings"][0]


def test_another_teams_file_is_404(client, stack, make_team):
    f = client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="fine-tune")
    _, other_key = make_team("other")
    other = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=other_key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        other.files.delete(f.id)
    assert f.id not in [x.id for x in other.files.list()]


def test_large_file_through_upload_file_chunked(client):
    rows = arithmetic_rows(20_000, pad_to=1200)
    data = jsonl(rows)
    assert len(data) > 25_000_000
    upload = client.uploads.upload_file_chunked(file=data, filename="big.jsonl", bytes=len(data),
                                                mime_type="application/jsonl", purpose="fine-tune",
                                                part_size=4 * 1024 * 1024)   # base64 in the event: < 6 MB
    assert upload.status == "completed"
    assert upload.file.bytes == len(data)
    report = client.files.retrieve(upload.file.id).model_extra["rft_validation"]
    assert report["rows"] == 20_000 and report["valid"]


def test_upload_errors(client):
    up = client.uploads.create(bytes=10, filename="x.jsonl", mime_type="application/jsonl", purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as err:
        client.uploads.complete(up.id, part_ids=["part-nope"])
    assert "Unknown part" in err.value.message
    part = client.uploads.parts.create(up.id, data=b'{"a": 1}\n')
    with pytest.raises(openai.BadRequestError) as err:
        client.uploads.complete(up.id, part_ids=[part.id])
    assert "bytes=10" in err.value.message
    assert client.uploads.cancel(up.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.uploads.parts.create(up.id, data=b"x")
    with pytest.raises(openai.BadRequestError):
        client.uploads.create(bytes=10, filename="x.pdf", mime_type="application/pdf", purpose="fine-tune")


def test_upload_with_malformed_content_is_rejected(client):
    data = jsonl(arithmetic_rows(120)) + b"{oops\n"
    with pytest.raises(openai.BadRequestError) as err:
        client.uploads.upload_file_chunked(file=data, filename="b.jsonl", bytes=len(data),
                                           mime_type="application/jsonl", purpose="fine-tune", part_size=4096)
    assert "line 121" in err.value.message


# ---- purpose "evals" and expires_after (issue #23) ---------------------------------------------

def _eval_rows(n):
    return [{"item": r, "sample": {"output_text": r["reference_answer"]}} for r in arithmetic_rows(n, seed=4)]


def test_eval_rows_upload_with_purpose_evals_and_are_no_training_file(client):
    from helpers import register_graders, rft

    register_graders(client)
    data = jsonl(_eval_rows(120))
    f = client.files.create(file=("eval.jsonl", data), purpose="evals")
    assert f.purpose == "evals" and f.status == "processed" and f.model_extra["rft_validation"]["rows"] == 120
    assert client.files.content(f.id).read() == data
    assert [x.id for x in client.files.list(purpose="evals")] == [f.id]
    assert f.id not in [x.id for x in client.files.list(purpose="fine-tune")]
    up = client.uploads.upload_file_chunked(file=data, filename="e.jsonl", bytes=len(data), purpose="evals",
                                            mime_type="application/jsonl", part_size=4096)
    assert up.status == "completed" and up.file.purpose == "evals"
    # Each purpose's rows only: fine-tune rows are not eval rows, eval rows are not fine-tune rows.
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("t.jsonl", jsonl(arithmetic_rows(100))), purpose="evals")
    assert "Invalid eval data: line 1: 'item' must be an object" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("e.jsonl", data), purpose="fine-tune")
    assert "Invalid training data: line 1" in err.value.message
    # 120 eval rows are within Bedrock's row count, but they are no training data.
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=f.id, method=rft())
    assert err.value.param == "training_file" and err.value.code == "invalid_file_purpose"


def _aged(team_id, file_id, seconds_ago=1):
    """The clock moved past the file's expires_at: its stored expiry is set that far in the past."""
    from chalicelib.domain import ids
    from chalicelib.store.models import File

    record = File.get(team_id, file_id, consistent_read=True)
    record.update(actions=[File.expires_at.set(ids.now() - seconds_ago)])
    return record


def test_expires_after_sets_expires_at_and_an_expired_file_is_gone_then_swept(client, stack):
    import boto3
    from helpers import register_graders, rft

    from chalicelib.config import settings
    from chalicelib.platform import files
    from chalicelib.store.models import File
    from chalicelib.training import lifecycle

    team_id = register_graders(client)
    data = jsonl(arithmetic_rows(100))
    f = client.files.create(file=("t.jsonl", data), purpose="fine-tune",
                            expires_after={"anchor": "created_at", "seconds": 3600})
    assert f.expires_at == f.created_at + 3600
    assert client.files.retrieve(f.id).expires_at == f.expires_at
    kept = client.files.create(file=("k.jsonl", data), purpose="fine-tune",
                               expires_after={"anchor": "created_at", "seconds": 2_592_000})
    forever = client.files.create(file=("f.jsonl", data), purpose="fine-tune")
    assert forever.expires_at is None
    upload = client.uploads.create(bytes=len(data), filename="u.jsonl", purpose="fine-tune",
                                   mime_type="application/jsonl", expires_after={"anchor": "created_at", "seconds": 7200})
    part = client.uploads.parts.create(upload.id, data=data)
    upload = client.uploads.complete(upload.id, part_ids=[part.id])
    assert upload.file.expires_at == upload.file.created_at + 7200
    assert upload.expires_at == upload.created_at + 3600        # the upload's own expiry is unchanged

    for bad in ({"anchor": "created_at", "seconds": 3599}, {"anchor": "created_at", "seconds": 2_592_001},
                {"anchor": "last_active_at", "seconds": 3600}):
        with pytest.raises(openai.BadRequestError) as err:
            client.files.create(file=("t.jsonl", data), purpose="fine-tune", expires_after=bad)
        assert err.value.param.startswith("expires_after")
        with pytest.raises(openai.BadRequestError) as err:
            client.uploads.create(bytes=10, filename="x.jsonl", mime_type="application/jsonl", purpose="fine-tune",
                                  expires_after=bad)
        assert err.value.param.startswith("expires_after")

    record = _aged(team_id, f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)
    assert f.id not in [x.id for x in client.files.list()]
    assert {kept.id, forever.id, upload.file.id} <= {x.id for x in client.files.list()}
    with pytest.raises(openai.NotFoundError) as err:
        client.fine_tuning.jobs.create(model="openai.gpt-oss-20b", training_file=f.id, method=rft())
    assert err.value.param == "training_file"

    s3 = boto3.client("s3")
    assert s3.head_object(Bucket=settings().datasets_bucket, Key=record.s3_key)   # not yet swept
    report = lifecycle.reconcile()
    assert report.files_expired >= 1 and not report.problems
    with pytest.raises(File.DoesNotExist):
        File.get(team_id, f.id, consistent_read=True)
    with pytest.raises(s3.exceptions.ClientError):
        s3.head_object(Bucket=settings().datasets_bucket, Key=record.s3_key)
    # The files not yet due stay, and a second sweep finds nothing more of this team's.
    assert client.files.retrieve(kept.id).expires_at == kept.expires_at
    assert client.files.retrieve(upload.file.id).id == upload.file.id
    files.delete_expired()
    assert {kept.id, forever.id, upload.file.id} <= {x.id for x in client.files.list()}


@pytest.mark.parametrize("seconds", ["3600", "²⁶⁰⁰", "1e4", "-3600", "3600.0", "9" * 400, "", " 3600", "٣٦٠٠"])
def test_expires_after_form_fields_are_parsed_strictly(client, stack, seconds):
    """The SDK sends expires_after as form fields (strings): only ASCII digits in range are a number."""
    import httpx

    r = httpx.post(f"{stack.base_url}/v1/files", headers={"Authorization": f"Bearer {client.api_key}"},
                   data={"purpose": "fine-tune", "expires_after[anchor]": "created_at",
                         "expires_after[seconds]": seconds},
                   files={"file": ("t.jsonl", jsonl(arithmetic_rows(100)))})
    if seconds == "3600":
        assert r.status_code == 200 and r.json()["expires_at"] == r.json()["created_at"] + 3600
    else:
        assert r.status_code == 400 and r.json()["error"]["param"] == "expires_after.seconds", r.text


def test_expires_after_is_parsed_strictly_whatever_it_holds():
    """Any value (Unicode digits, huge or non-finite numbers, surrogates, nesting) is a number of
    seconds in OpenAI's range or a 400 naming the field, never another error."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from chalicelib.errors import InvalidRequest
    from chalicelib.platform import files

    digits = st.text(alphabet=st.sampled_from("0123456789²³¹٣٠٦۰০߀𝟘𝟙 .-+e\ud800"), max_size=12)
    numbers = st.integers(min_value=-10**400, max_value=10**400) | st.floats(allow_nan=True, allow_infinity=True)
    seconds = digits | numbers | st.booleans() | st.none() | st.lists(st.integers(), max_size=2)

    @settings(max_examples=400, deadline=None)
    @given(st.sampled_from(["created_at", "last_active_at", "", None, 1]), seconds,
           st.dictionaries(st.sampled_from(["x", "anchor"]), st.integers(), max_size=1))
    def check(anchor, value, extra):
        raw = {"anchor": anchor, "seconds": value, **extra}
        try:
            got = files.expires_after_seconds(raw)
        except InvalidRequest as err:
            assert err.param.startswith("expires_after")
            return
        assert type(got) is int and files.EXPIRES_MIN <= got <= files.EXPIRES_MAX
        assert raw["anchor"] == "created_at" and set(raw) == {"anchor", "seconds"}
        assert str(value).isascii() and str(value).isdigit() or value == got

    check()


def test_any_file_id_in_a_body_is_a_4xx_never_a_500(api, make_team):
    """Every route that takes a file id in its body (an eval run's source, a job's files) looks it up
    through files.get_file: ids no DynamoDB key can hold (too long, lone surrogates), Unicode
    digits and control characters name no file (a 400/404, the id quoted bounded and escaped)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    _, key = make_team("odd-file-ids")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    ev = api.http.post("/v1/evals", headers=headers, body=json.dumps({
        "data_source_config": {"type": "custom", "item_schema": {"type": "object"}},
        "testing_criteria": [{"type": "string_check", "name": "x", "input": "{{sample.output_text}}",
                              "reference": "a", "operation": "eq"}]})).json_body
    odd = st.text(alphabet=st.sampled_from("file-abc0²٣𝟘\x00\ud800\udfff é"), min_size=1, max_size=12)
    ids = odd | st.builds(lambda s, n: "file-" + s * n, odd, st.sampled_from([100, 400, 3000]))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ids)
    def check(file_id):
        run = api.http.post(f"/v1/evals/{ev['id']}/runs", headers=headers, body=json.dumps(
            {"data_source": {"type": "jsonl", "source": {"type": "file_id", "id": file_id}}}))
        assert run.status_code == 400, run.body
        assert len(run.json_body["error"]["message"]) < 300 and run.json_body["error"]["message"].isascii()
        job = api.http.post("/v1/fine_tuning/jobs", headers=headers, body=json.dumps(
            {"model": "openai.gpt-oss-20b", "training_file": file_id}))
        assert job.status_code in (400, 404), job.body

    check()
