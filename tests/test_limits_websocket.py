"""The WebSocket/HTTP listener's limits: a request deadline, a head limit, no bodies.

A real HTTP listener from ``makeService`` on loopback, and raw TCP clients
that send exactly the bytes each attack needs.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.trial import unittest

from relay.server import websocket
from relay.server.tap import Options, makeService
from tests.support import wait_until


class RawClient(protocol.Protocol):
    """Sends what it is told; keeps what arrives; tells when it is closed."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.connected = False

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = False
        self.closed.callback(None)


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class HTTPLimitsTests(unittest.TestCase):
    deadline = 0.5

    async def setUp(self) -> None:
        self.patch(websocket.BoundedHTTPChannel, "deadline_seconds", self.deadline)
        options = Options()
        options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--websocket", "tcp:0:interface=127.0.0.1"])
        self.service = makeService(options, reactor=reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        await wait_until(lambda: len(self.service.listening_ports) == 2, "listening")
        self.http_port = self.service.listening_ports[1].getHost().port

    async def client(self) -> RawClient:
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.http_port)
        client = await endpoints.connectProtocol(endpoint, RawClient())
        self.addCleanup(lambda: client.connected and client.transport.abortConnection())
        return client

    async def closed_within(self, client: RawClient, seconds: float = 10.0) -> None:
        await wait_until(lambda: not client.connected, "the server closed the connection", seconds)

    async def trickle(self, clients: list[RawClient], data: bytes, interval: float) -> None:
        for byte in data:
            if not any(client.connected for client in clients):
                return
            for client in clients:
                if client.connected:
                    client.transport.write(bytes([byte]))
            await sleep(interval)

    async def test_a_trickled_request_line_is_dropped_at_the_deadline(self) -> None:
        clients = [await self.client() for _ in range(20)]
        await self.trickle(clients, b"GET /relay HTTP/1.1\r\nHost: x\r\n", 0.1)
        for client in clients:
            await self.closed_within(client)
            self.assertEqual(client.received, b"")

    async def test_trickled_headers_are_dropped_at_the_deadline(self) -> None:
        client = await self.client()
        client.transport.write(b"GET /relay HTTP/1.1\r\n")
        await self.trickle([client], b"X-Slow: " + b"a" * 200, 0.05)
        await self.closed_within(client)

    async def test_a_second_request_on_a_kept_alive_connection_has_a_deadline_too(self) -> None:
        client = await self.client()
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_until(lambda: b"</html>" in client.received, "the page arrived")
        await self.trickle([client], b"GET / HTTP/1.1\r\nHost: x\r\n", 0.1)
        await self.closed_within(client)

    async def test_headers_over_16_kib_get_431(self) -> None:
        client = await self.client()
        headers = b"".join(b"X-H%d: %s\r\n" % (n, b"v" * 100) for n in range(200))
        client.transport.write(b"GET /relay HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        await self.closed_within(client)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 431 "), client.received[:80])

    async def test_one_line_over_16_kib_gets_431(self) -> None:
        client = await self.client()
        client.transport.write(b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n")
        await self.closed_within(client)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 431 "), client.received[:80])

    async def test_headers_just_under_the_limit_are_served(self) -> None:
        client = await self.client()
        headers = b"X-Pad: " + b"p" * 15_000 + b"\r\n"
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        await wait_until(lambda: b"</html>" in client.received, "the page arrived")
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "))

    async def test_a_huge_body_is_refused_before_it_is_sent(self) -> None:
        client = await self.client()
        # Only the headers: twisted.web alone would wait for (and spool) 200 MiB.
        client.transport.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200\r\n\r\n")
        await self.closed_within(client)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 413 "), client.received[:80])

    async def test_a_chunked_body_is_refused_too(self) -> None:
        client = await self.client()
        client.transport.write(b"POST /relay HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await self.closed_within(client)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 413 "), client.received[:80])

    async def test_a_body_sent_with_the_headers_is_not_served(self) -> None:
        client = await self.client()
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        await self.closed_within(client)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 413 "), client.received[:80])
        self.assertNotIn(b"</html>", client.received)

    async def test_a_complete_request_is_served_as_before(self) -> None:
        client = await self.client()
        client.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await self.closed_within(client)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "))
        self.assertIn(b"</html>", client.received)


class DefaultDeadlineTests(unittest.TestCase):
    def test_the_request_deadline_is_the_opening_handshake_timeout(self) -> None:
        self.assertEqual(websocket.BoundedHTTPChannel.deadline_seconds, 10.0)
        self.assertEqual(websocket.MAX_REQUEST_HEAD, 16 * 1024)
