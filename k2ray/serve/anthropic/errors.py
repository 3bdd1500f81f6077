"""Anthropic's error shape ``{"type": "error", "error": {"type", "message"}}`` for every failure on the Messages
paths. The failures themselves are the server's one mapping (:class:`~k2ray.serve.openai.errors.APIError`, from
:func:`~k2ray.serve.openai.errors.from_exception`); only the rendering differs: the error type follows from the
status, and a 503 (overloaded, model group failed or starting) is answered as Anthropic's 529 ``overloaded_error``,
the status Anthropic's clients retry as "overloaded"."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from k2ray.serve.openai.errors import APIError

MESSAGES_PATH = "/v1/messages"
OVERLOADED = 529

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    OVERLOADED: "overloaded_error",
}


def is_messages_path(path: str) -> bool:
    """``/v1/messages`` and everything under it answer Anthropic's shape."""
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


def status(err: APIError) -> int:
    return OVERLOADED if err.status == 503 else err.status


def body(err: APIError) -> dict:
    code = status(err)
    default = "api_error" if code >= 500 else "invalid_request_error"
    return {"type": "error", "error": {"type": ERROR_TYPES.get(code, default), "message": err.message}}


def response(err: APIError) -> JSONResponse:
    code = status(err)
    headers = {"Retry-After": "1"} if code in (429, OVERLOADED) else None
    return JSONResponse(body(err), status_code=code, headers=headers)


def response_for_path(path: str, err: APIError) -> JSONResponse:
    """The error in the shape of the API ``path`` belongs to (Anthropic's for the Messages paths, else OpenAI's)."""
    return response(err) if is_messages_path(path) else err.response()
