"""The chat page at /: served with its Content-Security-Policy, off with --disable-chat-page, and
used in headless Chromium as a person would (pick a model, type, watch tokens stream, press Stop).

The browser tests drive Debian's Chromium (scripts/install-browser, as test_browser.py does) over
the DevTools protocol (tests/server/devtools.py). They wait on conditions (the page's DOM, the
server's metrics and KV pages), never for fixed times.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlctrio.app import config_from_env
from mlctrio.cli import build_parser, config_from_args

from .conftest import ServerHandle, metric_total
from .devtools import Browser

API_KEY = "sk-page"


# ---- without a browser -----------------------------------------------------------------------


def test_page_is_served_with_a_csp_that_allows_only_its_own_code(server: ServerHandle) -> None:
    with server.client() as http:
        response = http.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["x-content-type-options"] == "nosniff"
    html = response.text
    assert '<select id="model"' in html and '<button id="stop"' in html
    directives = response.headers["content-security-policy"].split(";")
    csp = dict(part.strip().partition(" ")[::2] for part in directives)
    assert csp["default-src"] == "'none'"
    assert csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'"
    for tag in ("script", "style"):
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
        assert len(bodies) == 1
        digest = base64.b64encode(hashlib.sha256(bodies[0].encode()).digest()).decode()
        assert csp[f"{tag}-src"] == f"'sha256-{digest}'"
    assert "unsafe" not in response.headers["content-security-policy"]
    assert not re.search(r"\son\w+=", html), "no inline handler attributes (the CSP blocks them)"


def test_page_needs_no_api_key_but_the_api_still_does(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle: ServerHandle = server_factory(api_keys=(API_KEY,))
    with handle.client() as http:
        assert http.get("/").status_code == 200
        assert http.get("/v1/models").status_code == 401
        authorized = http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert authorized.status_code == 200


def test_disable_chat_page_gives_404(server_factory) -> None:  # type: ignore[no-untyped-def]
    handle: ServerHandle = server_factory(disable_chat_page=True)
    with handle.client() as http:
        response = http.get("/")
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found_error"
        assert http.get("/v1/models").status_code == 200


def test_disable_chat_page_flag_and_env() -> None:
    parser = build_parser()
    assert config_from_args(parser.parse_args(["serve", "mock://echo"])).disable_chat_page is False
    args = parser.parse_args(["serve", "mock://echo", "--disable-chat-page"])
    assert config_from_args(args).disable_chat_page is True
    assert config_from_env({"MLCTRIO_DISABLE_CHAT_PAGE": "1"}).disable_chat_page is True
    assert config_from_env({}).disable_chat_page is False


# ---- in headless Chromium ---------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    chromium = Browser(tmp_path / "profile")
    yield chromium
    chromium.close()


LAST_ANSWER = "document.querySelector('.msg.assistant:last-of-type')"


def _aborted(handle: ServerHandle) -> float:
    with handle.client(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        text = http.get("/metrics").text
    return metric_total(text, "mlctrio_requests_aborted_total", reason="client_disconnect")


@pytest.mark.browser
def test_type_stream_and_stop_frees_the_request(server_factory, browser: Browser) -> None:  # type: ignore[no-untyped-def]
    # 50 ms a token: the 400-character answer takes 20 s, so Stop lands mid-stream.
    handle: ServerHandle = server_factory(
        model="mock://echo?delay_ms=50", api_keys=(API_KEY,), served_model_name="echo-page"
    )
    browser.open(handle.url + "/")
    # Without the key the model list is refused, and the page says so.
    browser.wait_for("document.getElementById('status').textContent.includes('401')")
    assert browser.evaluate("document.getElementById('send').disabled") is True

    browser.type("#api-key", API_KEY)
    browser.click("#prompt")  # leaving the field stores the key and lists the models again
    models = browser.wait_for("[...document.getElementById('model').options].map(o => o.value)")
    assert models == ["echo-page"]
    assert browser.evaluate("localStorage.getItem('mlctrio.apiKey')") == API_KEY
    browser.evaluate(
        "(() => { const s = document.getElementById('model'); s.value = 'echo-page';"
        " s.dispatchEvent(new Event('change')); })()"
    )

    before = _aborted(handle)
    prompt = " ".join(f"word{i}" for i in range(60))  # no markdown: shown exactly as streamed
    browser.type("#prompt", prompt)
    browser.click("#send")

    answer = f"{LAST_ANSWER}.querySelector('.content').textContent"
    first = browser.wait_for(f"{answer}.length >= 10 && {answer}")
    later = browser.wait_for(f"{answer}.length >= {len(first) + 10} && {answer}")
    assert later.startswith(first) and prompt.startswith(later)  # tokens arrive in order
    assert browser.evaluate("document.body.dataset.busy") == "true"
    stats = handle.core_stats()
    assert stats.num_running == 1 and stats.free_pages < stats.total_pages

    browser.click("#stop")
    browser.wait_for(f"{LAST_ANSWER}.dataset.state === 'stopped'", what="the answer marked stopped")
    handle.wait_until(lambda: _aborted(handle) == before + 1, 30, "client_disconnect abort")
    handle.wait_quiescent(30)  # nothing running, every KV page free again

    shown = browser.evaluate(answer)
    assert shown.startswith(later) and len(shown) < len(prompt)
    assert browser.evaluate("document.getElementById('send').disabled") is False
    assert browser.evaluate("document.getElementById('stop').disabled") is True
    assert browser.problems() == []


@pytest.mark.browser
def test_markdown_answer_is_rendered_and_model_html_stays_text(
    server_factory, browser: Browser
) -> None:  # type: ignore[no-untyped-def]
    # The echo model answers with the prompt, so the prompt is the markdown under test.
    handle: ServerHandle = server_factory()
    browser.open(handle.url + "/")
    browser.wait_for("document.getElementById('model').value === 'mock://echo'")
    prompt = (
        "Hello <img src=x onerror=alert(1)> **bold** and `<b>code</b>`\n"
        "```js\n"
        'if (a < b) { alert("x"); }\n'
        "```\n"
        "[ok](https://example.com/a?b=1&c=2) [bad](javascript:alert(1))\n"
        "\n"
        "- item <script>alert(2)</script>\n"
        "- *second*"
    )
    browser.type("#prompt", prompt)
    browser.press_enter()
    browser.wait_for(f"{LAST_ANSWER}.dataset.state === 'done'", what="the answer finished")
    page = browser.evaluate(
        f"""(() => {{
          const user = document.querySelector('.msg.user .content');
          const answer = {LAST_ANSWER}.querySelector('.content');
          const all = (sel) => [...answer.querySelectorAll(sel)];
          return {{
            user: user.textContent,
            userElements: user.children.length,
            injected: document.querySelectorAll('img, iframe, b').length,
            scripts: document.scripts.length,
            firstParagraph: answer.querySelector('p').textContent,
            strong: all('strong').map(e => e.textContent),
            em: all('em').map(e => e.textContent),
            inlineCode: all('p code').map(e => e.textContent),
            fence: all('pre').map(e => [e.dataset.lang, e.textContent]),
            links: all('a').map(e => [e.textContent, e.getAttribute('href'), e.rel]),
            items: all('ul > li').map(e => e.textContent),
          }};
        }})()"""
    )
    assert page["user"] == prompt and page["userElements"] == 0
    assert page["injected"] == 0 and page["scripts"] == 1
    assert "Hello <img src=x onerror=alert(1)> bold and <b>code</b>" in page["firstParagraph"]
    assert page["strong"] == ["bold"]
    assert page["em"] == ["second"]
    assert page["inlineCode"] == ["<b>code</b>"]
    assert page["fence"] == [["js", 'if (a < b) { alert("x"); }']]
    assert page["links"] == [["ok", "https://example.com/a?b=1&c=2", "noopener noreferrer"]]
    assert page["items"] == ["item <script>alert(2)</script>", "second"]
    assert browser.problems() == []


# The renderer alone, in the page: markdown -> the exact HTML it must give.
RENDERED = [
    ("<img src=x onerror=alert(1)>", "<p>&lt;img src=x onerror=alert(1)&gt;</p>"),
    (
        "```html\n<script>alert('x')</script>\n```",
        '<pre data-lang="html"><code>&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;</code></pre>',
    ),
    ("```\nopen fence, mid-stream", "<pre><code>open fence, mid-stream</code></pre>"),
    (
        "`a<b` **c** _d_ snake_case_name",
        "<p><code>a&lt;b</code> <strong>c</strong> <em>d</em> snake_case_name</p>",
    ),
    (
        '[x](https://e.com/"onmouseover=1)',
        '<p><a href="https://e.com/&quot;onmouseover=1" target="_blank" '
        'rel="noopener noreferrer">x</a></p>',
    ),
    (
        "[x](javascript:alert(1)) [y](data:text/html,hi)",
        "<p>[x](javascript:alert(1)) [y](data:text/html,hi)</p>",
    ),
    (
        "# Title\n1. one\n2. two\n\n> quote",
        "<h1>Title</h1><ol><li>one</li><li>two</li></ol><blockquote>quote</blockquote>",
    ),
    ("line one\nline two", "<p>line one<br>line two</p>"),
]


@pytest.mark.browser
def test_markdown_renderer_escapes_html_and_csp_holds(
    server: ServerHandle, browser: Browser
) -> None:
    browser.open(server.url + "/")
    sources = json.dumps([source for source, _ in RENDERED])
    rendered = browser.evaluate(f"{sources}.map(renderMarkdown)")
    assert rendered == [html for _, html in RENDERED]
    assert browser.problems() == []
    # The CSP lets the page's own style and script run, and nothing injected.
    assert browser.evaluate("getComputedStyle(document.body).display") == "flex"
    browser.evaluate(
        "(() => { const s = document.createElement('script');"
        " s.textContent = 'window.injected = true'; document.body.append(s); })()"
    )
    assert browser.evaluate("window.injected === undefined") is True
    blocked = [p for p in browser.problems() if "Content Security Policy" in p]
    assert len(blocked) == 1 and "inline script" in blocked[0]
