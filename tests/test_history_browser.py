"""The demo page's history recovery in real headless Chromium."""

from __future__ import annotations

import queue
from typing import Any, Callable

from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from relay.server.factory import RelayConfig, RelayFactory
from relay.wire import MessageType
from tests.support import FrameClient
from tests.test_browser import STEP_TIMEOUT, DemoPageTestCase, chromium_page


def drive_page(base_url: str, away: Callable[[str], Any]) -> dict[str, Any]:
    """In a thread: connect, join ``demo``, then twice disconnect, let the
    test publish while the page is away (``away(step)`` blocks until it
    did), reconnect and re-join.  Returns the page's log and errors."""
    with chromium_page(base_url) as (page, _, errors):
        page.fill("#user", "browser")
        page.fill("#room", "demo")
        for joins, step in enumerate(("first", "recoverable", "lost")):
            page.click("#connect")
            page.wait_for_selector('#status[data-state="connected"]')
            page.click("#join")
            page.locator("#log li", has_text="joined demo").nth(joins).wait_for()
            if step == "recoverable":
                page.locator("#log li", has_text="recovered 2 missed messages in demo").wait_for()
            if step == "lost":
                page.locator("#log li.error", has_text="could not recover demo: history lost").wait_for()
                break
            away(step)  # the test publishes "live", then waits for the page to leave
            page.locator("#log li.message", has_text=f"term: live {step}").wait_for()
            page.click("#disconnect")
            page.wait_for_selector('#status[data-state="disconnected"]')
            away(step + " gone")
        return {"log": page.inner_text("#log"), "errors": errors}


class HistoryInBrowserTests(DemoPageTestCase):
    timeout = 120

    def make_factory(self) -> RelayFactory:
        return RelayFactory(RelayConfig(history=3), reactor=reactor)

    async def publish(self, terminal: FrameClient, *contents: str) -> None:
        for content in contents:
            terminal.send_json(MessageType.MESSAGE, {"room": "demo", "content": content})
        terminal.send_json(MessageType.HEARTBEAT, None)
        await terminal.next_frame()

    def browser_in_room(self) -> bool:
        return any(c.user_id == "browser" for c in self.factory.connections)

    async def test_the_page_recovers_missed_messages_once_and_says_when_it_cannot(self) -> None:
        terminal = await self.terminal(userId="term")
        await terminal.join("demo")

        async def on_reactor(step: str) -> None:
            if step == "first":
                await self.publish(terminal, "live first")
            elif step == "first gone":
                await self._gone()
                await self.publish(terminal, "missed one", "missed two")
            elif step == "recoverable":
                await self.publish(terminal, "live recoverable")
            else:
                await self._gone()
                await self.publish(terminal, "a", "b", "c", "d")

        def away(step: str) -> None:
            # From the browser's thread: run the step on the reactor and wait for it.
            done: queue.Queue[Any] = queue.Queue()

            def run() -> None:
                defer.ensureDeferred(on_reactor(step)).addBoth(done.put)

            reactor.callFromThread(run)
            result = done.get(timeout=STEP_TIMEOUT / 1000)
            if isinstance(result, Failure):
                result.raiseException()

        browser = deferToThread(drive_page, self.base_url, away)
        self.addCleanup(lambda: browser)
        seen = await browser
        log = seen["log"]
        self.assertEqual(seen["errors"], [])
        for line in ("term: missed one", "term: missed two"):
            self.assertEqual(log.count(line), 1, log)
        self.assertEqual(log.count("term: live first"), 1, log)
        self.assertIn("recovered 2 missed messages in demo", log)
        self.assertIn("could not recover demo: history lost", log)
        self.assertLess(log.index("term: missed two"), log.index("recovered 2 missed messages"))

    async def _gone(self) -> None:
        """Wait until the server has seen the page's connection close."""
        deadline = reactor.seconds() + 10
        while self.browser_in_room():
            if reactor.seconds() > deadline:
                raise AssertionError("the page's connection is still open")
            await task.deferLater(reactor, 0.02, lambda: None)
