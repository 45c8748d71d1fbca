"""The one place where exceptions become HTTP error responses (the OpenAI error envelope)."""

from __future__ import annotations

import logging

from quart import Response
from werkzeug.exceptions import HTTPException

from ..errors import (
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
)
from .sse import dumps

log = logging.getLogger("mlctrio.server")


def error_response(exc: RequestError) -> Response:
    response = Response(dumps(exc.to_dict()), status=exc.status, content_type="application/json")
    for key, value in exc.headers.items():
        response.headers[key] = value
    return response


def from_http_exception(exc: HTTPException) -> RequestError:
    """Map werkzeug/quart's own errors (404 route, 405, 413, bad JSON) to our tree."""
    code = exc.code or 500
    if code == 413:
        return PayloadTooLargeError("Request body is too large.")
    if code == 404:
        return NotFoundError("Not found: no such route.", code="not_found")
    if code == 405:
        err = InvalidRequestError("Method not allowed for this route.", code="method_not_allowed")
        err.status = 405
        return err
    if 400 <= code < 500:
        err = InvalidRequestError(exc.description or "Bad request.")
        err.status = code
        return err
    return RequestError("Internal server error.")


def internal_error(exc: BaseException) -> Response:
    """A bug of ours: log it, tell the client nothing about internals."""
    log.error("internal error", exc_info=exc)
    body = {
        "error": {
            "message": "Internal server error.",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    return Response(dumps(body), status=500, content_type="application/json")
