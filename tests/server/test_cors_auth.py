"""CORS headers as configured (none unless origins are set) and API keys from a file."""

from __future__ import annotations

from pathlib import Path

from mlctrio.cli import build_parser, config_from_args

from .conftest import ServerHandle

SDK_HEADERS = "authorization, content-type, x-stainless-os, x-stainless-retry-count"


def _preflight(handle: ServerHandle, origin: str):  # type: ignore[no-untyped-def]
    with handle.client() as http:
        return http.options(
            "/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": SDK_HEADERS,
            },
        )


def test_preflight_allows_the_sdk_headers(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(allow_origins=("http://app.example",), api_keys=("k",))
    response = _preflight(handle, "http://app.example")
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "http://app.example"
    allowed = {
        h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")
    }
    assert {"authorization", "content-type", "x-stainless-os", "x-stainless-retry-count"} <= allowed
    assert "POST" in response.headers["access-control-allow-methods"]
    # A real request from the allowed origin carries the header; one from elsewhere does not.
    with handle.client() as http:
        ok = http.get(
            "/v1/models", headers={"Origin": "http://app.example", "Authorization": "Bearer k"}
        )
        assert ok.headers["access-control-allow-origin"] == "http://app.example"
        other = http.get(
            "/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer k"}
        )
        assert "access-control-allow-origin" not in other.headers
    assert _preflight(handle, "http://evil.example").status_code == 403


def test_no_cors_headers_unless_configured(server: ServerHandle) -> None:
    response = _preflight(server, "http://app.example")
    assert "access-control-allow-origin" not in response.headers
    with server.client() as http:
        plain = http.get("/v1/models", headers={"Origin": "http://app.example"})
    assert "access-control-allow-origin" not in plain.headers


def test_wildcard_origin_with_credentials_echoes_the_origin(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle = server_factory(allow_origins=("*",), allow_credentials=True)
    response = _preflight(handle, "http://any.example")
    assert response.headers["access-control-allow-origin"] == "http://any.example"
    assert response.headers["access-control-allow-credentials"] == "true"


def test_api_key_file(tmp_path: Path, server_factory) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys"
    keys.write_text("first\n\n  second  \n")
    config = config_from_args(
        build_parser().parse_args(["serve", "--api-key-file", str(keys), "--api-key", "third"])
    )
    assert config.api_keys == ("third", "first", "second")
    handle = server_factory(api_keys=config.api_keys)
    with handle.client() as http:
        for key in ("first", "second", "third"):
            assert (
                http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code
                == 200
            )
        assert http.get("/v1/models", headers={"Authorization": "Bearer fourth"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "first"}).status_code == 401
