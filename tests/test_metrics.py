"""--metrics: /metrics, /healthz, /rooms and the dashboard page, over real sockets.

Every scrape goes through a real HTTP client to a real listener built by
makeService; values are asserted against what the test's clients did.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import orjson
from twisted.internet import defer, endpoints, error, reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from relay.server.factory import RelayFactory
from relay.server.fanout import Batch, Fanout, Probe
from relay.server.metrics import MAX_TOP_ROOMS, Distribution, Metrics
from relay.server.rooms import Room
from relay.server.tap import Options, makeService
from relay.wire import ErrorCode, MessageType
from tests.scrape import Scrape, base_url, http_get, scrape
from tests.support import FrameClient, connect_frame_client


class DistributionTests(unittest.TestCase):
    def test_buckets_are_cumulative_and_end_with_inf(self) -> None:
        distribution = Distribution((1, 10))
        for value, times in ((0.5, 1), (1, 2), (5, 3), (50, 4)):
            distribution.observe(value, times)
        self.assertEqual(distribution.buckets(), [("1.0", 3), ("10.0", 6), ("+Inf", 10)])
        self.assertEqual((distribution.count, distribution.sum), (10, 0.5 + 2 + 15 + 200))


class FakeMember:
    """A room member that keeps what it is given (for the Batch probe)."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.entries: list[Any] = []
        self.flushed = 0

    def enqueue(self, frame: bytes) -> None:
        if not self.entries:
            self.batch.mark_dirty(self)
        self.entries.append(frame)

    def enqueue_shared(self, fanout: Fanout) -> bool:
        if not self.entries:
            self.batch.mark_dirty(self)
        self.entries.append(fanout)
        return True

    @property
    def queued_bytes(self) -> int:
        return sum(e.size if isinstance(e, Fanout) else len(e) for e in self.entries)

    def flush(self) -> None:
        self.entries = []
        self.flushed += 1


