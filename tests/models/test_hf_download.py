"""`HF://org/name` is downloaded with huggingface_hub when it is not cached, from a local stand-in
for the Hub: a loopback HTTP server answering the routes snapshot_download uses (repo info, tree
listing, HEAD and GET of /{repo}/resolve/{commit}/{file}). HF_ENDPOINT points at it, HF_HUB_CACHE
at tmp; every request is recorded, so "no network" is observed, not assumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import attrs
import numpy as np
import pytest

from mlctrio.errors import ModelLoadError
from mlctrio.models.formats import read_safetensors, write_safetensors
from mlctrio.models.hub import resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@attrs.define
class FakeHub:
    url: str
    repos: dict[str, dict[str, bytes]]
    requests: list[tuple[str, str, str | None]]  # (method, path, Authorization)

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _ in self.requests if method is None or m == method]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _send(self, code: int, data: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(code)
            for key, value in {"Content-Length": str(len(data)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _json(self, value: object, body: bool) -> None:
            data = json.dumps(value).encode()
            self._send(200, data, {"Content-Type": "application/json"}, body)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Authorization")))
            for repo, files in hub.repos.items():
                if path.startswith(f"/api/models/{repo}/revision/"):
                    siblings = [{"rfilename": name} for name in files]
                    return self._json({"id": repo, "sha": COMMIT, "siblings": siblings}, body)
                if path == f"/api/models/{repo}/tree/{COMMIT}":
                    tree = [
                        {"type": "file", "path": name, "size": len(data), "oid": _oid(data)}
                        for name, data in files.items()
                    ]
                    return self._json(tree, body)
                prefix = f"/{repo}/resolve/{COMMIT}/"
                if path.startswith(prefix) and path[len(prefix) :] in files:
                    data = files[path[len(prefix) :]]
                    headers = {"ETag": f'"{_oid(data)}"', "X-Repo-Commit": COMMIT}
                    return self._send(200, data, headers, body)
            error = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
            self._send(404, b'{"error": "Repository not found"}', error, body)

    return Handler


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _checkpoint(tmp_path: Path) -> dict[str, bytes]:
    weights = tmp_path / "model.safetensors"
    write_safetensors(weights, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    return {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 3}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b"{}",
        "model.safetensors": weights.read_bytes(),
        "pytorch_model.bin": b"not wanted",
        "model.Q4_0.gguf": b"GGUF not wanted when there are safetensors",
        "README.md": b"# tiny",
    }


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    fake = FakeHub(f"http://127.0.0.1:{server.server_port}", {}, [])
    server.RequestHandlerClass = _handler(fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def test_downloads_only_what_a_model_needs_then_works_offline(
    hub: FakeHub,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub.repos["org/tiny"] = _checkpoint(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with caplog.at_level(logging.INFO, logger="mlctrio.models.hub"):
        folder = resolve_model_path("HF://org/tiny")
    messages = [r.getMessage() for r in caplog.records if r.name == "mlctrio.models.hub"]
    assert messages[0].startswith(f"downloading HF://org/tiny from {hub.url}: 4 files")
    assert any(
        m.startswith("downloading HF://org/tiny: ") and m.endswith("(100%)") for m in messages
    )
    assert folder.is_relative_to(tmp_path / "hub-cache")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert read_safetensors(folder)["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    downloaded = {p.rsplit("/", 1)[-1] for p in hub.paths("GET") if "/resolve/" in p}
    assert downloaded == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    repo_requests = [r for r in hub.requests if "org/tiny" in r[1]]
    assert repo_requests and all(auth == "Bearer hf_test_token" for _, _, auth in repo_requests)

    seen = len(hub.requests)
    assert resolve_model_path("HF://org/tiny") == folder  # cached: no request at all
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("HF://org/tiny") == folder
    assert len(hub.requests) == seen


def test_a_gguf_is_downloaded_when_there_is_no_other_weight(hub: FakeHub) -> None:
    hub.repos["org/quantized"] = {
        "config.json": b"{}",
        "model.Q4_1.gguf": b"GGUF\x03\x00\x00\x00 fake",
        "notes.md": b"no",
    }
    folder = resolve_model_path("HF://org/quantized")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.Q4_1.gguf"]


def test_several_ggufs_ask_the_user_to_choose(hub: FakeHub) -> None:
    hub.repos["org/many"] = {"a.Q4_0.gguf": b"a", "b.Q8_0.gguf": b"b"}
    with pytest.raises(ModelLoadError, match=r"2 GGUF files \(a.Q4_0.gguf, b.Q8_0.gguf\)"):
        resolve_model_path("HF://org/many")
    assert not hub.paths("GET") or all("/resolve/" not in p for p in hub.paths("GET"))


def test_unknown_repository_is_one_clear_line(hub: FakeHub) -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path("HF://org/missing")
    message = str(info.value)
    assert message.startswith(f"cannot download HF://org/missing from {hub.url}: ")
    assert "\n" not in message


def test_offline_with_an_empty_cache_is_a_clear_error(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.repos["org/tiny"] = _checkpoint(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        resolve_model_path("HF://org/tiny")
    message = str(info.value)
    assert "HF://org/tiny is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "huggingface-cli download org/tiny" in message
    assert hub.requests == []
