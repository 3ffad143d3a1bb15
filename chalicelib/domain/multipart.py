"""multipart/form-data parsing for bodies already in memory (Lambda caps them near 6 MB)."""
from __future__ import annotations

from dataclasses import dataclass
from email import policy
from email.parser import BytesParser

from chalicelib.errors import InvalidRequest, UnsupportedMediaType


@dataclass
class Part:
    name: str
    filename: str | None
    data: bytes


def parse(content_type: str, body: bytes) -> dict[str, Part]:
    if not content_type.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType("Expected a multipart/form-data body.")
    if "boundary=" not in content_type:
        raise InvalidRequest("multipart/form-data body without a boundary.")
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = BytesParser(policy=policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        raise InvalidRequest("Malformed multipart/form-data body.")
    parts: dict[str, Part] = {}
    for item in message.iter_parts():
        name = item.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = item.get_payload(decode=True) or b""
        parts[name] = Part(name=name, filename=item.get_filename(), data=payload)
    return parts
