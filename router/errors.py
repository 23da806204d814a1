"""The router's errors, each knowing its gRPC status, HTTP status and OpenAI error body.

Both front doors raise these and map them the same way, so a bad request looks alike over
gRPC and HTTP: INVALID_ARGUMENT / 400, UNAUTHENTICATED / 401 (no or a wrong API key),
NOT_FOUND / 404 (unknown model), 408 (body too slow), 413 (body too large), 415 (not JSON),
RESOURCE_EXHAUSTED / 429 (overload), UNAVAILABLE / 503 (no worker, draining).
"""

from __future__ import annotations

import reprlib
from typing import Any, ClassVar

import grpc

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 80, 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def show(value: object) -> str:
    """A short, safe repr of an untrusted value for an error message: bounded in length and
    depth whatever the value (a megabyte string, JSON nested a thousand deep)."""
    try:
        return _SHORT.repr(value)
    except Exception:  # e.g. an int past Python's digit limit
        return f"<{type(value).__name__}>"


class RouterError(Exception):
    """Base: a one-line message safe to show the caller."""

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    http_status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param

    def openai_body(self) -> dict[str, Any]:
        """OpenAI's error JSON: `{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class RequestValidationError(RouterError):
    """The request can't be served as given; `code` is OpenAI's machine-readable reason."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    error_type = "invalid_request_error"

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message, code=code, param=param)


class AuthenticationError(RouterError):
    """No API key, or not one of the configured ones: 401 / UNAUTHENTICATED."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    error_type = "invalid_request_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key")


class ModelNotFoundError(RequestValidationError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404

    def __init__(self, model: str, served: str) -> None:
        super().__init__(
            "model_not_found",
            f"the model {show(model)} does not exist; this server serves {served!r}",
            "model",
        )


class RequestTooLargeError(RequestValidationError):
    http_status = 413

    def __init__(self, size: int | None, limit: int) -> None:
        size_text = f" ({size} bytes)" if size is not None else ""
        message = f"the request body{size_text} exceeds the limit of {limit} bytes"
        super().__init__("request_too_large", message, None)


class UnsupportedMediaTypeError(RequestValidationError):
    http_status = 415

    def __init__(self, content_type: str) -> None:
        super().__init__(
            "unsupported_media_type",
            f"the body must be JSON (Content-Type: application/json); got {show(content_type)}",
        )


class RequestTimeoutError(RequestValidationError):
    """The client didn't send its request body in time."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 408

    def __init__(self, timeout_s: float) -> None:
        super().__init__("request_timeout", f"the request body didn't arrive within {timeout_s}s")


class OverloadedError(RouterError):
    """Too many requests in flight: fail fast rather than queue without bound."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="server_overloaded")


class UnavailableError(RouterError):
    """No healthy worker can take the request, or the router is draining."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    error_type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="service_unavailable")


class UpstreamError(RouterError):
    """A worker failed the request; carries the worker's status over to the caller."""

    _HTTP: ClassVar[dict[grpc.StatusCode, int]] = {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.CANCELLED: 499,
    }

    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(message, code=status.name.lower())
        self.status = status

    @property  # type: ignore[override]
    def grpc_code(self) -> grpc.StatusCode:
        return self.status

    @property  # type: ignore[override]
    def http_status(self) -> int:
        return self._HTTP.get(self.status, 502)

    @property  # type: ignore[override]
    def error_type(self) -> str:
        client_side = self.status == grpc.StatusCode.INVALID_ARGUMENT
        return "invalid_request_error" if client_side else "server_error"


def upstream_error(err: grpc.aio.AioRpcError, worker: str) -> UpstreamError:
    return UpstreamError(err.code(), f"worker {worker}: {err.details() or err.code().name}")
