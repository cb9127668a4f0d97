"""Relay over WebSocket, spoken by an independent client library.

The ``websockets`` package's blocking client runs in the reactor's thread
pool; the server stays on the reactor.
"""

from __future__ import annotations

import socket
import ssl as stdlib_ssl
import struct
import tempfile
from contextlib import ExitStack
from typing import Any

import trustme
from twisted.internet import defer, endpoints, error, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.http import HTTPChannel
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

from relay import wsmapping
from relay.client import connect as connect_relay
from relay.server import tls, websocket
from relay.server.factory import RelayConfig, RelayFactory
from relay.server.protocol import RelayProtocol, State
from relay.server.tap import Options, makeService
from relay.wire import (
    MAX_ENVELOPE,
    ErrorCode,
    Flags,
    Frame,
    MessageType,
    encode,
    encode_json,
    loads,
)
from tests.support import FrameClient, connect_frame_client, permissive_decoder, wait_until

TIMEOUT = 10.0


class WebSocketClient:
    """A Relay client on ``websockets``: each blocking call runs in a thread.

    ``next_frame`` checks the server's promise of one frame per message.
    """

    def __init__(self, connection: ClientConnection, stack: ExitStack) -> None:
        self.connection = connection
        self._stack = stack
        self._decoder = permissive_decoder()

    @classmethod
    async def open(cls, url: str, **options: Any) -> WebSocketClient:
        options.setdefault("subprotocols", ["relay.v1"])
        stack = ExitStack()
        # The handshake blocks, so even building the client is off the reactor.
        connection = await deferToThread(
            lambda: stack.enter_context(connect(url, open_timeout=TIMEOUT, **options))
        )
        return cls(connection, stack)

    async def send(self, data: bytes | str) -> None:
        await deferToThread(self.connection.send, data)

    async def next_frame(self) -> Frame:
        message = await deferToThread(self.connection.recv, TIMEOUT)
        assert isinstance(message, bytes), message
        frames = list(self._decoder.feed(message))
        assert len(frames) == 1 and not self._decoder.buffered, (frames, message)
        return frames[0]

    async def next_json(self) -> tuple[int, dict[str, Any]]:
        frame = await self.next_frame()
        assert frame.flags & Flags.JSON, frame
        return frame.type, loads(frame.payload)

    async def request(self, type_: MessageType, body: Any) -> tuple[int, dict[str, Any]]:
        await self.send(encode_json(type_, body))
        return await self.next_json()

    async def closed_with(self) -> tuple[int | None, str | None]:
        """Read until the server closes; the close code and reason it sent."""
        try:
            while True:
                await deferToThread(self.connection.recv, TIMEOUT)
        except ConnectionClosed as closed:
            if closed.rcvd is None:
                return None, None
            return closed.rcvd.code, closed.rcvd.reason

    def close(self) -> defer.Deferred[None]:
        return deferToThread(self._stack.close)


class SansIOClient:
    """The ``websockets`` sans-IO client against the real site, over a StringTransport.

    The bytes go through twisted.web's HTTP channel and autobahn as they
    would from a socket, so a test sees exactly what the server wrote.
    """

    def __init__(self, site: Any) -> None:
        self.stream = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self._lost = False
        channel = site.buildProtocol(self.stream.getPeer())
        # As on a socket, the stream names its protocol; the upgrade replaces it.
        self.stream.protocol = channel
        channel.makeConnection(self.stream)
        self.producer_before_upgrade = self.stream.producer
        self.peer = ClientProtocol(
            parse_uri("ws://127.0.0.1/relay"), subprotocols=[wsmapping.SUBPROTOCOL]
        )
        self.peer.send_request(self.peer.connect())
        self.send_pending()
        [response] = self.received()
        assert response.status_code == 101, response

    @property
    def websocket(self) -> Any:
        """The server's WebSocket protocol, once the upgrade took the stream over."""
        return self.stream.protocol

    def send_pending(self) -> None:
        for data in self.peer.data_to_send():
            if data:  # b"" would mean end of stream
                self.websocket.dataReceived(data)

    def received(self) -> list[Any]:
        """What the client made of the bytes the server wrote since the last call."""
        self.peer.receive_data(self.stream.value())
        self.stream.clear()
        return self.peer.events_received()

    def lose(self, reason: Exception) -> None:
        """The stream ends, once, as a socket's would even after an abort.

        This also ends autobahn's timers, which run on the global reactor.
        """
        if not self._lost:
            self._lost = True
            self.websocket.connectionLost(Failure(reason))


