"""FastAPI dependencies every API route shares: the API-key check and the size-limited, strictly validated JSON body.
The server's settings come from ``app.state`` (``api_keys``: bytes, ``max_request_bytes``), set when the app is built.
"""

from __future__ import annotations

import hmac
from typing import Callable, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from k2ray.serve.openai.errors import APIError, bad_request, from_validation

M = TypeVar("M", bound=BaseModel)


async def require_api_key(request: Request) -> None:
    """``Authorization: Bearer <key>`` (or ``x-api-key``) must be one of the server's keys, when it has any."""
    keys: list[bytes] = request.app.state.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not key or not any(hmac.compare_digest(key.encode(), k) for k in keys):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>' or 'x-api-key: <key>')",
                       "authentication_error", None, "invalid_api_key")


def json_body(model_cls: type[M]) -> Callable:
    """A dependency that reads the body (413 past ``max_request_bytes``, counted as it arrives) into ``model_cls``
    (strict: a string where a number belongs is a 400, not a silent conversion)."""

    async def read(request: Request) -> M:
        limit: int = request.app.state.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                           "invalid_request_error", None, "request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", "invalid_request_error",
                               None, "request_too_large")
        if not body:
            raise bad_request("request body is empty; expected a JSON object", None, "invalid_json")
        try:
            return model_cls.model_validate_json(bytes(body), strict=True)
        except ValidationError as e:
            raise from_validation(e) from None

    return read
