"""Headless Chromium: render a local HTML page to PNG and collect what went wrong on it.

Talks to Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages ending in
NUL, commands on the child's fd 3, replies on its fd 4), so no port, no websocket library and no network are
involved. An error is a ``console.error``/``console.assert`` call, an uncaught exception, a browser log entry
of level error (a missing image, a blocked resource), or an ``<img>`` that did not decode (``naturalWidth`` 0,
e.g. a corrupt inline GIF, which logs nothing). Used to check ``audit.html`` and the pipeline summary.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echoflow.errors import EchoFlowError

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--remote-debugging-pipe",
)
MAX_HEIGHT = 16384  # px; Chromium's largest screenshot side
UNDECODED_IMAGES = ("Promise.all(Array.from(document.images, i => i.decode().catch(() => null)))"
                    ".then(() => Array.from(document.images).filter(i => i.naturalWidth === 0)"
                    ".map(i => i.alt || i.src.slice(-80)))")  # a src ends with its file name
SCROLL_WIDTH = "document.documentElement.scrollWidth"
TEXT = ("[document, ...Array.from(document.querySelectorAll('iframe'), f => { try { return f.contentDocument; } "
        "catch (e) { return null; } })].filter(d => d && d.body).map(d => d.body.innerText).join('\\n')")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on PATH, or None."""
    return next((path for name in NAMES if (path := shutil.which(name))), None)


@dataclass(frozen=True)
class Page:
    """What a rendered page showed: its errors (see `render`), its layout width and its visible text.

    Attributes:
        errors: one line per console error, uncaught exception, error log entry or undecoded image.
        scroll_width: ``document.documentElement.scrollWidth``, CSS px; above the viewport width means the page
            overflows sideways (a horizontal scroll bar).
        text: ``document.body.innerText`` (then that of every same-origin iframe) once loaded and once every
            ``wait_for`` text showed.
    """

    errors: list[str]
    scroll_width: int
    text: str


