"""Headless Chromium driven over the Chrome DevTools protocol, on a pipe.

`Browser` starts Debian's Chromium (scripts/install-browser) with `--remote-debugging-pipe` (no
extra package, no port), opens one page and acts on it as a person would: real mouse clicks, typed
text, the Enter key; it reads the page with `evaluate` and waits on conditions in it (`wait_for`),
never for fixed times. Uncaught exceptions, dialogs, console errors and CSP violations the page
reported are in `problems()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

# Runs argv[3:] with the pipe ends argv[1] and argv[2] on fds 3 and 4, where Chromium expects
# them (moved above 9 first: either end may itself be fd 3 or 4).
_ON_FDS_3_AND_4 = """
import fcntl, os, sys
given = [int(fd) for fd in sys.argv[1:3]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in given]
for fd in given:
    os.close(fd)
os.dup2(high[0], 3)
os.dup2(high[1], 4)
os.execv(sys.argv[3], sys.argv[3:])
"""


class Browser:
    """Just enough of the Chrome DevTools protocol, on --remote-debugging-pipe: Chromium reads
    commands on its fd 3 and writes replies and events on its fd 4, each a JSON text ending in NUL.
    Commands go to one page (a flat session); the events seen on the way are kept in `events`."""

    def __init__(self, user_data_dir: Path) -> None:
        chromium = shutil.which("chromium")
        if chromium is None:
            pytest.fail(
                "chromium is not installed: run scripts/install-browser (README test command)"
            )
        commands_r, commands_w = os.pipe()
        replies_r, replies_w = os.pipe()
        fds = (commands_r, replies_w)  # Chromium's ends
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,900",
            "--remote-debugging-pipe",
            f"--user-data-dir={user_data_dir}",
            "about:blank",
        ]
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _ON_FDS_3_AND_4, *map(str, fds), chromium, *flags],
                pass_fds=fds,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(commands_w)
            os.close(replies_r)
            raise
        finally:
            os.close(commands_r)
            os.close(replies_w)
        self._commands = open(commands_w, "wb")  # closed in close()
        self._replies = replies_r
        self._buffer = b""
        self._pending: deque[dict[str, Any]] = deque()
        self._last_id = 0
        self.session: str | None = None
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        """Ask Chromium to quit (it then ends its own child processes); kill it if it does not."""
        try:
            self._commands.write(b'{"id": 0, "method": "Browser.close"}\0')
            self._commands.flush()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            with contextlib.suppress(OSError):  # a broken pipe: Chromium had exited already
                self._commands.close()
            os.close(self._replies)

    def _message(self, deadline: float) -> dict[str, Any]:
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._replies], [], [], remaining)[0]:
                raise AssertionError("Chromium did not answer in time")
            data = os.read(self._replies, 1 << 16)
            if not data:
                raise AssertionError(f"Chromium exited (status {self.proc.poll()})")
            *complete, self._buffer = (self._buffer + data).split(b"\0")
            self._pending.extend(json.loads(text) for text in complete)
        return self._pending.popleft()

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a command (to the page once attached) and return its result."""
        self._last_id += 1
        command: dict[str, Any] = {"id": self._last_id, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith("Target."):
            command["sessionId"] = self.session
        self._commands.write(json.dumps(command).encode() + b"\0")
        self._commands.flush()
        deadline = time.monotonic() + 60
        while True:
            message = self._message(deadline)
            if message.get("id") == self._last_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result
            if "method" in message:
                self.events.append(message)

    def open(self, url: str) -> None:
        """Attach to a new page, record its console, errors and dialogs, load `url`."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'", what="the page loaded")

    def evaluate(self, expression: str) -> Any:
        reply = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression!r} raised: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60.0, what: str = "") -> Any:
        """Poll `expression` in the page until it is truthy; return its value."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"{what or expression} not reached in {timeout_s} s")

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element."""
        x, y = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )

    def type(self, selector: str, text: str) -> None:
        """Click into the element and type `text` (as an input method would insert it)."""
        self.click(selector)
        self.call("Input.insertText", {"text": text})

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent",
                {"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13},
            )

    def problems(self) -> list[str]:
        """Uncaught exceptions, dialogs, console errors and CSP reports seen so far (not the
        network's log lines for error statuses: the tests look at what the page shows)."""
        found = []
        for event in self.events:
            method, params = event["method"], event.get("params", {})
            if method in ("Runtime.exceptionThrown", "Page.javascriptDialogOpening"):
                found.append(f"{method}: {params}")
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                if params["entry"]["source"] == "network":  # an HTTP error status: the page says
                    continue
                found.append(f"log ({params['entry']['source']}): {params['entry']['text']}")
        return found
