"""OpenAI-compatible datasets: /v1/files and /v1/uploads."""
from __future__ import annotations

from typing import Any

from chalice import Blueprint, Response
from pydantic import Field

from chalicelib.api.bodies import StrictModel
from chalicelib.api.http import Request, query_int, route
from chalicelib.domain import multipart
from chalicelib.errors import InvalidRequest
from chalicelib.platform import files

bp = Blueprint(__name__)


def _form(req: Request) -> dict[str, multipart.Part]:
    return multipart.parse(req.content_type(), req.raw_body)


_EXPIRES_FIELDS = {"expires_after[anchor]": "anchor", "expires_after[seconds]": "seconds"}


def _form_expires_after(form: dict[str, multipart.Part]) -> int | None:
    """expires_after as the openai SDK sends it in a form (expires_after[anchor], expires_after[seconds])."""
    names = [name for name in form if name == "expires_after" or name.startswith("expires_after[")]
    if not names:
        return None
    unknown = [name for name in names if name not in _EXPIRES_FIELDS]
    if unknown:
        raise InvalidRequest(f"Unknown form field {unknown[0][:64]!r}: send expires_after[anchor] and "
                             "expires_after[seconds].", param="expires_after")
    try:
        raw = {_EXPIRES_FIELDS[name]: form[name].data.decode() for name in names}
    except UnicodeDecodeError:
        raise InvalidRequest("expires_after fields must be UTF-8 text.", param="expires_after") from None
    return files.expires_after_seconds(raw)


@route(bp, "/v1/files", ("POST",), consumes="multipart/form-data")
def create_file(req: Request):
    form = _form(req)
    if "file" not in form:
        raise InvalidRequest("Missing multipart field 'file'.", param="file")
    expires_after = _form_expires_after(form)
    purpose = form["purpose"].data.decode(errors="replace") if "purpose" in form else None
    upload = form["file"]
    return files.create_file(req.team_id, upload.filename, purpose, upload.data, expires_after)


@route(bp, "/v1/files", query={"purpose": "string", "limit": "integer", "after": "string", "order": "string"})
def list_files(req: Request):
    order = req.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'.", param="order")
    return files.list_files(req.team_id, req.query.get("purpose"), query_int(req, "limit", 10_000, 1, 10_000),
                            req.query.get("after"), order)


@route(bp, "/v1/files/{file_id}")
def retrieve_file(req: Request, file_id: str):
    return files.file_view(files.get_file(req.team_id, file_id))


@route(bp, "/v1/files/{file_id}", ("DELETE",))
def delete_file(req: Request, file_id: str):
    return files.delete_file(req.team_id, file_id)


@route(bp, "/v1/files/{file_id}/content", produces="application/jsonl")
def file_content(req: Request, file_id: str):
    return Response(body=files.file_content(req.team_id, file_id), status_code=200,
                    headers={"Content-Type": "application/jsonl"})


class CreateUpload(StrictModel):
    bytes: int = Field(gt=0)
    filename: str = Field(min_length=1, max_length=255)
    mime_type: str = Field(min_length=1, max_length=100)
    purpose: str
    expires_after: Any = None   # the resulting file's expiry (files.expires_after_seconds checks it)


class CompleteUpload(StrictModel):
    part_ids: list[str] = Field(min_length=1, max_length=10_000)
    md5: str | None = None


@route(bp, "/v1/uploads", ("POST",), body=CreateUpload)
def create_upload(req: Request):
    b = req.body
    return files.create_upload(req.team_id, b.filename, b.purpose, b.bytes, b.mime_type,
                               files.expires_after_seconds(b.expires_after))


@route(bp, "/v1/uploads/{upload_id}/parts", ("POST",), consumes="multipart/form-data")
def add_upload_part(req: Request, upload_id: str):
    form = _form(req)
    if "data" not in form:
        raise InvalidRequest("Missing multipart field 'data'.", param="data")
    return files.add_part(req.team_id, upload_id, form["data"].data)


@route(bp, "/v1/uploads/{upload_id}/complete", ("POST",), body=CompleteUpload)
def complete_upload(req: Request, upload_id: str):
    return files.complete_upload(req.team_id, upload_id, req.body.part_ids, req.body.md5)


@route(bp, "/v1/uploads/{upload_id}/cancel", ("POST",))
def cancel_upload(req: Request, upload_id: str):
    return files.cancel_upload(req.team_id, upload_id)


