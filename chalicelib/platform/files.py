"""Datasets: files and multipart uploads. Content in S3, metadata in DynamoDB, per team."""
from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator

from pynamodb.exceptions import DeleteError, DoesNotExist, UpdateError

from chalicelib.adapters import aws
from chalicelib.config import settings
from chalicelib.domain import datasets, ids, numbers
from chalicelib.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from chalicelib.store import dynamo, pagination
from chalicelib.store.models import File, Upload

PURPOSE = datasets.FINE_TUNE
PURPOSES = (datasets.FINE_TUNE, datasets.EVALS)   # training data; OpenAI's eval rows ({"item", "sample"})
UPLOAD_TTL_SECONDS = 3600
EXPIRES_MIN, EXPIRES_MAX = 3600, 2_592_000         # OpenAI's FileExpirationAfter: 1 hour to 30 days
EXPIRY_SWEEP_LIMIT = 200                            # files deleted per reconciler pass (the rest: next pass)
ACCEPTED_MIME_TYPES = {"application/jsonl", "application/x-jsonlines", "application/x-ndjson",
                       "application/json", "text/plain", "text/jsonl", "application/octet-stream"}
_S3_PART = 8 * 1024 * 1024  # S3 multipart parts must be >= 5 MiB except the last


def check_purpose(purpose: str | None) -> None:
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose must be 'fine-tune' (RFT training data) or 'evals' (eval rows); got "
                             f"{str(purpose)[:64]!r}.", param="purpose")


def expires_after_seconds(raw) -> int | None:
    """OpenAI's `expires_after` ({"anchor": "created_at", "seconds": 3600..2592000}) as seconds, or
    None when absent. Form fields arrive as strings ("3600"): only ASCII digits, bounded, are read."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"anchor", "seconds"}:
        raise InvalidRequest("expires_after must be {\"anchor\": \"created_at\", \"seconds\": <3600-2592000>}.",
                             param="expires_after")
    if raw["anchor"] != "created_at":
        raise InvalidRequest("expires_after.anchor must be 'created_at'.", param="expires_after.anchor")
    seconds = raw["seconds"]
    if isinstance(seconds, str):        # a form field: ASCII digits only, through the one strict parser
        seconds = numbers.ascii_int(seconds, max_digits=8)
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not EXPIRES_MIN <= seconds <= EXPIRES_MAX:
        raise InvalidRequest(f"expires_after.seconds must be an integer from {EXPIRES_MIN} (1 hour) to "
                             f"{EXPIRES_MAX} (30 days).", param="expires_after.seconds")
    return seconds


def expired(f: File, now: int | None = None) -> bool:
    """Past its expires_at: gone for every reader from that second, whether or not the sweep has
    deleted it yet."""
    return f.expires_at is not None and (ids.now() if now is None else now) >= int(f.expires_at)


def file_view(f: File) -> dict:
    # `expires_at` only when the file has one, and no `status_details` (deprecated; a file with a bad
    # line is never stored): OpenAI's File object types both as non-null and neither is required,
    # so they are left out rather than null.
    report = f.validation or {}
    view = {"id": f.file_id, "object": "file", "bytes": f.bytes, "created_at": f.created_at,
            "filename": f.filename, "purpose": f.purpose, "status": f.status, "rft_validation": report}
    if f.expires_at is not None:
        view["expires_at"] = int(f.expires_at)
    return view


def _file_list(data: list[dict], page: pagination.Page | None = None) -> dict:
    # OpenAI's ListFilesResponse requires `first_id` and `last_id` as strings, also on an empty
    # page: there they are "" (not null, which the document does not allow).
    return pagination.envelope(data, page, first_last="")


def _rejected(report: dict, purpose: str = PURPOSE) -> InvalidRequest:
    first = report["errors"][0] if report["errors"] else {"line": 0, "message": "no rows"}
    more = report["error_count"] - 1
    suffix = f" ({more} more error{'s' if more != 1 else ''}; first ones: " + "; ".join(
        f"line {e['line']}: {e['message']}" for e in report["errors"][1:5]) + ")" if more > 0 else ""
    what = "eval data" if purpose == datasets.EVALS else "training data"
    return InvalidRequest(f"Invalid {what}: line {first['line']}: {first['message']}{suffix}.",
                          param="file", code="invalid_file")


def _key(team_id: str, file_id: str) -> str:
    return f"files/{team_id}/{file_id}.jsonl"


def create_file(team_id: str, filename: str | None, purpose: str | None, data: bytes,
                expires_after: int | None = None) -> dict:
    check_purpose(purpose)
    if len(data) > settings().max_file_bytes:
        raise PayloadTooLarge("File too large.", param="file")
    report = datasets.validate([data], purpose)
    if not report["valid"]:
        raise _rejected(report, purpose)
    file_id = ids.new_id("file")
    aws.s3().put_object(Bucket=settings().datasets_bucket, Key=_key(team_id, file_id), Body=data,
                        ContentType="application/jsonl")
    return file_view(_save(team_id, file_id, filename or "data.jsonl", len(data), report, purpose, expires_after))


def _save(team_id: str, file_id: str, filename: str, size: int, report: dict, purpose: str,
          expires_after: int | None) -> File:
    now = ids.now()
    expiry = {"expires_at": now + expires_after, "expiring": "file"} if expires_after else {}
    record = File(team_id, file_id, filename=filename[:255], purpose=purpose, bytes=size, created_at=now,
                  status="processed", s3_key=_key(team_id, file_id), validation=report, **expiry)
    record.save(condition=File.file_id.does_not_exist())
    return record


def _keyable(file_id) -> bool:
    try:
        return isinstance(file_id, str) and 0 < len(file_id.encode()) <= pagination.MAX_ID_BYTES
    except UnicodeEncodeError:
        return False


def shown(file_id) -> str:
    """A caller's file id as an error message quotes it: bounded, and ASCII-escaped."""
    text = ascii(str(file_id))[1:-1]
    return "'" + (text[:100] + "..." if len(text) > 100 else text) + "'"


