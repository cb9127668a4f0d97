"""The demo page in real headless Chromium, talking to a TCP client.

The server stays on the reactor; Playwright's blocking API drives the browser
from one thread of the reactor's pool.  Skipped when Chromium or Playwright
is missing, unless RELAY_REQUIRE_BROWSER=1 (as in CI), which makes it fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

from twisted.internet import defer, endpoints, reactor
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.python.failure import Failure
from twisted.trial import unittest

from relay.server import websocket
from relay.server.factory import RelayConfig, RelayFactory
from relay.wire import ErrorCode, MessageType
from tests.support import FrameClient, _disconnect

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("RELAY_REQUIRE_BROWSER") == "1"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Milliseconds the page gets for each step.
STEP_TIMEOUT = 15_000


@contextlib.contextmanager
def chromium_page(url: str) -> Iterator[tuple[Any, list[str], list[str]]]:
    """A page of a fresh headless Chromium at ``url``, with the URLs it
    requests and the errors it raises; the browser and its profile are gone
    afterwards."""
    requests: list[str] = []
    errors: list[str] = []
    profile = tempfile.mkdtemp(prefix="relay-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
            )
            try:
                page = context.new_page()
                page.set_default_timeout(STEP_TIMEOUT)
                page.on("request", lambda request: requests.append(request.url))
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(url)
                yield page, requests, errors
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def missing_browser() -> str | None:
    """Why the browser test cannot run here, or None."""
    if sync_playwright is None:
        return "Playwright is not installed (pip install '.[test]')"
    if CHROMIUM is None:
        return "Chromium is not installed (apt-get install chromium)"
    return None


def connect_and_join(page: Any, user: str, room: str) -> None:
    """On the demo page: connect as ``user`` and ask to join ``room``."""
    page.fill("#user", user)
    page.click("#connect")
    page.wait_for_selector('#status[data-state="connected"]')
    page.fill("#room", room)
    page.click("#join")


def drive_page(base_url: str, on_joined: Callable[[], None]) -> dict[str, Any]:
    """In a thread: open the demo page, connect, join room ``demo``, wait for
    a TCP client's message, then send one from the page.

    Returns what the page saw: its log, the URLs it requested, its errors.
    """
    with chromium_page(base_url) as (page, requests, errors):
        connect_and_join(page, "browser", "demo")
        page.locator("#log li", has_text="joined demo").wait_for()
        on_joined()
        page.locator("#log li.message", has_text="term: hello from tcp").wait_for()
        page.fill("#message", "hello from the browser")
        page.click("#send")
        page.locator("#log li.sent", has_text="hello from the browser").wait_for()
        return {"log": page.inner_text("#log"), "requests": requests, "errors": errors}


class BrowserTestCase(unittest.TestCase):
    """A test that drives headless Chromium: skipped without it, unless
    RELAY_REQUIRE_BROWSER=1 makes that a failure."""

    if missing_browser() and not REQUIRED:
        skip = missing_browser()

    def setUp(self) -> None:
        if missing_browser():
            self.fail(f"RELAY_REQUIRE_BROWSER=1 but {missing_browser()}")


class DemoPageTestCase(BrowserTestCase):
    """The demo page's server: one factory on an HTTP listener (WebSocket
    and the page) and on a TCP one, for the page and TCP clients."""

    def make_factory(self) -> RelayFactory:
        return RelayFactory(RelayConfig(), reactor=reactor)

    async def setUp(self) -> None:
        super().setUp()
        self.factory = self.make_factory()
        self.http_port = await self.listen(websocket.make_site(self.factory))
        self.tcp_port = await self.listen(self.factory)
        self.addCleanup(self.factory.wait_closed)

    async def listen(self, factory: Any) -> Any:
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = await endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        return port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port.getHost().port}/"

    async def terminal(self, **hello: Any) -> FrameClient:
        """A TCP client of the server, past its HELLO."""
        tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.tcp_port.getHost().port)
        client = await endpoints.connectProtocol(tcp, FrameClient())
        self.addCleanup(_disconnect, client)
        await client.hello(**hello)
        return client

    async def page_joined(self, drive: Callable[..., dict[str, Any]], *args: Any) -> defer.Deferred[dict[str, Any]]:
        """Run ``drive(base_url, *args, on_joined)`` in a thread, and return
        once the page called ``on_joined``: the Deferred of what it returns."""
        joined: defer.Deferred[None] = defer.Deferred()
        browser = deferToThread(drive, self.base_url, *args, lambda: reactor.callFromThread(joined.callback, None))

        def unblock(result: Any) -> Any:
            # A page that fails before joining must not leave the test waiting.
            if not joined.called:
                if isinstance(result, Failure):
                    joined.errback(result)
                    return None
                joined.errback(AssertionError("the page finished without joining"))
            return result

        browser.addBoth(unblock)
        # The browser and Chromium are gone before the reactor is checked.
        self.addCleanup(lambda: browser)
        await joined
        return browser


class DemoPageInBrowserTests(DemoPageTestCase):
    async def test_page_and_tcp_client_exchange_messages(self) -> None:
        terminal = await self.terminal(userId="term")
        await terminal.join("demo")
        base_url = self.base_url
        browser = await self.page_joined(drive_page)

        terminal.send_json(MessageType.MESSAGE, {"room": "demo", "content": "hello from tcp"})
        type_, body = await terminal.next_json()
        self.assertEqual(
            (type_, body["room"], body["from"], body["content"]),
            (MessageType.MESSAGE, "demo", "browser", "hello from the browser"),
        )
        seen = await browser
        self.assertIn("[demo] term: hello from tcp", seen["log"])
        self.assertEqual(seen["errors"], [])
        # Self-contained: the page loads nothing from anywhere but its server.
        self.assertIn(base_url, seen["requests"])
        elsewhere = [url for url in seen["requests"] if not url.startswith((base_url, "data:"))]
        self.assertEqual(elsewhere, [])


def drive_reconnecting_page(base_url: str, server: Callable[[str], Any]) -> dict[str, Any]:
    """In a thread: the page joins ``demo`` and shows its members; then the
    server shuts down and drops the link (``server("shutdown")``,
    ``server("drop")``, run on the reactor), and the page must come back,
    re-join and list its members again each time."""
    with chromium_page(base_url) as (page, _, errors):
        connect_and_join(page, "browser", "demo")
        page.locator("#members li", has_text="term").wait_for()
        page.locator("#members li", has_text="browser").wait_for()
        server("join")
        page.locator("#members li", has_text="late").wait_for()
        page.locator("#log li.presence", has_text="late joined demo").wait_for()
        server("leave")
        page.locator("#members li", has_text="late").wait_for(state="detached")
        lists = []
        for step in ("shutdown", "drop"):
            rejoined = page.locator("#log li", has_text="joined demo").count() + 1
            server(step)
            page.locator("#log li", has_text="reconnecting in").nth(len(lists)).wait_for()
            page.locator("#log li", has_text="joined demo").nth(rejoined - 1).wait_for()
            page.locator("#members li", has_text="browser").wait_for()
            lists.append(page.inner_text("#members"))
        return {"log": page.inner_text("#log"), "lists": lists, "errors": errors}


class DemoPageReconnectTests(DemoPageTestCase):
    async def test_member_list_follows_presence_and_the_page_reconnects(self) -> None:
        terminal = await self.terminal(userId="term")
        await terminal.join("demo")
        late = await self.terminal(userId="late")

        async def step(name: str) -> None:
            if name == "join":
                await late.join("demo")
            elif name == "leave":
                await late.request(MessageType.LEAVE_ROOM, {"room": "demo"})
            elif name == "shutdown":
                # SERVER_SHUTDOWN to the page only; the TCP member stays.
                [page] = [c for c in self.factory.connections if c.user_id == "browser"]
                page.fail(ErrorCode.SERVER_SHUTDOWN, "the server is shutting down")
            else:
                [page] = [c for c in self.factory.connections if c.user_id == "browser"]
                page.transport.abortConnection()

        seen = await deferToThread(
            drive_reconnecting_page, self.base_url,
            lambda name: blockingCallFromThread(reactor, lambda: defer.ensureDeferred(step(name))),
        )
        self.assertEqual(seen["errors"], [])
        self.assertEqual(seen["lists"], ["browser\nterm", "browser\nterm"])
        self.assertIn("closed by the server (SERVER_SHUTDOWN); reconnecting in", seen["log"])
        self.assertIn("connection lost; reconnecting in", seen["log"])