class RecordingRelayProtocol(RelayProtocol):
    """A RelayProtocol that keeps the reasons it was given in ``connectionLost``."""

    def __init__(self, factory: RelayFactory) -> None:
        super().__init__(factory)
        self.lost_with: list[Any] = []

    def connectionLost(self, reason: Any = None) -> None:
        self.lost_with.append(reason)
        super().connectionLost(reason)


class RecordingRelayFactory(RelayFactory):
    """Builds ``RecordingRelayProtocol``s."""

    def buildProtocol(self, addr: Any) -> RelayProtocol:
        return RecordingRelayProtocol(self)


class ServerAdapterUnitTests(unittest.TestCase):
    """The server adapter, byte for byte, with the relay factory on a Clock."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.factory = RecordingRelayFactory(RelayConfig(), reactor=self.clock)
        self.site = websocket.make_site(self.factory)

    def open(self) -> tuple[SansIOClient, Any]:
        """A client through the upgrade, and its relay connection."""
        client = SansIOClient(self.site)
        self.addCleanup(client.lose, error.ConnectionDone())
        (relay,) = self.factory.connections
        return client, relay

    def test_relay_connection_replaces_the_http_channel_as_the_streams_producer(self) -> None:
        client, relay = self.open()
        # twisted.web registered the channel that read the upgrade request.
        self.assertIsInstance(client.producer_before_upgrade, HTTPChannel)
        self.assertIs(client.stream.producer, relay)
        self.assertTrue(client.stream.streaming)
        client.stream.producer.pauseProducing()
        self.assertIs(relay.state, State.DRAINING)
        client.stream.producer.resumeProducing()
        self.assertIs(relay.state, State.OPEN)

    def test_relay_connection_is_lost_with_the_streams_own_failure(self) -> None:
        for reason in (error.ConnectionDone(), error.ConnectionLost(), error.ConnectionAborted()):
            client, relay = self.open()
            client.lose(reason)
            self.assertIs(relay.state, State.CLOSED)
            [failure] = relay.lost_with
            self.assertIs(failure.value, reason)

    def test_idle_http_connection_closes_on_the_relay_factorys_clock(self) -> None:
        stream = StringTransport()
        channel = self.site.buildProtocol(None)
        channel.makeConnection(stream)
        self.addCleanup(channel.connectionLost, Failure(error.ConnectionDone()))
        self.clock.advance(self.factory.config.idle_timeout)
        self.assertTrue(stream.disconnecting)

    def test_abort_closes_the_websocket_at_once(self) -> None:
        client, relay = self.open()
        relay.transport.abortConnection()
        relay.transport.write(encode(MessageType.HEARTBEAT, 0, b"late"))
        relay.transport.loseConnection()
        self.assertTrue(client.stream.disconnected)
        self.assertEqual(client.received(), [])


class WebSocketTestCase(unittest.TestCase):
    """A Relay factory behind a WebSocket site and a plain TCP listener."""

    config: dict[str, Any] = {}
    allowed_origins: tuple[str, ...] = ("*",)
    factory_class = RelayFactory

    async def setUp(self) -> None:
        self.factory = self.factory_class(RelayConfig(**self.config), reactor=reactor)
        site = websocket.make_site(self.factory, self.allowed_origins)
        self.http_port = await self.listen(site)
        self.tcp_port = await self.listen(self.factory)
        self.addCleanup(self.factory.wait_closed)

    async def listen(self, factory: Any, description: str = "tcp:0:interface=127.0.0.1") -> Any:
        port = await endpoints.serverFromString(reactor, description).listen(factory)
        self.addCleanup(port.stopListening)
        return port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port.getHost().port}/relay"

    async def connect_ws(self, **options: Any) -> WebSocketClient:
        client = await WebSocketClient.open(options.pop("url", self.url), **options)
        self.addCleanup(client.close)
        return client

    async def connect_tcp(self) -> FrameClient:
        return await connect_frame_client(self, self.tcp_port)

    def server_side(self, user_id: str) -> Any:
        """The server's connection for ``user_id``."""
        (connection,) = [c for c in self.factory.connections if c.user_id == user_id]
        return connection


