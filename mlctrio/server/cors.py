"""CORS, off unless origins are configured (--allow-origins)."""

from __future__ import annotations

from quart import Response, request

from ..config import ServerConfig

# What the OpenAI SDK sends from a browser besides the usual headers.
_SDK_HEADERS = (
    "Authorization, Content-Type, OpenAI-Organization, OpenAI-Project, OpenAI-Beta, "
    "X-Stainless-Lang, X-Stainless-Package-Version, X-Stainless-OS, X-Stainless-Arch, "
    "X-Stainless-Runtime, X-Stainless-Runtime-Version, X-Stainless-Retry-Count, "
    "X-Stainless-Timeout, X-Stainless-Async, X-Stainless-Helper-Method, X-Stainless-Raw-Response"
)


def _allowed_origin(config: ServerConfig, origin: str | None) -> str | None:
    if not origin or not config.allow_origins:
        return None
    if "*" in config.allow_origins:
        return origin if config.allow_credentials else "*"
    return origin if origin in config.allow_origins else None


def preflight(config: ServerConfig) -> Response | None:
    """Answer a CORS preflight, or None when the request is not one we answer."""
    if (
        not config.allow_origins
        or request.method != "OPTIONS"
        or "Access-Control-Request-Method" not in request.headers
    ):
        return None
    origin = _allowed_origin(config, request.headers.get("Origin"))
    if origin is None:
        return Response("", status=403)
    response = Response("", status=204)
    methods = config.allow_methods
    response.headers["Access-Control-Allow-Methods"] = (
        "GET, POST, OPTIONS" if "*" in methods else ", ".join(methods)
    )
    requested = request.headers.get("Access-Control-Request-Headers", "")
    if "*" in config.allow_headers:
        allowed = f"{_SDK_HEADERS}, {requested}" if requested else _SDK_HEADERS
    else:
        allowed = ", ".join(config.allow_headers)
    response.headers["Access-Control-Allow-Headers"] = allowed
    response.headers["Access-Control-Max-Age"] = "600"
    return response


def decorate(config: ServerConfig, response: Response) -> None:
    origin = _allowed_origin(config, request.headers.get("Origin"))
    if origin is None:
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    if origin != "*":
        response.headers["Vary"] = "Origin"
    if config.allow_credentials:
        response.headers["Access-Control-Allow-Credentials"] = "true"