def open_page(url: str, png_path: Path, *, width: int = 1280, height: int = 2000, timeout_s: float = 60.0,
              wait_for: Sequence[str] = (), ready: str = "", settle_s: float = 0.0) -> Page:
    """Load ``url`` (``file://`` or ``http://127.0.0.1``) in headless Chromium, save a full-page PNG, return a `Page`.

    ``wait_for``: texts the page must show before the screenshot (a single-page app such as MLflow's UI fills
    itself in after the load event); polled every 0.25 s until ``timeout_s`` runs out, then EchoFlowError.
    ``ready``: a JavaScript expression that must also be truthy (polled alike), e.g. that an element exists.
    ``settle_s``: seconds to wait after that before the screenshot (e.g. for a sandboxed iframe, whose text
    cannot be read, to draw).
    """
    executable = find_chromium()
    if executable is None:
        raise EchoFlowError(f"{url}: no Chromium found to render it (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="echoflow-chromium-") as profile:
        browser = _Browser(executable, Path(profile), deadline=time.monotonic() + timeout_s)
        try:
            return browser.render(url, png_path, width=width, height=height, wait_for=wait_for, ready=ready,
                                  settle_s=settle_s)
        finally:
            browser.close()


def render(html_path: Path, png_path: Path, *, width: int = 1280, height: int = 2000,
           timeout_s: float = 60.0) -> list[str]:
    """Load ``html_path`` in headless Chromium, save a full-page PNG, return its errors.

    Args:
        html_path: a local HTML file.
        png_path: where the screenshot goes (parents created); ``width`` px wide, as tall as the page
            (at least the ``height`` px viewport, at most 16384 px).
        width: viewport width, CSS px (device scale 1).
        height: viewport height, CSS px.
        timeout_s: for the whole render.

    Returns:
        One line per console error, uncaught exception, error log entry or undecoded image; empty when the page
        is clean.

    Raises:
        EchoFlowError: no Chromium on PATH, the page is missing or does not load, or Chromium stops answering.
    """
    if not html_path.is_file():
        raise EchoFlowError(f"{html_path}: no such HTML file")
    return open_page(html_path.resolve().as_uri(), png_path, width=width, height=height, timeout_s=timeout_s).errors


class _Browser:
    """One Chromium process and its DevTools pipe."""

    def __init__(self, executable: str, profile: Path, *, deadline: float) -> None:
        self.deadline, self.next_id = deadline, 0
        self.events: list[dict[str, Any]] = []
        self.buffer = b""
        to_child, self.to_browser = _high_pipe()
        self.from_browser, from_child = _high_pipe()
        self.log = profile / "chromium.log"
        actions = [(os.POSIX_SPAWN_DUP2, to_child, 3), (os.POSIX_SPAWN_DUP2, from_child, 4),
                   (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 2, str(self.log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)]
        argv = [executable, *FLAGS, f"--user-data-dir={profile / 'user'}", "about:blank"]
        self.pid = os.posix_spawn(executable, argv, os.environ, file_actions=actions, setpgroup=0)
        os.close(to_child)
        os.close(from_child)

    def render(self, url: str, png_path: Path, *, width: int, height: int, wait_for: Sequence[str] = (),
               ready: str = "", settle_s: float = 0.0) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method, session=session)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        navigation = self.call("Page.navigate", {"url": url}, session=session)
        if navigation.get("errorText"):
            raise EchoFlowError(f"{url}: did not load ({navigation['errorText']})")
        self.wait_for("Page.loadEventFired", session)
        settle = "new Promise(done => requestAnimationFrame(() => setTimeout(done, 50)))"  # late errors surface
        self.call("Runtime.evaluate", {"expression": settle, "awaitPromise": True}, session=session)
        while (missing := [t for t in wait_for if t not in self.evaluate(TEXT, session)]
               + ([ready] if ready and not self.evaluate(f"Boolean({ready})", session) else [])):
            if time.monotonic() > self.deadline:
                raise EchoFlowError(f"{url}: never showed {missing!r}")
            time.sleep(0.25)
        time.sleep(min(settle_s, max(self.deadline - time.monotonic(), 0.0)))
        undecoded = self.call("Runtime.evaluate", {"expression": UNDECODED_IMAGES, "awaitPromise": True,
                                                   "returnByValue": True}, session=session)["result"]["value"]
        size = self.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": width, "height": min(max(height, size["height"]), MAX_HEIGHT), "scale": 1}
        shot = self.call("Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True},
                         session=session)
        png_path.parent.mkdir(parents=True, exist_ok=True)
        png_path.write_bytes(base64.b64decode(shot["data"]))
        errors = [line for event in self.events if (line := _error_line(event))] + [
            f"img did not decode: {name}" for name in undecoded]
        return Page(errors, int(self.evaluate(SCROLL_WIDTH, session)), str(self.evaluate(TEXT, session)))

    def evaluate(self, expression: str, session: str) -> Any:
        """The value of a JavaScript expression in the page."""
        return self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                         session=session)["result"].get("value")

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: str = "") -> dict[str, Any]:
        """Send one command and return its result, keeping the events that arrive meanwhile."""
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise EchoFlowError(f"chromium: {method} failed ({reply['error'].get('message', '')})")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, session: str) -> None:
        """Wait for an event (it may have arrived while a command was answered)."""
        if any(e["method"] == method and e.get("sessionId") == session for e in self.events):
            return
        while True:
            event = self._receive()
            if "method" in event:
                self.events.append(event)
                if event["method"] == method and event.get("sessionId") == session:
                    return

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            ready, _, _ = select.select([self.from_browser], [], [], max(left, 0))
            chunk = os.read(self.from_browser, 1 << 20) if ready else b""
            if not chunk:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] if self.log.exists() else []
                why = "timed out" if not ready else "exited"
                raise EchoFlowError(f"chromium: {why} ({tail[0][:200] if tail else 'no log'})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    def close(self) -> None:
        """Ask Chromium to quit, then make sure its whole process group is gone."""
        try:
            os.write(self.to_browser, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
        except OSError:
            pass
        for _ in range(50):
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                break
            time.sleep(0.1)
        else:
            os.killpg(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        try:  # helpers (renderer, GPU) share the group; none may outlive the browser
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(self.to_browser)
        os.close(self.from_browser)


def _high_pipe() -> tuple[int, int]:
    """A pipe whose ends are >= 10 (close-on-exec), so duplicating them onto fds 3 and 4 cannot collide."""
    read, write = os.pipe()
    ends = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (read, write))
    os.close(read)
    os.close(write)
    return ends[0], ends[1]


def _error_line(event: dict[str, Any]) -> str | None:
    """One readable line for an error event, None for anything else."""
    params = event.get("params", {})
    if event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
        return f"console.{params['type']}: {args}"
    if event["method"] == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        return f"uncaught: {details.get('exception', {}).get('description') or details.get('text', '')}"
    if event["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        entry = params["entry"]
        return f"{entry.get('source', 'log')}: {entry.get('text', '')} {entry.get('url', '')}".strip()
    return None