class ExchangeTests(WebSocketTestCase):
    async def test_websocket_and_tcp_clients_exchange_messages_both_ways(self) -> None:
        browser = await self.connect_ws()
        self.assertEqual(browser.connection.subprotocol, "relay.v1")
        terminal = await self.connect_tcp()
        _, hello = await browser.request(MessageType.HELLO, {"userId": "web"})
        self.assertEqual(hello["userId"], "web")
        await terminal.hello(userId="term")
        await browser.request(MessageType.JOIN_ROOM, {"room": "r"})
        await terminal.join("r")
        await browser.send(encode_json(MessageType.MESSAGE, {"room": "r", "content": "from ws"}))
        _, body = await terminal.next_json()
        self.assertEqual((body["from"], body["content"]), ("web", "from ws"))
        terminal.send_json(MessageType.MESSAGE, {"room": "r", "content": "from tcp"})
        type_, body = await browser.next_json()
        self.assertEqual((type_, body["from"], body["content"]), (MessageType.MESSAGE, "term", "from tcp"))

    async def test_the_socket_under_a_websocket_sends_without_nagle_delay(self) -> None:
        # As on TCP: a chat delivery must not wait for the peer's delayed ACK.
        browser = await self.connect_ws()
        await browser.request(MessageType.HELLO, {"userId": "web"})
        sock = self.server_side("web").transport.stream.getHandle()
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)

    async def joined_pair(self) -> tuple[WebSocketClient, FrameClient]:
        """A WebSocket member ("web") and a TCP member ("term") of room r."""
        browser = await self.connect_ws()
        await browser.request(MessageType.HELLO, {"userId": "web"})
        await browser.request(MessageType.JOIN_ROOM, {"room": "r"})
        terminal = await self.connect_tcp()
        await terminal.hello(userId="term")
        await terminal.join("r")
        websocket = self.server_side("web").transport._websocket
        await wait_until(lambda: websocket._direct is not None, "direct writes after the handshake")
        return browser, terminal

    async def test_deliveries_go_straight_to_the_socket_once_the_handshake_has_gone(self) -> None:
        browser, terminal = await self.joined_pair()
        stream = self.server_side("web").transport.stream
        buffered: list[bytes] = []
        write = stream.write
        stream.write = lambda data: (buffered.append(data), write(data))
        for n in range(20):
            terminal.send_json(MessageType.MESSAGE, {"room": "r", "content": n})
        self.assertEqual([(await browser.next_json())[1]["content"] for _ in range(20)], list(range(20)))
        self.assertEqual(buffered, [])

    async def test_autobahn_s_pongs_and_direct_deliveries_share_the_socket_frame_by_frame(self) -> None:
        browser, terminal = await self.joined_pair()
        for n in range(300):
            terminal.send_json(MessageType.MESSAGE, {"room": "r", "content": n})
            if n == 150:
                pong = await deferToThread(browser.connection.ping, b"still there?")
        # next_frame asserts one whole Relay frame per message.
        self.assertEqual([(await browser.next_json())[1]["content"] for _ in range(300)], list(range(300)))
        self.assertTrue(await deferToThread(pong.wait, TIMEOUT))

    async def test_frame_split_across_two_messages(self) -> None:
        client = await self.connect_ws()
        frame = encode_json(MessageType.JOIN_ROOM, {"room": "split", "id": 9})
        await client.send(frame[:5])
        await client.send(frame[5:])
        type_, body = await client.next_json()
        self.assertEqual((type_, body["room"], body["id"]), (MessageType.JOIN_ROOM, "split", 9))

    async def test_frames_sharing_a_message_are_answered_one_per_message(self) -> None:
        client = await self.connect_ws()
        await client.send(encode(MessageType.HEARTBEAT, 0, b"a") + encode(MessageType.HEARTBEAT, 0, b"b"))
        self.assertEqual((await client.next_frame()).payload, b"a")
        self.assertEqual((await client.next_frame()).payload, b"b")

    async def test_binary_subprotocol_accepted(self) -> None:
        client = await self.connect_ws(subprotocols=["binary"])
        self.assertEqual(client.connection.subprotocol, "binary")

    async def test_client_offering_no_subprotocol_is_served(self) -> None:
        client = await self.connect_ws(subprotocols=None)
        self.assertIsNone(client.connection.subprotocol)
        await client.send(encode(MessageType.HEARTBEAT, 0, b""))
        self.assertEqual((await client.next_frame()).type, MessageType.HEARTBEAT)

    async def test_client_offering_only_other_subprotocols_is_served_without_one(self) -> None:
        client = await self.connect_ws(subprotocols=["chat"])
        self.assertIsNone(client.connection.subprotocol)

    async def test_any_origin_by_default_even_null(self) -> None:
        for origin in ("https://anywhere.example", "null"):
            client = await self.connect_ws(origin=origin)
            await client.send(encode(MessageType.HEARTBEAT, 0, b""))
            self.assertEqual((await client.next_frame()).type, MessageType.HEARTBEAT)

    async def test_client_close_cleans_up_rooms(self) -> None:
        client = await self.connect_ws()
        await client.request(MessageType.JOIN_ROOM, {"room": "gone"})
        await client.close()
        await self.factory.wait_closed()
        self.assertIsNone(self.factory.registry.get("gone"))


