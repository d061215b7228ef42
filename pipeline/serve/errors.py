"""The service's errors: every error answer is the JSON ``{"error": str, "status": int}``
of :func:`error_body`, with ``status`` the HTTP status.

:class:`ApiError` carries a status; :func:`handle_error` is the one exception handler
(:func:`install_error_handler` registers it on the FastAPI app) that answers for it,
for Starlette / FastAPI errors (404, 405, 413 from the upload limit, 422 form
validation) and, as 500, for anything else. The model deployments return
:func:`failure` values instead of raising, so a bad request never takes a replica down.
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.errors import first_line as one_line

log = logging.getLogger("roicodec.serve")


class ApiError(Exception):
    """An error with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = int(status), message


def error_body(status: int, message: str) -> dict[str, Any]:
    """The body of every error answer."""
    return {"error": str(message), "status": int(status)}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), int(status), headers=headers)


def failure(status: int, message: str) -> dict[str, Any]:
    """A model deployment's error value (the ingress raises it as an :class:`ApiError`)."""
    return {"ok": False, **error_body(status, message)}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        msg = err.get("msg", "invalid")
        parts.append(f"{loc}: {msg}" if loc else str(msg))
    return "; ".join(parts) or "invalid request"


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """Any exception of a request -> its :func:`error_response`."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.message)
    if isinstance(exc, RequestValidationError):
        return error_response(422, _validation_message(exc))
    if isinstance(exc, StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))
    log.error("unhandled error on %s: %s", request.url.path, exc, exc_info=exc)
    return error_response(500, f"internal error: {one_line(exc)}")


def install_error_handler(app: FastAPI) -> None:
    """Register :func:`handle_error` for every exception (FastAPI's own 404/405/422 included)."""
    for kind in (ApiError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle_error)
