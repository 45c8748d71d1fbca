"""A page on another origin streams a chat completion through fetch() in headless Chromium.

Chromium comes from Debian (`scripts/install-browser`, part of the README's test command). The
page reports what it got by POSTing it back to the little server that served it.
"""

from __future__ import annotations

import http.server
import json
import queue
import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest

from .conftest import ServerHandle

PAGE = """<!doctype html><html><body><script>
const report = (result) => fetch("/result", {method: "POST", body: JSON.stringify(result)});
(async () => {
  try {
    const response = await fetch("%(api)s/v1/chat/completions", {
      method: "POST",
      headers: {"Content-Type": "application/json", "Authorization": "Bearer sk-browser",
                "X-Stainless-Lang": "js"},
      body: JSON.stringify({model: "mock://echo", stream: true,
                            messages: [{role: "user", content: "from the browser ✓"}]}),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let raw = "", chunks = 0;
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      chunks += 1;
      raw += decoder.decode(value, {stream: true});
    }
    let content = "";
    for (const line of raw.split("\\n\\n")) {
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const event = JSON.parse(line.slice(6));
      for (const c of event.choices) content += c.delta.content || "";
    }
    const done = raw.endsWith("data: [DONE]\\n\\n");
    await report({ok: true, status: response.status, content, done});
  } catch (e) {
    await report({ok: false, error: String(e)});
  }
})();
</script></body></html>"""


class _PageServer:
    """Serves the page (on its own origin) and collects what the page reports."""

    def __init__(self) -> None:
        self.api_url = ""
        self.results: queue.Queue[dict] = queue.Queue()  # type: ignore[type-arg]
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = (PAGE % {"api": outer.api_url}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                outer.results.put(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: run scripts/install-browser (README test command)")
    return path


def _run_page(page: _PageServer, tmp_path) -> dict:  # type: ignore[no-untyped-def, type-arg]
    proc = subprocess.Popen(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path}",
            page.origin + "/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return page.results.get(timeout=90)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def page() -> Iterator[_PageServer]:
    server = _PageServer()
    yield server
    server.close()


def test_cross_origin_stream_allowed_with_cors(server_factory, tmp_path, page) -> None:  # type: ignore[no-untyped-def]
    handle: ServerHandle = server_factory(allow_origins=(page.origin,), api_keys=("sk-browser",))
    page.api_url = handle.url
    result = _run_page(page, tmp_path)
    assert result == {
        "ok": True,
        "status": 200,
        "content": "from the browser ✓",
        "done": True,
    }


def test_cross_origin_refused_without_cors(server_factory, tmp_path, page) -> None:  # type: ignore[no-untyped-def]
    handle: ServerHandle = server_factory(api_keys=("sk-browser",))
    page.api_url = handle.url
    result = _run_page(page, tmp_path)
    assert result["ok"] is False
    assert "Failed to fetch" in result["error"]
    handle.wait_quiescent()


def test_cross_origin_refused_for_another_origin(server_factory, tmp_path, page) -> None:  # type: ignore[no-untyped-def]
    handle: ServerHandle = server_factory(
        allow_origins=("http://elsewhere.example",), api_keys=("sk-browser",)
    )
    page.api_url = handle.url
    result = _run_page(page, tmp_path)
    assert result["ok"] is False
    handle.wait_quiescent()