class LimitTests(WebSocketTestCase):
    config = {"max_frame_size": 1024}

    async def test_text_message_closed_with_1003_and_a_reason(self) -> None:
        client = await self.connect_ws()
        await client.send("hello")
        self.assertEqual(
            await client.closed_with(), (wsmapping.CloseCode.UNSUPPORTED_DATA, wsmapping.TEXT_REFUSED)
        )

    async def test_message_larger_than_one_full_frame_closed_with_1009(self) -> None:
        client = await self.connect_ws()
        await client.send(bytes(wsmapping.max_message_size(1024) + 1))
        code, _ = await client.closed_with()
        self.assertEqual(code, wsmapping.CloseCode.MESSAGE_TOO_BIG)

    async def test_message_of_one_full_frame_accepted(self) -> None:
        client = await self.connect_ws()
        payload = b"x" * (1024 - 3)
        await client.send(encode(MessageType.HEARTBEAT, Flags.BINARY, payload))
        self.assertEqual((await client.next_frame()).payload, payload)

    async def test_delivery_of_a_full_frame_reaches_a_websocket_member(self) -> None:
        member = await self.connect_ws()
        await member.request(MessageType.JOIN_ROOM, {"room": "big"})
        publisher = await self.connect_tcp()
        await publisher.join("big")
        frame = full_message_frame("big", 1024, "full")
        publisher.send(frame)
        type_, body = await member.next_json()
        self.assertEqual((type_, body["content"]), (MessageType.MESSAGE, loads(frame[7:])["content"]))
        # The publisher's connection is untouched by the bigger delivery.
        publisher.send_frame(MessageType.HEARTBEAT)
        self.assertEqual((await publisher.next_frame()).type, MessageType.HEARTBEAT)

    async def test_oversize_frame_header_gets_frame_too_large(self) -> None:
        client = await self.connect_ws()
        await client.send(struct.pack("!IBBB", 1025, 1, MessageType.MESSAGE, 0))
        type_, body = await client.next_json()
        self.assertEqual((type_, body["code"], body["fatal"]), (MessageType.ERROR, ErrorCode.FRAME_TOO_LARGE, True))
        self.assertEqual(await client.closed_with(), (wsmapping.CloseCode.NORMAL, ""))

    def test_limits_follow_the_relay_config(self) -> None:
        factory = websocket.RelayWebSocketFactory(
            RelayFactory(RelayConfig(max_frame_size=1000, idle_timeout=40), reactor=reactor)
        )
        # The largest delivery: a full frame, the envelope and the length prefix.
        self.assertEqual(factory.maxMessagePayloadSize, 1000 + MAX_ENVELOPE + 4)
        self.assertEqual(factory.maxFramePayloadSize, 1000 + MAX_ENVELOPE + 4)
        self.assertEqual((factory.autoPingInterval, factory.autoPingTimeout), (20, 20))
        self.assertEqual(factory.openHandshakeTimeout, websocket.OPEN_HANDSHAKE_TIMEOUT)