class BatchProbeTests(unittest.TestCase):
    """A probe measures exactly one batch and then leaves the batch as it was."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.batch = Batch()
        self.room = Room("r")
        self.members = [FakeMember(self.batch) for _ in range(3)]
        for member in self.members:
            self.room.add(member)
        self.probes: list[Probe] = []

    def broadcast(self, frame: bytes, sender: FakeMember | None) -> None:
        self.room.broadcast(frame, exclude=sender, batch=self.batch)

    def test_probe_measures_the_next_batch_once(self) -> None:
        self.batch.probe_next(self.clock.seconds, self.probes.append)
        self.clock.advance(5)  # waiting for traffic is not latency
        sender = self.members[0]
        self.broadcast(b"x" * 10, sender)
        self.clock.advance(0.25)
        self.broadcast(b"y" * 20, sender)
        self.batch.flush()
        self.assertEqual(self.probes, [Probe(0.25, [(2, 2)], [30, 30])])
        self.assertEqual([m.flushed for m in self.members], [0, 1, 1])
        # The class's own methods are back: the next batch costs nothing.
        self.assertNotIn("flush", vars(self.batch))
        self.assertNotIn("mark_dirty", vars(self.batch))
        self.assertFalse(self.batch.probing)
        self.broadcast(b"z", sender)
        self.batch.flush()
        self.assertEqual(len(self.probes), 1)

    def test_a_flush_with_nothing_queued_leaves_the_probe_waiting(self) -> None:
        self.batch.probe_next(self.clock.seconds, self.probes.append)
        self.batch.flush()
        self.assertEqual(self.probes, [])
        self.broadcast(b"abc", None)  # no sender excluded: all three members
        self.batch.flush()
        self.assertEqual(self.probes, [Probe(0.0, [(3, 1)], [3, 3, 3])])

    def test_a_probe_asked_for_while_one_is_pending_is_ignored(self) -> None:
        other: list[Probe] = []
        self.batch.probe_next(self.clock.seconds, self.probes.append)
        self.batch.probe_next(self.clock.seconds, other.append)
        self.broadcast(b"abc", self.members[1])
        self.batch.flush()
        self.assertEqual((len(self.probes), other), (1, []))


class CollectorUnitTests(unittest.TestCase):
    """Counters the protocol keeps become metrics (no sockets: StringTransport)."""

    def test_frames_out_by_type_split_shared_deliveries_from_replies(self) -> None:
        factory = RelayFactory(reactor=task.Clock())
        metrics = Metrics(factory, process_metrics=False)
        connections = []
        for _ in range(3):
            connection = factory.buildProtocol(None)
            connection.makeConnection(StringTransport())
            connection.dataReceived(_join_frame("r"))
            connections.append(connection)
        connections[0].dataReceived(_message_frame("r", "hi") * 4)
        values = Scrape(_generate(metrics))
        self.assertEqual(values.value("relay_frames_sent_total", type="JOIN_ROOM"), 3)
        self.assertEqual(values.value("relay_frames_sent_total", type="MESSAGE"), 8)
        self.assertEqual(values.value("relay_frames_received_total", type="MESSAGE"), 4)
        self.assertEqual(values.value("relay_frames_received_total", type="JOIN_ROOM"), 3)
        self.assertEqual(values.total("relay_frames_sent_total"), factory.stats.frames_out)


def _generate(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def _join_frame(room: str) -> bytes:
    from relay.wire import encode_json

    return encode_json(MessageType.JOIN_ROOM, {"room": room})


def _message_frame(room: str, content: Any) -> bytes:
    from relay.wire import encode_json

    return encode_json(MessageType.MESSAGE, {"room": room, "content": content})


class MetricsServiceTestCase(unittest.TestCase):
    """A service from makeService with a relay port and a metrics port."""

    def start(self, *argv: str) -> Any:
        options = Options()
        options.parseOptions(
            ["--port", "tcp:0:interface=127.0.0.1", "--metrics", "tcp:0:interface=127.0.0.1", *argv]
        )
        self.service = makeService(options, reactor=reactor)
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())
        self.relay_port = self.service.listening_ports[0]
        self.url = base_url(self.service.metrics_ports[0])
        return self.service

    async def client(self, user: str | None = None, *rooms: str) -> FrameClient:
        client = await connect_frame_client(self, self.relay_port)
        if user is not None:
            await client.hello(userId=user)
        for room in rooms:
            await client.join(room)
        return client


class ScrapeTests(MetricsServiceTestCase):
    def setUp(self) -> None:
        self.start()

    async def test_scrape_counts_what_the_clients_did(self) -> None:
        alice = await self.client("alice", "lobby")
        bob = await self.client("bob", "lobby")
        carol = await self.client("carol", "lobby", "side")
        for n in range(5):
            alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": n})
        for listener in (bob, carol):
            for _ in range(5):
                await listener.next_json()
        for _ in range(3):  # refused three times, non-fatal
            type_, body = await bob.request(MessageType.MESSAGE, {"room": "side", "content": 1})
            self.assertEqual(body["code"], ErrorCode.NOT_IN_ROOM)
        await bob.request(MessageType.HEARTBEAT, {})

        values = await scrape(self.url)
        self.assertEqual(values.value("relay_connections", transport="tcp"), 3)
        self.assertEqual(values.total("relay_connections"), 3)
        self.assertEqual(values.value("relay_connections_accepted_total"), 3)
        self.assertEqual(values.value("relay_rooms"), 2)
        self.assertEqual(values.value("relay_memberships"), 4)
        self.assertEqual(values.value("relay_messages_published_total"), 5)
        self.assertEqual(values.value("relay_frames_received_total", type="MESSAGE"), 5 + 3)
        self.assertEqual(values.value("relay_frames_received_total", type="HELLO"), 3)
        self.assertEqual(values.value("relay_frames_received_total", type="JOIN_ROOM"), 4)
        self.assertEqual(values.value("relay_frames_received_total", type="HEARTBEAT"), 1)
        self.assertEqual(values.value("relay_frames_sent_total", type="MESSAGE"), 10)
        self.assertEqual(values.value("relay_frames_sent_total", type="ERROR"), 3)
        self.assertEqual(values.value("relay_frames_sent_total", type="HEARTBEAT"), 1)
        self.assertEqual(values.value("relay_errors_sent_total", code="NOT_IN_ROOM"), 3)
        self.assertEqual(values.value("relay_errors_sent_total", code="SLOW_CONSUMER"), 0)
        self.assertEqual(values.value("relay_connections_draining"), 0)
        stats = self.service.factory.stats
        self.assertEqual(values.value("relay_bytes_received_total"), stats.bytes_in)
        self.assertEqual(values.value("relay_bytes_sent_total"), stats.bytes_out)
        # The standard collectors stay, and no room or user name is a label.
        self.assertIn("process_resident_memory_bytes", values.names())
        labels = {value for _, pairs in values.samples for _, value in pairs}
        self.assertFalse(labels & {"lobby", "side", "alice", "bob", "carol"})

    async def test_scrapes_during_traffic_only_grow_and_end_exact(self) -> None:
        publisher = await self.client("pub", "busy")
        listeners = [await self.client(f"sub{n}", "busy") for n in range(2)]
        sent = 0

        def publish() -> None:
            nonlocal sent
            for _ in range(50):
                publisher.send_json(MessageType.MESSAGE, {"room": "busy", "content": sent})
                sent += 1

        loop = task.LoopingCall(publish)
        loop.start(0.01)
        previous: Scrape | None = None
        try:
            for _ in range(6):
                values = await scrape(self.url)
                if previous is not None:
                    for name in ("relay_messages_published_total", "relay_bytes_sent_total"):
                        self.assertGreaterEqual(values.value(name), previous.value(name))
                previous = values
        finally:
            loop.stop()
        for listener in listeners:
            while len(listener.frames) < 1 + sent:  # the join ack, then every message
                await task.deferLater(reactor, 0.01, lambda: None)
        values = await scrape(self.url)
        self.assertGreater(sent, 0)
        self.assertEqual(values.value("relay_messages_published_total"), sent)
        self.assertEqual(values.value("relay_frames_sent_total", type="MESSAGE"), 2 * sent)

    async def test_distributions_are_sampled_from_real_traffic(self) -> None:
        publisher = await self.client("pub", "room")
        listeners = [await self.client(f"sub{n}", "room") for n in range(3)]
        values = await scrape(self.url)
        for attempt in range(200):  # the sampler arms a probe every 0.1 s
            publisher.send_json(MessageType.MESSAGE, {"room": "room", "content": attempt})
            await task.deferLater(reactor, 0.02, lambda: None)
            values = await scrape(self.url)
            if values.value("relay_broadcast_fanout_members_count") > 0:
                break
        self.assertGreater(values.value("relay_delivery_latency_seconds_count"), 0)
        # Three members are handed every broadcast: all in the "5" bucket, none below.
        fanouts = values.value("relay_broadcast_fanout_members_count")
        self.assertEqual(values.value("relay_broadcast_fanout_members_bucket", le="2.0"), 0)
        self.assertEqual(values.value("relay_broadcast_fanout_members_bucket", le="5.0"), fanouts)
        self.assertEqual(values.value("relay_broadcast_fanout_members_sum"), 3 * fanouts)
        self.assertGreater(values.value("relay_flush_queue_bytes_count"), 0)
        self.assertTrue(listeners)

    async def test_rooms_lists_the_largest_first_capped(self) -> None:
        await self.client("a", "big", "mid", "small")
        await self.client("b", "big", "mid")
        await self.client("c", "big")
        status, headers, body = await http_get(self.url + "rooms?limit=2")
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(
            orjson.loads(body),
            {"rooms": [{"room": "big", "members": 3}, {"room": "mid", "members": 2}], "total": 3, "limit": 2},
        )
        status, _, body = await http_get(self.url + "rooms?limit=100000")
        self.assertEqual((status, orjson.loads(body)["limit"]), (200, MAX_TOP_ROOMS))
        status, _, body = await http_get(self.url + "rooms?limit=lots")
        self.assertEqual(status, 400)

    async def test_dashboard_page_is_served_and_loads_nothing_else(self) -> None:
        status, headers, body = await http_get(self.url)
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        (policy,) = headers.getRawHeaders(b"content-security-policy")
        self.assertIn(b"default-src 'none'", policy)
        self.assertIn(b"connect-src 'self'", policy)
        self.assertIn(b"<canvas", body.replace(b"createElement(\"canvas\")", b"<canvas"))
        self.assertNotIn(b"src=\"http", body)
        self.assertNotIn(b"href=\"http", body)


class HealthTests(MetricsServiceTestCase):
    """/healthz is 200 while serving and 503 while clients drain at shutdown."""

    def setUp(self) -> None:
        # Large enough that the reader that stops reading is never cut off.
        self.start("--max-pending", str(1 << 30))

    async def test_healthz_is_503_while_shutdown_drains_a_stalled_client(self) -> None:
        status, headers, body = await http_get(self.url + "healthz")
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(orjson.loads(body)["status"], "serving")

        publisher = await self.client("pub", "flood")
        stalled = await self.client("stalled", "flood")
        stalled.transport.pauseProducing()  # stops reading its socket
        content = "x" * 32768
        values = await scrape(self.url)
        for _ in range(400):
            for _ in range(16):
                publisher.send_json(MessageType.MESSAGE, {"room": "flood", "content": content})
            await task.deferLater(reactor, 0.005, lambda: None)
            values = await scrape(self.url)
            # Paused, then given frames it cannot take: they wait in its queue.
            if values.value("relay_connections_draining") == 1 and values.value("relay_outbound_queue_bytes"):
                break
        self.assertEqual(values.value("relay_connections_draining"), 1)
        self.assertGreater(values.value("relay_outbound_queue_bytes"), 0)

        stopped = self.service.stopService()
        status, _, body = await http_get(self.url + "healthz")
        self.assertEqual(status, 503)
        self.assertEqual(orjson.loads(body)["status"], "shutting_down")
        self.assertEqual((await scrape(self.url)).value("relay_serving"), 0)

        stalled.transport.resumeProducing()
        await stopped
        # The server closes once its last bytes are in the kernel: the
        # client has them all when it sees the close.
        await stalled.closed
        self.assertEqual(stalled.frames[-1].type, MessageType.ERROR)
        # The metrics listener stops last, once every client is gone.
        with self.assertRaises(error.ConnectionRefusedError):
            await http_get(self.url + "healthz")


class HeadTests(MetricsServiceTestCase):
    def setUp(self) -> None:
        self.start()

    async def test_head_answers_like_get_without_a_body_or_a_log_line(self) -> None:
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for path in ("healthz", "metrics", "rooms", ""):
            status, headers, body = await http_get(self.url + path, b"HEAD")
            self.assertEqual((status, body), (200, b""), path)
            (length,) = headers.getRawHeaders(b"content-length")
            self.assertGreater(int(length), 0)
        self.assertEqual([e for e in events if "HEAD" in str(e.get("log_format", ""))], [])


class RefusalTests(MetricsServiceTestCase):
    def setUp(self) -> None:
        self.start("--max-connections", "1")

    async def test_refused_connections_are_counted_by_reason(self) -> None:
        await self.client("first")
        second = await self.client()
        type_, body = await second.next_json()
        self.assertEqual(body["code"], ErrorCode.TOO_MANY_CONNECTIONS)
        await second.closed
        values = await scrape(self.url)
        self.assertEqual(values.value("relay_connections_refused_total", reason="max_connections"), 1)
        self.assertEqual(values.value("relay_connections_accepted_total"), 1)
        self.assertEqual(values.value("relay_errors_sent_total", code="TOO_MANY_CONNECTIONS"), 1)
        self.assertEqual(values.total("relay_connections"), 1)


class TransportKindTests(unittest.TestCase):
    def test_each_transport_is_named_by_what_it_provides(self) -> None:
        from twisted.internet.address import UNIXAddress
        from twisted.internet.interfaces import ISSLTransport
        from zope.interface import alsoProvides

        from relay.server.factory import transport_kind
        from relay.server.protocol import IMessageTransport

        tcp, tls, websocket = StringTransport(), StringTransport(), StringTransport()
        alsoProvides(tls, ISSLTransport)
        alsoProvides(websocket, IMessageTransport, ISSLTransport)  # wss is a WebSocket
        unix = StringTransport(hostAddress=UNIXAddress(b"/tmp/relay.sock"))
        self.assertEqual(
            [transport_kind(t) for t in (tcp, tls, websocket, unix)], ["tcp", "tls", "websocket", "unix"]
        )


class TransportLabelTests(unittest.TestCase):
    async def test_unix_connections_are_labelled_unix(self) -> None:
        path = os.path.join(tempfile.mkdtemp(), "relay.sock")
        options = Options()
        options.parseOptions(["--port", f"unix:{path}", "--metrics", "tcp:0:interface=127.0.0.1"])
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        client = await endpoints.connectProtocol(endpoints.UNIXClientEndpoint(reactor, path), FrameClient())
        self.addCleanup(lambda: client.transport.loseConnection() or client.closed)
        await client.hello(userId="u")
        values = await scrape(base_url(service.metrics_ports[0]))
        self.assertEqual(values.value("relay_connections", transport="unix"), 1)
        self.assertEqual(values.value("relay_connections", transport="tcp"), 0)
        client.transport.loseConnection()
        await client.closed
        await service.factory.wait_closed()
        values = await scrape(base_url(service.metrics_ports[0]))
        self.assertEqual(values.value("relay_connections", transport="unix"), 0)
        await defer.succeed(None)
