"""The demo page logging in with a token, in real headless Chromium.

As in ``test_browser``: the server stays on the reactor and Playwright's
blocking API drives the browser from a thread.  Skipped without Chromium or
Playwright unless RELAY_REQUIRE_BROWSER=1 (as in CI).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import reactor

from relay.server.auth import Authenticator, JwtVerifier
from relay.server.factory import RelayConfig, RelayFactory
from relay.wire import MessageType
from tests.authkeys import KeyFiles, claims, mint
from tests.test_browser import DemoPageTestCase, chromium_page


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


class TokenLoginInBrowserTests(DemoPageTestCase):
    def make_factory(self) -> RelayFactory:
        files = KeyFiles(self)
        return RelayFactory(RelayConfig(), reactor=reactor,
                            auth=Authenticator(jwt_verifier=JwtVerifier(files.secret(), leeway=0)))

    async def test_the_page_logs_in_with_a_token_sent_in_hello(self) -> None:
        terminal = await self.terminal(token=mint(claims(sub="term", rooms=["demo"], now=time.time())))
        await terminal.join("demo")

        token = mint(claims(sub="browser", rooms=["demo"], now=time.time()))
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        browser = await self.page_joined(log_in_and_chat, token, forged)

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
