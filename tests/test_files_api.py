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