def get_file(team_id: str, file_id: str, purpose: str | None = None, param: str = "file_id") -> File:
    """The team's file; an expired one is gone. `purpose`: the use it must have been uploaded for
    (a training file is a fine-tune file, never eval rows)."""
    record = None
    if _keyable(file_id):       # an id no key can hold (too long, a lone surrogate) names no file: no lookup
        try:
            record = File.get(team_id, file_id, consistent_read=True)
        except DoesNotExist:
            pass
    if record is None or expired(record):
        # Another team's file, and an expired one, are indistinguishable from a missing one.
        raise NotFound(f"No such file: {shown(file_id)}.", param=param)
    if purpose is not None and record.purpose != purpose:
        raise InvalidRequest(f"File {shown(file_id)} was uploaded with purpose '{record.purpose}'; this needs a "
                             f"'{purpose}' file.", param=param, code="invalid_file_purpose")
    return record


def list_files(team_id: str, purpose: str | None, limit: int, after: str | None,
               order: str = "desc") -> dict:
    """One bounded query on the `by_created` index, in `order` of creation: `after` is a file id
    (its created_at, from one GetItem, positions the query) or an rft_next_cursor."""
    empty = _file_list([])
    if purpose is not None and purpose not in PURPOSES:
        return empty           # every stored file has one of PURPOSES (create and uploads check it)
    now = ids.now()
    # Expired files are gone (the sweep deletes them soon after): never listed.
    keep = File.expires_at.does_not_exist() | (File.expires_at > now)
    if purpose is not None:
        keep = keep & (File.purpose == purpose)
    start = None
    if pagination.is_cursor(after):
        start = pagination.decode_cursor(after, File, hash_value=team_id, index="by_created")
    elif after:
        if len(after.encode()) > 1024:   # longer than any id (and than a DynamoDB key may be)
            return empty
        try:
            anchor = dynamo.call(lambda: File.get(team_id, after), idempotent=True, what="file list")
        except DoesNotExist:
            return empty
        start = pagination.start_key(File, anchor, "by_created")
    page = pagination.query(File, team_id, index="by_created", limit=limit, start=start, filter_condition=keep,
                            newest_first=order != "asc", what="file list")
    return _file_list([file_view(f) for f in page.items], page)


def delete_file(team_id: str, file_id: str) -> dict:
    record = get_file(team_id, file_id)
    aws.s3().delete_object(Bucket=settings().datasets_bucket, Key=record.s3_key)
    record.delete()
    return {"id": file_id, "object": "file", "deleted": True}


