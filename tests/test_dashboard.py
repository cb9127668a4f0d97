"""The metrics dashboard in real headless Chromium, during a relay-bench run.

The server and the bench run on the reactor; Playwright's blocking API
drives the browser from a thread of the reactor's pool (as in
test_browser.py).  The page must poll /metrics, chart the bench's traffic
while it runs, show the same values /metrics gives once it is over, load
nothing from anywhere else, and draw something (the screenshot is checked
not to be blank).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import threading
import urllib.request
import zlib
from typing import Any, Callable

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from relay.server.tap import Options, makeService
from relay.tools.bench import Bench, BenchConfig
from tests.scrape import Scrape
from tests.support import connect_frame_client
from tests.test_browser import CHROMIUM, CHROMIUM_FLAGS, BrowserTestCase, sync_playwright

# Milliseconds the page gets for each step on a loaded machine.
STEP_TIMEOUT = 30_000
# Seconds the test waits for the bench to end once the page has seen it.
BENCH_LIMIT = 120


def tile(page: Any, name: str, field: str = "value") -> str:
    return page.get_attribute(f"#tile-{name}", f"data-{field}") or ""


def drive_dashboard(url: str, on_ready: Callable[[], None], bench_done: threading.Event) -> dict[str, Any]:
    """In a thread: open the dashboard, let the bench start, watch it chart
    the run, then read what it shows and scrape /metrics once it is over."""
    requests: list[str] = []
    errors: list[str] = []
    profile = tempfile.mkdtemp(prefix="relay-chromium-")
    seen: dict[str, Any] = {"requests": requests, "errors": errors}
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 1000},
            )
            try:
                page = context.new_page()
                page.set_default_timeout(STEP_TIMEOUT)
                page.on("request", lambda request: requests.append(request.url))
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(url + "?interval=250")
                page.wait_for_function("() => Number(document.body.dataset.polls || 0) >= 2")
                seen["samples_before"] = int(page.get_attribute("#chart-deliveries canvas", "data-samples"))
                on_ready()
                # Charts move while the bench publishes.
                page.wait_for_function(
                    "() => Number(document.getElementById('tile-deliveries').dataset.value) > 0"
                    " && Number(document.querySelector('#chart-deliveries canvas').dataset.samples) >= 3"
                )
                seen["live_deliveries_per_second"] = float(tile(page, "deliveries"))
                seen["live_connections"] = int(tile(page, "connections"))
                seen["live_rooms"] = page.inner_text("#top-rooms tbody")
                if not bench_done.wait(BENCH_LIMIT):
                    raise AssertionError("the bench never finished")
                # Once the page has polled twice with the counters at rest,
                # its rates are 0 and its totals are the final ones.
                page.wait_for_function(
                    "() => document.getElementById('tile-published').dataset.value === '0'"
                    " && document.getElementById('tile-deliveries').dataset.value === '0'"
                    " && document.getElementById('tile-connections').dataset.value === '2'"
                )
                with urllib.request.urlopen(url + "metrics", timeout=30) as response:
                    seen["scrape"] = response.read().decode()
                for name in ("connections", "rooms", "memberships"):
                    seen[name] = tile(page, name)
                seen["published_total"] = tile(page, "published", "total")
                seen["deliveries_total"] = tile(page, "deliveries", "total")
                seen["status"] = page.get_attribute("#status", "data-state")
                seen["screenshot"] = page.screenshot(full_page=True)
                return seen
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def png_colours(png: bytes) -> dict[bytes, int]:
    """How many pixels of each colour an 8-bit RGB(A) PNG has."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat = 8, b""
    width = height = channels = 0
    while position < len(png):
        (length,) = struct.unpack_from("!I", png, position)
        kind = png[position + 4 : position + 8]
        data = png[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack("!IIBBBBB", data)
            assert (depth, interlace) == (8, 0) and colour in (2, 6), (depth, colour, interlace)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += data
        position += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    previous = bytearray(stride)
    counts: dict[bytes, int] = {}
    for y in range(height):
        start = y * (stride + 1)
        kind, row = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for x in range(stride):
            left = row[x - channels] if x >= channels else 0
            up = previous[x]
            if kind == 1:
                row[x] = (row[x] + left) & 0xFF
            elif kind == 2:
                row[x] = (row[x] + up) & 0xFF
            elif kind == 3:
                row[x] = (row[x] + (left + up) // 2) & 0xFF
            elif kind == 4:
                corner = previous[x - channels] if x >= channels else 0
                guess = left + up - corner
                pa, pb, pc = abs(guess - left), abs(guess - up), abs(guess - corner)
                row[x] = (row[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        for x in range(0, stride, channels):
            colour = bytes(row[x : x + 3])
            counts[colour] = counts.get(colour, 0) + 1
        previous = row
    return counts


class DashboardInBrowserTests(BrowserTestCase):
    timeout = 300

    async def setUp(self) -> None:
        super().setUp()
        options = Options()
        options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--metrics", "tcp:0:interface=127.0.0.1"])
        self.service = makeService(options, reactor=reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.relay_port = self.service.listening_ports[0]
        self.url = f"http://127.0.0.1:{self.service.metrics_ports[0].getHost().port}/"

    async def test_dashboard_charts_a_bench_run_and_matches_metrics(self) -> None:
        for name in ("idle-1", "idle-2"):  # still there when the bench has gone
            client = await connect_frame_client(self, self.relay_port)
            await client.hello(userId=name)
            await client.join("lobby")

        ready: defer.Deferred[None] = defer.Deferred()
        bench_done = threading.Event()
        browser = deferToThread(
            drive_dashboard, self.url, lambda: reactor.callFromThread(ready.callback, None), bench_done
        )

        def unblock(result: Any) -> Any:
            if not ready.called:  # a page that fails early must not leave the test waiting
                ready.errback(result if isinstance(result, Failure) else AssertionError("page never got ready"))
                return None
            return result

        browser.addBoth(unblock)
        self.addCleanup(lambda: browser)
        await ready

        config = BenchConfig(
            endpoint=f"tcp:host=127.0.0.1:port={self.relay_port.getHost().port}",
            subscribers=20, publishers=1, rooms=1, rate=400.0, duration=8.0, warmup=0.5, drain=10.0,
            progress=False,
        )
        try:
            report = await Bench(config, reactor).run()
        finally:
            bench_done.set()
        seen = await browser
        # Kept for a person to look at.
        with open(os.path.join(tempfile.mkdtemp(prefix="relay-dashboard-"), "dashboard.png"), "wb") as png:
            png.write(seen["screenshot"])

        self.assertEqual(seen["errors"], [])
        elsewhere = [u for u in seen["requests"] if not u.startswith((self.url, "data:"))]
        self.assertEqual(elsewhere, [])
        # While the bench ran: deliveries charted, its 21 connections counted,
        # its room (20 subscribers and the publisher) at the top of the table.
        self.assertGreater(seen["live_deliveries_per_second"], 0)
        self.assertEqual(seen["live_connections"], 2 + 21)
        self.assertRegex(seen["live_rooms"], r"^bench-0\s+21\s")
        # Afterwards: what the page shows is what /metrics says, and what the bench did.
        values = Scrape(seen["scrape"])
        self.assertEqual(int(seen["connections"]), values.total("relay_connections"))
        self.assertEqual(int(seen["rooms"]), values.value("relay_rooms"))
        self.assertEqual(int(seen["memberships"]), values.value("relay_memberships"))
        self.assertEqual(float(seen["published_total"]), values.value("relay_messages_published_total"))
        self.assertEqual(float(seen["deliveries_total"]), values.value("relay_frames_sent_total", type="MESSAGE"))
        self.assertEqual(values.value("relay_messages_published_total"), report["published_total"])
        self.assertEqual(values.value("relay_frames_sent_total", type="MESSAGE"), report["received"])
        self.assertEqual(seen["status"], "ok")
        # The screenshot is a drawn page, not a blank one.
        colours = png_colours(seen["screenshot"])
        pixels = sum(colours.values())
        self.assertGreater(len(colours), 50)
        self.assertLess(max(colours.values()) / pixels, 0.9)