class ConnectionLostTests(WebSocketTestCase):
    """The relay connection learns how its WebSocket ended, as on TCP."""

    factory_class = RecordingRelayFactory

    async def hello(self, user_id: str) -> tuple[WebSocketClient, Any]:
        client = await self.connect_ws()
        await client.request(MessageType.HELLO, {"userId": user_id})
        return client, self.server_side(user_id)

    async def test_clean_close_by_the_client_ends_it_with_connection_done(self) -> None:
        client, relay = await self.hello("leaving")
        await client.close()
        await self.factory.wait_closed()
        [failure] = relay.lost_with
        self.assertIsInstance(failure, Failure)
        self.assertIsInstance(failure.value, error.ConnectionDone)

    async def test_abort_ends_it_with_connection_aborted(self) -> None:
        client, relay = await self.hello("aborted")
        relay.transport.abortConnection()
        await self.factory.wait_closed()
        [failure] = relay.lost_with
        self.assertIsInstance(failure.value, error.ConnectionAborted)
        self.assertEqual(await client.closed_with(), (None, None))


class ClientAdapterTests(WebSocketTestCase):
    """The client library's WebSocket adapter against the real server."""

    config = {"max_frame_size": 1024}

    async def test_write_sequence_of_full_frames_is_sent_message_by_message(self) -> None:
        web = await connect_relay(reactor, self.url, user="web")
        self.addCleanup(web.disconnect)
        await web.join("r")
        listener = await self.connect_tcp()
        await listener.join("r")
        frames = [full_message_frame("r", 1024, str(number)) for number in range(2)]
        # Joined into one message, the two would pass the server's limit.
        self.assertGreater(sum(map(len, frames)), wsmapping.max_message_size(1024))
        web.transport.writeSequence(frames)
        self.assertGreaterEqual(await web.heartbeat(), 0)
        contents = [(await listener.next_json())[1]["content"] for _ in frames]
        self.assertEqual([content[0] for content in contents], ["0", "1"])


def full_message_frame(room: str, max_frame_size: int, tag: str) -> bytes:
    """A JSON MESSAGE frame to ``room`` whose length is exactly ``max_frame_size``."""
    body = {"room": room, "content": tag}
    padding = max_frame_size - len(encode_json(MessageType.MESSAGE, body)) + 4
    frame = encode_json(MessageType.MESSAGE, {"room": room, "content": tag + "x" * padding})
    assert len(frame) == 4 + max_frame_size, len(frame)
    return frame


class OriginTests(WebSocketTestCase):
    allowed_origins = ("http://good.example",)

    async def test_allowed_origin_accepted(self) -> None:
        client = await self.connect_ws(origin="http://good.example")
        await client.send(encode(MessageType.HEARTBEAT, 0, b""))
        self.assertEqual((await client.next_frame()).type, MessageType.HEARTBEAT)

    async def test_null_origin_refused_unless_any_origin_is_allowed(self) -> None:
        with self.assertRaises(InvalidStatus):
            await self.connect_ws(origin="null")

    async def test_other_origin_refused_at_the_handshake(self) -> None:
        with self.assertRaises(InvalidStatus) as caught:
            await self.connect_ws(origin="http://evil.example")
        self.assertEqual(caught.exception.response.status_code, 400)
        self.assertIn("not allowed", caught.exception.response.reason_phrase)
        self.assertEqual(self.factory.connections, set())

    def test_origins_without_a_port_get_their_scheme_default(self) -> None:
        self.assertEqual(
            websocket.origin_patterns(["*", "http://a.example", "https://*.b.example", "http://c:8080"]),
            ["*", "http://a.example:80", "https://*.b.example:443", "http://c:8080"],
        )