def delete_expired(now: int | None = None, limit: int = EXPIRY_SWEEP_LIMIT) -> int:
    """The reconciler's sweep: deletes (S3 object, then the row) files whose expires_at has passed,
    at most `limit` a pass, oldest first; returns how many. Idempotent: a file deleted meanwhile
    (by its team or a concurrent pass) is skipped."""
    now = ids.now() if now is None else now
    due = dynamo.call(lambda: list(File.by_expiry.query("file", File.expires_at <= now, limit=limit)),
                      idempotent=True, what="expired files")
    deleted = 0
    for key in due:
        record = dynamo.get_or_none(File, key.team_id, key.file_id, what="expired file", consistent_read=True)
        if record is None or not expired(record, now):
            continue
        aws.s3().delete_object(Bucket=settings().datasets_bucket, Key=record.s3_key)
        try:
            record.delete(condition=File.expires_at == record.expires_at)
        except DeleteError as exc:
            if not dynamo.is_condition(exc):
                raise
            continue
        deleted += 1
    return deleted


def file_content(team_id: str, file_id: str, max_bytes: int = 5_000_000) -> bytes:
    record = get_file(team_id, file_id)
    if record.bytes > max_bytes:
        raise PayloadTooLarge(f"File is {record.bytes} bytes; content downloads are limited to "
                              f"{max_bytes} bytes through the API.", param="file_id")
    return aws.s3().get_object(Bucket=settings().datasets_bucket, Key=record.s3_key)["Body"].read()


def open_content(record: File) -> Iterator[bytes]:
    body = aws.s3().get_object(Bucket=settings().datasets_bucket, Key=record.s3_key)["Body"]
    yield from body.iter_chunks(1024 * 1024)


# ---- Uploads (large files in parts) ---------------------------------------------------------

def upload_view(u: Upload, file: dict | None = None) -> dict:
    view = {"id": u.upload_id, "object": "upload", "bytes": u.bytes, "created_at": u.created_at,
            "filename": u.filename, "purpose": u.purpose, "status": _upload_status(u),
            "expires_at": u.expires_at}
    if file is not None:
        view["file"] = file   # not required; left out (not null) until the upload has made one
    return view


def _upload_status(u: Upload) -> str:
    if u.status == "pending" and ids.now() >= u.expires_at:
        return "expired"
    return u.status


def create_upload(team_id: str, filename: str, purpose: str, size: int, mime_type: str,
                  expires_after: int | None = None) -> dict:
    check_purpose(purpose)
    if mime_type.split(";")[0].strip().lower() not in ACCEPTED_MIME_TYPES:
        raise InvalidRequest(f"mime_type {mime_type[:100]!r} is not accepted for {purpose} files; "
                             "use application/jsonl.", param="mime_type")
    if size > settings().max_file_bytes:
        raise PayloadTooLarge(f"bytes must be at most {settings().max_file_bytes}.", param="bytes")
    now = ids.now()
    record = Upload(team_id, ids.new_id("upload"), filename=filename[:255], purpose=purpose, bytes=size,
                    mime_type=mime_type, created_at=now, expires_at=now + UPLOAD_TTL_SECONDS,
                    status="pending", file_expires_after=expires_after)
    record.save(condition=Upload.upload_id.does_not_exist())
    return upload_view(record)


def get_upload(team_id: str, upload_id: str) -> Upload:
    try:
        return Upload.get(team_id, upload_id, consistent_read=True)
    except DoesNotExist:
        raise NotFound(f"No such upload: '{upload_id}'.", param="upload_id") from None


def _pending(team_id: str, upload_id: str) -> Upload:
    record = get_upload(team_id, upload_id)
    status = _upload_status(record)
    if status != "pending":
        raise Conflict(f"Upload '{upload_id}' is {status}; parts can only be added to a pending upload.",
                       param="upload_id")
    return record


def _part_key(team_id: str, upload_id: str, part_id: str) -> str:
    return f"uploads/{team_id}/{upload_id}/{part_id}"


def add_part(team_id: str, upload_id: str, data: bytes) -> dict:
    _pending(team_id, upload_id)
    if not data:
        raise InvalidRequest("The part is empty.", param="data")
    if len(data) > settings().max_upload_part_bytes:
        raise PayloadTooLarge(f"A part may be at most {settings().max_upload_part_bytes} bytes "
                              "(a Lambda request body is capped near 6 MB); pass a smaller part_size.",
                              param="data")
    part_id = ids.new_id("part")
    aws.s3().put_object(Bucket=settings().datasets_bucket, Key=_part_key(team_id, upload_id, part_id),
                        Body=data)
    return {"id": part_id, "object": "upload.part", "created_at": ids.now(), "upload_id": upload_id}


