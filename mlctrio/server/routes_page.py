"""The chat page at `/`: one static file (static/chat.html), off with `--disable-chat-page`.

Rules:
- The page is a file shipped in the package (pyproject's package-data), read once per process; no
  template, no build step, nothing fetched from elsewhere.
- Its Content-Security-Policy allows exactly the page's one inline <style> and one inline
  <script> (by sha256, computed here from the file), requests to this origin only, and nothing
  else: no other script, no handler attribute, no frame, no form target, no plugin.
- The route is open (server/app.py's OPEN_ROUTES): a browser cannot send an API key with a page
  load, and the page holds no secret; the page itself sends the key the user types with every API
  call (`Authorization: Bearer`).
"""

from __future__ import annotations

import base64
import functools
import hashlib
from html.parser import HTMLParser
from importlib import resources

from quart import Response
from quart_trio import QuartTrio

from .state import EXTENSION, ServerState

PAGE_PATH = "/"


class _InlineCode(HTMLParser):
    """The text of each <script> and <style> element, as the browser hashes it (comments and
    other text that merely mentions the tags are not elements)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.found: dict[str, list[str]] = {"script": [], "style": []}
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.found:
            self._open = tag
            self.found[tag].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._open:
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self.found[self._open][-1] += data


@functools.cache
def page() -> tuple[bytes, str]:
    """The page's bytes and its Content-Security-Policy."""
    html = (resources.files("mlctrio.server") / "static" / "chat.html").read_text(encoding="utf-8")
    parser = _InlineCode()
    parser.feed(html)
    parser.close()
    hashes: dict[str, str] = {}
    for tag, bodies in parser.found.items():
        if len(bodies) != 1:
            raise RuntimeError(f"static/chat.html must hold exactly one <{tag}> element")
        digest = base64.b64encode(hashlib.sha256(bodies[0].encode()).digest()).decode()
        hashes[tag] = f"'sha256-{digest}'"
    csp = "; ".join(
        (
            "default-src 'none'",
            f"script-src {hashes['script']}",
            f"style-src {hashes['style']}",
            "connect-src 'self'",
            "img-src data:",  # the empty favicon (no /favicon.ico request)
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    return html.encode(), csp


async def chat_page() -> Response:
    body, csp = page()
    response = Response(body, content_type="text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = csp
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"
    return response


def register_chat_page(app: QuartTrio) -> None:
    """Serve the page at / unless the server was started with --disable-chat-page."""
    state: ServerState = app.extensions[EXTENSION]
    if not state.config.disable_chat_page:
        app.add_url_rule(PAGE_PATH, view_func=chat_page, methods=["GET"])
