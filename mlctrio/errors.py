"""The one exception tree of mlctrio.

    MlctrioError
    ├── ConfigError              bad command line, overrides or environment (fails at start)
    ├── ModelLoadError           a model directory / library that cannot be loaded
    ├── EngineError              an internal engine failure (the only source of a 500)
    └── RequestError             anything a client did; carries the OpenAI error fields
        ├── InvalidRequestError          400 invalid_request_error
        │   └── ContextLengthExceededError   400, code context_length_exceeded
        ├── AuthenticationError          401 invalid_api_key
        ├── NotFoundError                404 (ModelNotFoundError: code model_not_found)
        ├── PayloadTooLargeError         413
        ├── ServiceUnavailableError      503 (QueueFullError: with Retry-After)
        ├── RequestTimeoutError          504
        └── EngineFailedError            500 server_error: the engine failed this request

server/errors.py maps RequestError (and only it) to the envelope
`{"error": {"message", "type", "param", "code"}}`; anything else is logged and becomes a 500 with
no details.
"""

from __future__ import annotations


class MlctrioError(Exception):
    """Base of every exception mlctrio raises on purpose."""


class ConfigError(MlctrioError):
    """A configuration that cannot work: reported at start, before serving."""


class ModelLoadError(MlctrioError):
    """A model directory, artifact or library that cannot be loaded."""


class EngineError(MlctrioError):
    """The engine failed (not the client's fault)."""


class RequestError(MlctrioError):
    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(RequestError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationError(RequestError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFoundError(RequestError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLargeError(RequestError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ServiceUnavailableError(RequestError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class QueueFullError(ServiceUnavailableError):
    code = "queue_full"


class RequestTimeoutError(RequestError):
    status = 504
    type = "timeout_error"
    code = "request_timeout"


class EngineFailedError(RequestError):
    """The engine failed a request (reported to that client; the server lives on)."""

    status = 500
    type = "server_error"
    code = "engine_error"