class BackpressureTests(WebSocketTestCase):
    config = {"max_pending": 256 * 1024}

    async def test_paused_websocket_drains_then_is_cut_off_as_slow_consumer(self) -> None:
        closing: list[dict[str, Any]] = []
        observer = lambda event: closing.append(event) if "code" in event and "conn" in event else None
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        # A reader that stops reading once one message is buffered.
        slow = await self.connect_ws(max_queue=1)
        await slow.request(MessageType.HELLO, {"userId": "slow"})
        await slow.request(MessageType.JOIN_ROOM, {"room": "flood"})
        publisher = await self.connect_tcp()
        await publisher.join("flood")
        connection = self.server_side("slow")
        content = "x" * 60_000
        seen = set()
        for _ in range(2000):
            if connection.state is State.CLOSED:
                break
            seen.add(connection.state)
            # One message per round, so DRAINING lasts several rounds.
            publisher.send_json(MessageType.MESSAGE, {"room": "flood", "content": content})
            # The publisher is never stalled: its heartbeat comes straight back.
            publisher.send_frame(MessageType.HEARTBEAT)
            self.assertEqual((await publisher.next_frame()).type, MessageType.HEARTBEAT)
        self.assertIn(State.DRAINING, seen)
        self.assertIs(connection.state, State.CLOSED)
        codes = [event["code"] for event in closing if event["conn"] == connection.connection_id]
        self.assertEqual(codes, [ErrorCode.SLOW_CONSUMER.value])


class SecureWebSocketTests(unittest.TestCase):
    """wss with client certificates: the certificate names the user."""

    async def test_wss_client_certificate_names_the_user(self) -> None:
        ca = trustme.CA()
        server_cert = ca.issue_cert("localhost", "127.0.0.1")
        client_cert = ca.issue_cert("carol.example", common_name="carol")
        directory = FilePath(tempfile.mkdtemp(prefix="relay-wss-"))
        self.addCleanup(directory.remove)
        paths = {}
        for name, blob in (
            ("key", server_cert.private_key_pem),
            ("cert", server_cert.cert_chain_pems[0]),
            ("ca", ca.cert_pem),
        ):
            paths[name] = directory.child(f"{name}.pem").path
            blob.write_to_path(paths[name])
        factory = RelayFactory(RelayConfig(), reactor=reactor)
        description = f"ssl:0:privateKey={paths['key']}:certKey={paths['cert']}:interface=127.0.0.1"
        listening = endpoints.serverFromString(reactor, tls.endpoint_description(description, paths["ca"]))
        port = await listening.listen(websocket.make_site(factory))
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.wait_closed)
        context = stdlib_ssl.create_default_context()
        ca.configure_trust(context)
        client_cert.configure_cert(context)
        client = await WebSocketClient.open(f"wss://localhost:{port.getHost().port}/relay", ssl=context)
        self.addCleanup(client.close)
        _, hello = await client.request(MessageType.HELLO, {})
        self.assertEqual(hello["userId"], "carol")


class DemoPageTests(WebSocketTestCase):
    async def test_demo_page_served_at_the_root(self) -> None:
        response = await Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{self.http_port.getHost().port}/".encode()
        )
        body = await readBody(response)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"]
        )
        for element in (b'id="connect"', b'id="join"', b'id="send"', b'id="log"', b'id="status"'):
            self.assertIn(element, body)


class ServiceTests(unittest.TestCase):
    """``twistd relay --websocket ...`` end to end."""

    async def test_websocket_option_serves_relay_next_to_tcp(self) -> None:
        options = Options()
        options.parseOptions(
            ["--port", "tcp:0:interface=127.0.0.1", "--websocket", "tcp:0:interface=127.0.0.1"]
        )
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        tcp_port, http_port = service.listening_ports
        client = await WebSocketClient.open(f"ws://127.0.0.1:{http_port.getHost().port}/relay")
        self.addCleanup(client.close)
        _, joined = await client.request(MessageType.JOIN_ROOM, {"room": "svc"})
        self.assertEqual(joined["members"], 1)

    def test_allowed_origins_comma_separated_and_repeatable(self) -> None:
        options = Options()
        options.parseOptions(
            ["--allowed-origins", "https://a.example, https://b.example", "--allowed-origins", "http://c"]
        )
        self.assertEqual(
            options["allowed-origins"], ["https://a.example", "https://b.example", "http://c"]
        )

    def test_any_origin_by_default(self) -> None:
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["allowed-origins"], ["*"])
