"""The base of every request body model of the Chalice routes (api/http.py `route(body=...)`)."""
from __future__ import annotations

import pydantic


class StrictModel(pydantic.BaseModel):
    """Request bodies: unknown fields are an error, never silently dropped."""
    model_config = pydantic.ConfigDict(extra="forbid", strict=False, defer_build=True)