def _stream_parts(team_id: str, upload_id: str, part_ids: list[str]) -> Iterator[bytes]:
    for part_id in part_ids:
        obj = aws.s3().get_object(Bucket=settings().datasets_bucket,
                                  Key=_part_key(team_id, upload_id, part_id))
        yield from obj["Body"].iter_chunks(1024 * 1024)


def complete_upload(team_id: str, upload_id: str, part_ids: list[str], md5: str | None) -> dict:
    upload = _pending(team_id, upload_id)
    if not part_ids:
        raise InvalidRequest("part_ids must list the parts in order.", param="part_ids")
    if len(set(part_ids)) != len(part_ids):
        raise InvalidRequest("part_ids lists a part twice.", param="part_ids")
    s3, bucket = aws.s3(), settings().datasets_bucket
    total = 0
    for part_id in part_ids:
        try:
            total += s3.head_object(Bucket=bucket, Key=_part_key(team_id, upload_id, part_id))["ContentLength"]
        except s3.exceptions.ClientError:
            raise InvalidRequest(f"Unknown part '{part_id}' for upload '{upload_id}'.",
                                 param="part_ids") from None
    if total != upload.bytes:
        raise InvalidRequest(f"The parts hold {total} bytes but the upload was created with "
                             f"bytes={upload.bytes}.", param="part_ids")

    # One pass over the parts: copy into the final object, hash, and validate.
    file_id = ids.new_id("file")
    key = _key(team_id, file_id)
    digest = hashlib.md5(usedforsecurity=False)
    validator = datasets.DatasetValidator(purpose=upload.purpose)
    mpu = s3.create_multipart_upload(Bucket=bucket, Key=key, ContentType="application/jsonl")
    etags, buffer = [], io.BytesIO()

    def copied(chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            digest.update(chunk)
            buffer.write(chunk)
            if buffer.tell() >= _S3_PART:
                etags.append(_put_part(s3, bucket, key, mpu["UploadId"], len(etags) + 1, buffer))
            yield chunk

    try:
        for line in datasets.iter_lines(copied(_stream_parts(team_id, upload_id, part_ids))):
            validator.feed(line)
        if buffer.tell() or not etags:
            etags.append(_put_part(s3, bucket, key, mpu["UploadId"], len(etags) + 1, buffer))
        report = validator.report()
        if md5 and md5.lower() != digest.hexdigest():
            raise InvalidRequest("md5 does not match the uploaded bytes.", param="md5")
        if not report["valid"]:
            raise _rejected(report, upload.purpose)
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=mpu["UploadId"],
                                     MultipartUpload={"Parts": etags})
    except BaseException:
        s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=mpu["UploadId"])
        raise
    expires_after = int(upload.file_expires_after) if upload.file_expires_after else None
    record = _save(team_id, file_id, upload.filename, total, report, upload.purpose, expires_after)
    try:
        upload.update(actions=[Upload.status.set("completed"), Upload.file_id.set(file_id)],
                      condition=Upload.status == "pending")
    except UpdateError:
        # A concurrent complete won; keep its file, drop ours.
        s3.delete_object(Bucket=bucket, Key=key)
        record.delete()
        raise Conflict(f"Upload '{upload_id}' was completed or cancelled concurrently.") from None
    _delete_parts(team_id, upload_id)
    return upload_view(upload, file_view(record))


def _put_part(s3, bucket: str, key: str, upload_id: str, number: int, buffer: io.BytesIO) -> dict:
    data = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    etag = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data)["ETag"]
    return {"ETag": etag, "PartNumber": number}


def cancel_upload(team_id: str, upload_id: str) -> dict:
    upload = _pending(team_id, upload_id)
    try:
        upload.update(actions=[Upload.status.set("cancelled")], condition=Upload.status == "pending")
    except UpdateError:
        raise Conflict(f"Upload '{upload_id}' is no longer pending.") from None
    _delete_parts(team_id, upload_id)
    return upload_view(upload)


def _delete_parts(team_id: str, upload_id: str) -> None:
    s3, bucket = aws.s3(), settings().datasets_bucket
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=f"uploads/{team_id}/{upload_id}/"):
        objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objects:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
