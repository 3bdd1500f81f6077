"""One mapping from what can go wrong to OpenAI's error body ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging
from typing import Optional

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from k2ray.runtime.sampling import ParamError
from k2ray.serve.wire import GenerateError

log = logging.getLogger("k2ray.serve.errors")


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unavailable(message: str, code: str = "model_unavailable") -> APIError:
    return APIError(503, message, "service_unavailable", None, code)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "list[str]", "list[int]"}


def _loc(loc: tuple) -> str:
    """``('tools', 0, 'function', 'name')`` -> ``tools[0].function.name`` (pydantic's union-member tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in _TYPE_TAGS or not part.isidentifier() or not part.islower()):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def from_validation(e: ValidationError) -> APIError:
    """A request body that does not fit its model: 400 naming the field."""
    first = e.errors(include_url=False)[0]
    if first.get("type") == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first.get('msg', '')}", None, "invalid_json")
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ParamError):  # a request model's own rule, naming the parameter
        return bad_request(str(cause), cause.param)
    loc = _loc(tuple(first.get("loc", ())))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if loc:
        return bad_request(f"{loc}: {msg}", loc)
    if first.get("type") == "model_type":
        return bad_request("request body must be a JSON object", None, "invalid_json")
    return bad_request(msg)


def from_generate_error(e: GenerateError) -> APIError:
    return APIError(e.status, e.message, e.type, e.param, e.code)


def from_exception(e: BaseException) -> APIError:
    """Anything an endpoint raised: a known failure gets its status; the rest is logged and answered 500 without
    details (never a traceback or an actor's repr on the wire)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(e, APIError):
        return e
    if isinstance(e, ParamError):
        return bad_request(str(e), e.param)
    if isinstance(e, ValidationError):
        return from_validation(e)
    if isinstance(e, BackPressureError):
        return unavailable("server overloaded: too many requests queued; retry later", "overloaded")
    if isinstance(e, DeploymentUnavailableError):
        return unavailable("the model is not available right now; retry shortly")
    if isinstance(e, RayActorError):
        return unavailable("the model group serving this request died; retry shortly", "model_group_failed")
    log.error("unexpected error", exc_info=(type(e), e, e.__traceback__))
    return APIError(500, "internal server error", "internal_error", None, "internal_error")
