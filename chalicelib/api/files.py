"""OpenAI-compatible datasets: /v1/files and /v1/uploads."""
from __future__ import annotations

from typing import Any

from chalice import Blueprint, Response
from pydantic import Field

from chalicelib.api.http import Request, StrictModel, query_int, route
from chalicelib.domain import multipart
from chalicelib.errors import InvalidRequest
from chalicelib.services import files

bp = Blueprint(__name__)


def _form(req: Request) -> dict[str, multipart.Part]:
    return multipart.parse(req.content_type(), req.raw_body)


def _refuse_expires_after() -> None:
    """rft-hub keeps a fine-tune file until it is deleted; it has no sweep that would delete it at an
    `expires_at`, so a request for one is refused rather than accepted and ignored (README, Datasets)."""
    raise InvalidRequest("expires_after is not supported: rft-hub keeps fine-tune files until they are deleted "
                         "(DELETE /v1/files/{file_id}). Send the request without expires_after.",
                         param="expires_after", code="unsupported_parameter")


@route(bp, "/v1/files", ("POST",), consumes="multipart/form-data")
def create_file(req: Request):
    form = _form(req)
    if "file" not in form:
        raise InvalidRequest("Missing multipart field 'file'.", param="file")
    if any(name == "expires_after" or name.startswith("expires_after[") for name in form):
        _refuse_expires_after()
    purpose = form["purpose"].data.decode(errors="replace") if "purpose" in form else None
    upload = form["file"]
    return files.create_file(req.team_id, upload.filename, purpose, upload.data)


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
    expires_after: Any = None   # the resulting file's expiry: refused when given (see _refuse_expires_after)


class CompleteUpload(StrictModel):
    part_ids: list[str] = Field(min_length=1, max_length=10_000)
    md5: str | None = None


@route(bp, "/v1/uploads", ("POST",), body=CreateUpload)
def create_upload(req: Request):
    b = req.body
    if b.expires_after is not None:
        _refuse_expires_after()
    return files.create_upload(req.team_id, b.filename, b.purpose, b.bytes, b.mime_type)


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


