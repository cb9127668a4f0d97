"""The demo page logging in with a token, in real headless Chromium.

As in ``test_browser``: the server stays on the reactor and Playwright's
blocking API drives the browser from a thread.  Skipped without Chromium or
Playwright unless RELAY_REQUIRE_BROWSER=1 (as in CI).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import defer, endpoints, reactor
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial import unittest

from relay.server import websocket
from relay.server.auth import Authenticator, JwtVerifier
from relay.server.factory import RelayConfig, RelayFactory
from relay.wire import MessageType
from tests.authkeys import KeyFiles, claims, mint
from tests.support import FrameClient, _disconnect
from tests.test_browser import REQUIRED, chromium_page, missing_browser


def log_in_and_chat(base_url: str, token: str, forged: str, on_joined: Callable[[], None]) -> dict[str, Any]:
    """In a thread: log in with ``token``, join ``demo``, be refused ``secret``,
    exchange messages, then try ``forged``.  Returns what the page saw."""
    with chromium_page(base_url) as (page, requests, errors):
        page.fill("#token", token)
        page.click("#connect")
        page.wait_for_selector('#status[data-state="connected"]')
        status = page.inner_text("#status")
        page.fill("#room", "secret")
        page.click("#join")
        page.locator("#log li.error", has_text="FORBIDDEN").wait_for()
        page.fill("#room", "demo")
        page.click("#join")
        page.locator("#log li", has_text="joined demo").wait_for()
        on_joined()
        page.locator("#log li.message", has_text="term: hello browser").wait_for()
        page.fill("#message", "hello terminal")
        page.click("#send")
        page.locator("#log li.sent", has_text="hello terminal").wait_for()
        page.click("#disconnect")
        page.wait_for_selector('#status[data-state="disconnected"]')
        page.fill("#token", forged)
        page.click("#connect")
        page.locator("#log li.error", has_text="UNAUTHORIZED").wait_for()
        return {"status": status, "log": page.inner_text("#log"), "requests": requests,
                "errors": errors}


class TokenLoginInBrowserTests(unittest.TestCase):
    if missing_browser() and not REQUIRED:
        skip = missing_browser()

    async def setUp(self) -> None:
        if missing_browser():
            self.fail(f"RELAY_REQUIRE_BROWSER=1 but {missing_browser()}")
        files = KeyFiles(self)
        self.factory = RelayFactory(RelayConfig(), reactor=reactor,
                                    auth=Authenticator(jwt_verifier=JwtVerifier(files.secret(), leeway=0)))
        self.http_port = await self.listen(websocket.make_site(self.factory))
        self.tcp_port = await self.listen(self.factory)
        self.addCleanup(self.factory.wait_closed)

    async def listen(self, factory: Any) -> Any:
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return port

    async def test_the_page_logs_in_with_a_token_sent_in_hello(self) -> None:
        tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.tcp_port.getHost().port)
        terminal = await endpoints.connectProtocol(tcp, FrameClient())
        self.addCleanup(_disconnect, terminal)
        await terminal.hello(token=mint(claims(sub="term", rooms=["demo"], now=time.time())))
        await terminal.join("demo")

        token = mint(claims(sub="browser", rooms=["demo"], now=time.time()))
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        base_url = f"http://127.0.0.1:{self.http_port.getHost().port}/"
        joined: defer.Deferred[None] = defer.Deferred()
        browser = deferToThread(log_in_and_chat, base_url, token, forged,
                                lambda: reactor.callFromThread(joined.callback, None))

        def unblock(result: Any) -> Any:
            if not joined.called:
                joined.errback(result if isinstance(result, Failure)
                               else AssertionError("the page finished without joining"))
                return None
            return result

        browser.addBoth(unblock)
        self.addCleanup(lambda: browser)
        await joined

        terminal.send_json(MessageType.MESSAGE, {"room": "demo", "content": "hello browser"})
        type_, body = await terminal.next_json()
        self.assertEqual((type_, body["from"], body["content"]),
                         (MessageType.MESSAGE, "browser", "hello terminal"))
        seen = await browser
        self.assertEqual(seen["status"], "connected as browser")
        self.assertIn("ERROR FORBIDDEN", seen["log"])
        self.assertIn("ERROR UNAUTHORIZED", seen["log"])
        self.assertEqual(seen["errors"], [])
        # The token went in HELLO, in no URL a proxy could log.
        self.assertEqual([url for url in seen["requests"] if token[:20] in url or forged[:20] in url], [])
        self.assertEqual(self.factory.auth.failures["invalid token: bad signature"], 1)
