"""The direct write path: straight to the socket while the transport holds nothing.

Unit tests drive a RelayProtocol on a StringTransport whose handle is a
socket that takes only as many bytes as the test allows, so a partial send
happens exactly where the test wants it.  Integration tests use real
loopback TCP, TLS and Unix sockets.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any

from twisted.internet import endpoints, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from relay.server.socket_write import DrainWatch, socket_send
from relay.server.factory import RelayConfig, RelayFactory
from relay.server.protocol import State
from relay.wire import ErrorCode, MessageType, encode_json, loads
from tests.support import FrameClient, IntegrationTestCase, StringConnection, permissive_decoder, wait_until
from tests.test_tls import TLSTestCase

ROOM = "lobby"


class MeteredSocket(socket.socket):
    """A socket whose ``send`` takes at most ``budget`` more bytes, and keeps them."""

    def __init__(self) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.budget = 1 << 30
        self.taken = bytearray()
        self.sends = 0

    def send(self, data: Any, flags: int = 0) -> int:
        self.sends += 1
        if not self.budget:
            raise BlockingIOError()
        count = min(len(data), self.budget)
        self.budget -= count
        self.taken += data[:count]
        return count


class SocketTransport(StringTransport):
    """A StringTransport with a socket for a handle, as a TCP transport has."""

    def __init__(self) -> None:
        super().__init__()
        self.sock = MeteredSocket()

    def getHandle(self) -> socket.socket:
        return self.sock


def message(content: Any) -> bytes:
    return encode_json(MessageType.MESSAGE, {"room": ROOM, "content": content})


class DirectWriteTests(unittest.TestCase):
    config = RelayConfig(max_pending=64 * 1024)

    def setUp(self) -> None:
        self.factory = RelayFactory(self.config, reactor=Clock())
        self.sender = StringConnection(self.factory)
        self.sender.send(encode_json(MessageType.JOIN_ROOM, {"room": ROOM}))
        self.transport = SocketTransport()
        self.addCleanup(self.transport.sock.close)
        self.member = StringConnection(self.factory, self.transport)
        self.member.send(encode_json(MessageType.JOIN_ROOM, {"room": ROOM}))
        self.sender.received()
        self.sock = self.transport.sock

    def contents(self, data: bytes | bytearray) -> list[Any]:
        return [loads(frame.payload)["content"] for frame in permissive_decoder().feed(bytes(data))]

    def test_deliveries_go_straight_to_the_socket_not_the_transport(self) -> None:
        self.sock.taken.clear()
        sends = self.sock.sends
        self.sender.send(message(1) + message(2))
        self.sender.send(message(3))
        self.assertEqual(self.contents(self.sock.taken), [1, 2, 3])
        self.assertEqual(self.sock.sends - sends, 2)  # one per read
        self.assertEqual(self.transport.value(), b"")
        self.assertIs(self.member.protocol.state, State.OPEN)

    def test_the_join_ack_went_straight_to_the_socket_too(self) -> None:
        (frame,) = permissive_decoder().feed(bytes(self.sock.taken))
        self.assertEqual(loads(frame.payload)["status"], "joined")

    def test_a_partial_send_hands_the_rest_to_the_transport_and_pauses(self) -> None:
        self.sock.taken.clear()
        self.sock.budget = 10
        self.sender.send(message("a"))
        sent = bytes(self.sock.taken) + self.transport.value()
        self.assertEqual(self.contents(sent), ["a"])
        self.assertEqual(len(self.sock.taken), 10)
        self.assertIs(self.member.protocol.state, State.DRAINING)
        self.assertIsInstance(self.transport.producer, DrainWatch)
        self.assertFalse(self.transport.streaming)

    def test_nothing_overtakes_what_the_transport_holds_and_the_drain_resumes(self) -> None:
        self.sock.taken.clear()
        self.sock.budget = 10
        self.sender.send(message("a"))
        sends = self.sock.sends
        self.sender.send(message("b"))
        self.sender.send(message("c"))
        # Queued while the transport may still hold the rest of "a".
        self.assertEqual(self.sock.sends, sends)
        self.assertEqual(self.contents(bytes(self.sock.taken) + self.transport.value()), ["a"])
        self.assertGreater(self.member.protocol._pending_bytes, 0)
        self.sock.budget = 1 << 30
        self.transport.producer.resumeProducing()  # the transport ran dry
        self.assertIs(self.member.protocol.state, State.OPEN)
        self.assertIs(self.transport.producer, self.member.protocol)
        self.assertTrue(self.transport.streaming)
        held = self.transport.value()
        self.assertEqual(self.contents(self.sock.taken[:10] + held + self.sock.taken[10:]), ["a", "b", "c"])
        self.assertEqual(self.factory.limits.outbound.total, 0)
        # And directly again from then on.
        self.sender.send(message("d"))
        self.assertEqual(self.transport.value(), held)
        self.assertEqual(self.contents(self.sock.taken[10:])[-1], "d")

    def test_a_full_socket_counts_everything_queued_toward_max_pending(self) -> None:
        self.sock.budget = 0
        big = "x" * 16_000
        for _ in range(4):  # about 16 KB each: 64 KB, the first in the transport
            self.sender.send(message(big))
        self.assertTrue(self.member.protocol.accepting)
        self.assertGreater(self.member.protocol._pending_bytes, 4 * 16_000)
        self.assertIsInstance(self.transport.producer, DrainWatch)
        self.sender.send(message(big))
        self.assertFalse(self.member.protocol.accepting)
        self.assertEqual(self.factory.stats.errors_sent[ErrorCode.SLOW_CONSUMER], 1)
        self.assertEqual(self.factory.limits.outbound.total, 0)

    def test_a_connection_closed_while_draining_hands_the_transport_back(self) -> None:
        self.sock.budget = 10
        self.sender.send(message("a"))
        self.member.protocol.fail(ErrorCode.SERVER_SHUTDOWN, "bye")
        self.assertTrue(self.transport.disconnecting)
        self.transport.producer.resumeProducing()
        # The connection is the streaming producer again: a disconnecting
        # transport with a pull producer would wait for it forever.
        self.assertIs(self.transport.producer, self.member.protocol)
        self.assertTrue(self.transport.streaming)
        self.assertIs(self.member.protocol.state, State.CLOSING)

    def test_a_lost_connection_stops_the_watch_and_the_connection(self) -> None:
        self.sock.budget = 0
        self.sender.send(message("a"))
        self.sender.send(message("b"))
        self.transport.producer.stopProducing()
        self.assertEqual(self.member.protocol.queued_bytes, 0)


class EligibilityTests(unittest.TestCase):
    def test_only_a_transport_whose_handle_is_a_stream_socket_qualifies(self) -> None:
        transport = SocketTransport()
        self.addCleanup(transport.sock.close)
        self.assertIsNotNone(socket_send(transport))
        self.assertIsNone(socket_send(StringTransport()))

        class TLSLike(StringTransport):
            def getHandle(self) -> object:
                return object()  # a TLS connection, not the socket

        self.assertIsNone(socket_send(TLSLike()))
        datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(datagram.close)

        class DatagramLike(StringTransport):
            def getHandle(self) -> socket.socket:
                return datagram

        self.assertIsNone(socket_send(DatagramLike()))


class LoopbackDirectTests(IntegrationTestCase):
    server_config = {"max_pending": 4 * 1024 * 1024, "send_buffer": 16 * 1024}

    def server_side(self, client: FrameClient) -> Any:
        local = client.transport.getHost()
        for connection in self.factory.connections:
            if connection.transport.getPeer().port == local.port:
                return connection
        raise AssertionError("no server-side connection for this client")

    async def test_a_reader_that_pauses_then_reads_gets_every_frame_in_order(self) -> None:
        publisher = await self.connect()
        reader = await self.connect()
        await publisher.join(ROOM)
        await reader.join(ROOM)
        server_reader = self.server_side(reader)
        self.assertIsNotNone(server_reader._send)
        reader.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.transport.pauseProducing()
        count = 0
        # Until the kernel is full and a send is partial: the server pauses it.
        while server_reader.state is State.OPEN and count < 2000:
            publisher.send(message(["n", count, "y" * 2000]))
            count += 1
            await wait_until(lambda: self.factory.stats.messages_published == count, "published")
        self.assertIs(server_reader.state, State.DRAINING)
        self.assertIsNone(server_reader._send)
        for extra in range(20):  # queued while the transport holds the rest
            publisher.send(message(["n", count + extra, "z"]))
        count += 20
        reader.transport.resumeProducing()
        frames = [await reader.next_frame() for _ in range(count)]
        self.assertEqual([loads(f.payload)["content"][1] for f in frames], list(range(count)))
        await wait_until(lambda: server_reader.state is State.OPEN, "the reader resumed")
        self.assertIsNotNone(server_reader._send)
        publisher.send(message(["n", count, "after"]))
        self.assertEqual(loads((await reader.next_frame()).payload)["content"][2], "after")

    async def test_a_real_connection_stays_under_the_shared_keys_limit(self) -> None:
        client = await self.connect()
        await client.hello(features=["acks"])
        await client.join(ROOM)
        self.assertLessEqual(len(vars(self.server_side(client))), 29)


class UnixDirectTests(unittest.TestCase):
    async def test_unix_socket_deliveries_go_direct_and_arrive(self) -> None:
        factory = RelayFactory(RelayConfig(), reactor=reactor)
        path = os.path.join(tempfile.mkdtemp(), "relay.sock")
        port = await endpoints.UNIXServerEndpoint(reactor, path).listen(factory)
        self.addCleanup(port.stopListening)
        clients = []
        for _ in range(2):
            client = await endpoints.connectProtocol(endpoints.UNIXClientEndpoint(reactor, path), FrameClient())
            self.addCleanup(client.transport.loseConnection)
            await client.join(ROOM)
            clients.append(client)
        self.assertTrue(all(connection._send is not None for connection in factory.connections))
        clients[0].send(message("over unix"))
        self.assertEqual(loads((await clients[1].next_frame()).payload)["content"], "over unix")
        for client in clients:
            client.transport.loseConnection()
            await client.closed


class TLSDirectTests(TLSTestCase):
    async def test_tls_writes_through_its_transport_beside_direct_tcp(self) -> None:
        secure = await self.connect_tls()
        plain = await self.connect_tcp()
        await secure.join(ROOM)
        await plain.join(ROOM)
        by_kind = {type(c.transport).__name__: c for c in self.factory.connections}
        self.assertEqual(len(by_kind), 2)
        for name, connection in by_kind.items():
            direct = connection._send is not None
            self.assertEqual(direct, "TLS" not in name, name)
        secure.send(message("over TLS"))
        self.assertEqual(loads((await plain.next_frame()).payload)["content"], "over TLS")
        plain.send(message("over TCP"))
        self.assertEqual(loads((await secure.next_frame()).payload)["content"], "over TCP")
