"""Tests for relay.client: unit tests on a StringTransport and a Clock, and
integration tests against the real server over loopback TCP, TLS and UNIX
sockets."""

from __future__ import annotations

import io
import os
import shutil
import socket
import tempfile
from typing import Any

import trustme
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, endpoints, error, reactor, ssl, task
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from twisted.trial import unittest
from websockets.frames import Close, Opcode
from websockets.server import ServerProtocol
from zope.interface import implementer

from relay import wsmapping
from relay.client import (
    HELLO_TIMEOUT_SECONDS,
    MISSED_HEARTBEATS,
    BinaryRoomWriter,
    Message,
    ReconnectingClient,
    RelayClientProtocol,
    RelayError,
    build_endpoint,
    connect,
)
from relay.client.websocket import WebSocketClientEndpoint
from relay.server.factory import RelayFactory
from relay.wire import (
    MAX_ENVELOPE,
    ErrorCode,
    Flags,
    Frame,
    MessageType,
    encode,
    encode_binary_delivery,
    encode_error,
    encode_json,
    loads,
)
from tests.support import IntegrationTestCase, permissive_decoder

# Unit tests: the protocol against a fake server made of frames.


def hello_ack(request_id: int = 1, interval: int = 30, max_frame_size: int = 1024) -> bytes:
    return encode_json(
        MessageType.HELLO,
        {
            "id": request_id,
            "status": "connected",
            "connectionId": "c0ffee",
            "userId": "alice",
            "serverVersion": "test",
            "heartbeatInterval": interval,
            "maxFrameSize": max_frame_size,
            "features": [],
        },
    )


def sent_frames(transport: StringTransport) -> list[Frame]:
    """The frames the client wrote since the last call."""
    frames = list(permissive_decoder().feed(transport.value()))
    transport.clear()
    return frames


class ProtocolUnitTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.client = RelayClientProtocol(self.clock, user="alice", echo=True)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.errors: list[RelayError] = []
        self.client.on_error = self.errors.append

    def ready(self, **ack: Any) -> None:
        self.client.dataReceived(hello_ack(**ack))
        self.assertTrue(self.client.ready.called)
        self.transport.clear()

    def test_hello_is_sent_first_and_ready_fires_on_its_ack(self) -> None:
        [hello] = sent_frames(self.transport)
        self.assertEqual(hello.type, MessageType.HELLO)
        body = loads(hello.payload)
        self.assertEqual((body["userId"], body["echo"]), ("alice", True))
        self.assertFalse(self.client.ready.called)
        self.client.dataReceived(hello_ack(request_id=body["id"]))
        self.assertIs(self.successResultOf(self.client.ready), self.client)
        self.assertEqual(self.client.user_id, "alice")

    def test_replies_out_of_order_are_matched_by_id(self) -> None:
        self.ready()
        first = self.client.join("a")
        second = self.client.join("b")
        ids = [loads(frame.payload)["id"] for frame in sent_frames(self.transport)]
        self.assertEqual(len(set(ids)), 2)
        for request_id, room in reversed(list(zip(ids, "ab"))):
            self.client.dataReceived(encode_json(
                MessageType.JOIN_ROOM, {"id": request_id, "status": "joined", "room": room, "members": 1}
            ))
        self.assertEqual(self.successResultOf(first)["room"], "a")
        self.assertEqual(self.successResultOf(second)["room"], "b")

    def test_forbidden_fails_the_matching_request(self) -> None:
        self.ready()
        joining = self.client.join("secret")
        [frame] = sent_frames(self.transport)
        request_id = loads(frame.payload)["id"]
        self.client.dataReceived(encode_error(ErrorCode.FORBIDDEN, "not for you", request_id))
        failure = self.failureResultOf(joining, RelayError)
        self.assertIs(failure.value.code, ErrorCode.FORBIDDEN)
        self.assertEqual(failure.value.message, "not for you")
        self.assertFalse(failure.value.fatal)
        self.assertFalse(self.transport.disconnecting)

    def test_rate_limited_send_reaches_on_error_with_its_id(self) -> None:
        self.ready()
        self.successResultOf(self.client.send("lobby", "spam"))
        [frame] = sent_frames(self.transport)
        request_id = loads(frame.payload)["id"]
        self.client.dataReceived(encode_error(ErrorCode.RATE_LIMITED, "slow down", request_id))
        [refusal] = self.errors
        self.assertIs(refusal.code, ErrorCode.RATE_LIMITED)
        self.assertEqual(refusal.request_id, request_id)
        self.assertFalse(self.transport.disconnecting)

    def test_unknown_error_code_is_kept_as_text(self) -> None:
        self.ready()
        self.client.dataReceived(encode_json(
            MessageType.ERROR, {"code": "SOMETHING_NEW", "message": "hm", "fatal": False}
        ))
        [refusal] = self.errors
        self.assertEqual(refusal.code, "SOMETHING_NEW")

    def test_fatal_error_fails_everything_pending_and_closes(self) -> None:
        self.ready()
        joining = self.client.join("a")
        pinging = self.client.heartbeat()
        self.client.dataReceived(encode_error(ErrorCode.SERVER_SHUTDOWN, "bye"))
        self.assertTrue(self.transport.disconnecting)
        for pending in (joining, pinging):
            failure = self.failureResultOf(pending, RelayError)
            self.assertIs(failure.value.code, ErrorCode.SERVER_SHUTDOWN)
            self.assertTrue(failure.value.fatal)
        self.client.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.client.close_reason.check(RelayError))

    def test_nothing_is_read_after_a_fatal_error(self) -> None:
        self.ready()
        received: list[Message] = []
        self.client.on_message = received.append
        delivery = encode_json(MessageType.MESSAGE, {"room": "r", "from": "x", "content": 1})
        self.client.dataReceived(encode_error(ErrorCode.SLOW_CONSUMER, "too slow") + delivery)
        self.client.dataReceived(delivery)
        self.assertEqual(received, [])

    def test_lost_connection_fails_pending_with_connection_lost(self) -> None:
        self.ready()
        joining = self.client.join("a")
        self.client.connectionLost(Failure(error.ConnectionDone()))
        self.failureResultOf(joining, error.ConnectionLost)
        self.failureResultOf(self.client.join("b"), error.ConnectionLost)

    def test_wrapping_transport_may_report_loss_as_none(self) -> None:
        self.ready()
        joining = self.client.join("a")
        self.client.connectionLost(None)
        self.failureResultOf(joining, error.ConnectionLost)
        self.successResultOf(self.client.when_closed())

    def test_lost_before_hello_ack_fails_ready(self) -> None:
        self.client.connectionLost(Failure(error.ConnectionLost("gone")))
        self.failureResultOf(self.client.ready, error.ConnectionLost)

    def test_server_that_never_acks_hello_is_dropped(self) -> None:
        self.clock.advance(HELLO_TIMEOUT_SECONDS)
        self.assertTrue(self.transport.disconnecting)
        self.failureResultOf(self.client.ready, error.ConnectionLost)

    def test_cancelling_ready_aborts_the_connection(self) -> None:
        self.client.ready.cancel()
        self.failureResultOf(self.client.ready, defer.CancelledError)
        self.assertTrue(self.transport.disconnecting)
        self.client.connectionLost(Failure(error.ConnectionAborted()))

    def test_heartbeats_follow_the_advertised_interval(self) -> None:
        self.ready(interval=5)
        self.clock.advance(4.9)
        self.assertEqual(sent_frames(self.transport), [])
        self.clock.advance(0.1)
        [ping] = sent_frames(self.transport)
        self.assertEqual(ping.type, MessageType.HEARTBEAT)
        # The server echoes: the connection stays up however long it lasts.
        for _ in range(10):
            self.client.dataReceived(encode(MessageType.HEARTBEAT, ping.flags, ping.payload))
            self.clock.advance(5)
            [ping] = sent_frames(self.transport)
        self.assertFalse(self.transport.disconnecting)

    def test_silent_server_is_dropped_after_two_intervals(self) -> None:
        self.ready(interval=5)
        pinging = self.client.heartbeat()
        self.clock.advance(MISSED_HEARTBEATS * 5 - 0.1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnecting)
        failure = self.failureResultOf(pinging, error.ConnectionLost)
        self.assertIn("no frame from the server", str(failure.value))

    def test_heartbeat_fires_with_round_trip_time(self) -> None:
        self.ready()
        pinging = self.client.heartbeat()
        [ping] = sent_frames(self.transport)
        self.clock.advance(0.25)
        self.client.dataReceived(encode(MessageType.HEARTBEAT, ping.flags, ping.payload))
        self.assertAlmostEqual(self.successResultOf(pinging), 0.25)

    def test_deliveries_may_exceed_the_frame_limit_by_the_envelope(self) -> None:
        self.ready(max_frame_size=1024)
        received: list[Message] = []
        self.client.on_message = received.append
        payload = encode_binary_delivery("r", "bob", b"")
        largest = payload + b"x" * (1024 + MAX_ENVELOPE - 3 - len(payload))
        self.client.dataReceived(encode(MessageType.MESSAGE, Flags.BINARY, largest))
        self.assertEqual(len(received), 1)
        self.assertTrue(received[0].binary)
        self.client.dataReceived(encode(MessageType.MESSAGE, Flags.BINARY, largest + b"x"))
        self.assertTrue(self.transport.disconnecting)

    def test_oversize_send_is_refused_before_writing(self) -> None:
        self.ready(max_frame_size=1024)
        self.failureResultOf(self.client.send_binary("r", b"x" * 2048), ValueError)
        self.assertEqual(self.transport.value(), b"")

    def test_registered_producer_is_the_transports(self) -> None:
        self.ready()
        producer = RecordingProducer()
        self.client.registerProducer(producer, True)
        self.assertIs(self.transport.producer, producer)
        self.assertTrue(self.transport.streaming)
        self.client.unregisterProducer()
        self.assertIsNone(self.transport.producer)


class EndpointTests(unittest.TestCase):
    def test_tls_options_need_a_tls_description(self) -> None:
        with self.assertRaises(ValueError):
            build_endpoint(reactor, "tcp:host=127.0.0.1:port=4000", ca_file="ca.pem")

    def test_tls_description_needs_host_and_port(self) -> None:
        with self.assertRaises(ValueError):
            build_endpoint(reactor, "tls:host=relay.example", ca_file="ca.pem")

    def test_plain_descriptions_go_to_twisted(self) -> None:
        endpoint = build_endpoint(reactor, "tcp:host=127.0.0.1:port=4000")
        self.assertIsInstance(endpoint, endpoints.TCP4ClientEndpoint)


@implementer(IStreamClientEndpoint)
class StringTransportEndpoint:
    """Connects a factory's protocol to a StringTransport the test reads and feeds."""

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.protocol: Any = None

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return defer.succeed(self.protocol)


class WebSocketStreamTransportTests(unittest.TestCase):
    """The client adapter over a real autobahn protocol, with the
    ``websockets`` sans-IO server as the peer, byte for byte."""

    def setUp(self) -> None:
        self.inner = StringTransportEndpoint()
        endpoint = WebSocketClientEndpoint(
            reactor, self.inner, "ws://relay.example/relay", wsmapping.SUBPROTOCOL
        )
        opening = endpoint.connect(Factory.forProtocol(Protocol))
        self.peer = ServerProtocol(subprotocols=[wsmapping.SUBPROTOCOL])
        [request] = self.peer_events()
        self.peer.send_response(self.peer.accept(request))
        self.to_client()
        self.wrapped = self.successResultOf(opening)
        # Ends autobahn's timers, which run on the global reactor.
        self.addCleanup(self.inner.protocol.connectionLost, Failure(error.ConnectionDone()))

    def peer_events(self) -> list[Any]:
        """What the server peer made of the bytes the client wrote."""
        self.peer.receive_data(self.inner.transport.value())
        self.inner.transport.clear()
        return self.peer.events_received()

    def to_client(self) -> None:
        for data in self.peer.data_to_send():
            self.inner.protocol.dataReceived(data)

    def test_write_sequence_sends_each_element_as_a_message_of_its_own(self) -> None:
        first = encode(MessageType.HEARTBEAT, 0, b"a")
        second = encode(MessageType.HEARTBEAT, 0, b"b")
        self.wrapped.transport.writeSequence([first, second])
        messages = [(frame.opcode, frame.data) for frame in self.peer_events()]
        self.assertEqual(messages, [(Opcode.BINARY, first), (Opcode.BINARY, second)])

    def test_writes_after_lose_connection_are_dropped(self) -> None:
        self.wrapped.transport.loseConnection()
        self.wrapped.transport.write(encode(MessageType.HEARTBEAT, 0, b"late"))
        [close] = self.peer_events()
        self.assertEqual(close.opcode, Opcode.CLOSE)
        self.assertEqual(Close.parse(close.data).code, wsmapping.CloseCode.NORMAL)
        self.to_client()  # the peer's reply completes the closing handshake

    def test_text_message_from_the_server_is_refused_with_1003(self) -> None:
        self.peer.send_text(b"hello")
        self.to_client()
        [close] = self.peer_events()
        self.assertEqual(
            Close.parse(close.data),
            Close(wsmapping.CloseCode.UNSUPPORTED_DATA, wsmapping.TEXT_REFUSED),
        )
        self.to_client()

    def test_abort_drops_the_socket_at_once_without_a_close_frame(self) -> None:
        self.wrapped.transport.registerProducer(RecordingProducer(), True)
        self.wrapped.transport.abortConnection()
        self.wrapped.transport.write(encode(MessageType.HEARTBEAT, 0, b"late"))
        self.assertTrue(self.inner.transport.disconnected)
        self.assertIsNone(self.inner.transport.producer)
        self.assertEqual(self.inner.transport.value(), b"")

    def test_producers_are_registered_on_the_socket_underneath(self) -> None:
        producer = RecordingProducer()
        self.wrapped.transport.registerProducer(producer, True)
        self.assertIs(self.inner.transport.producer, producer)
        self.wrapped.transport.unregisterProducer()
        self.assertIsNone(self.inner.transport.producer)


# Integration tests against the real server.


def endpoint_of(port: Any) -> str:
    return f"tcp:host=127.0.0.1:port={port.getHost().port}"


class ClientIntegrationTests(IntegrationTestCase):
    # Some of these pipeline hundreds of joins: the join rate has tests of its own.
    server_config = {"max_rooms": 50, "join_rate": None}

    async def client(self, **options: Any) -> RelayClientProtocol:
        client = await connect(reactor, endpoint_of(self.port), **options)
        self.addCleanup(client.disconnect)
        return client

    async def test_two_clients_chat_in_a_room(self) -> None:
        alice = await self.client(user="alice")
        bob = await self.client(user="bob")
        self.assertEqual((await alice.join("lobby"))["members"], 1)
        self.assertEqual((await bob.join(" lobby "))["room"], "lobby")
        heard: list[Message] = []
        bob.on_message = heard.append
        stream = bob.messages()
        await alice.send("lobby", {"text": "hi"})
        await alice.send_binary("lobby", b"\x00\xffbytes")
        first = await stream.__anext__()
        second = await stream.__anext__()
        self.assertEqual((first.room, first.sender, first.content), ("lobby", "alice", {"text": "hi"}))
        self.assertIsNotNone(first.timestamp)
        self.assertEqual(first.seq, 1)
        self.assertEqual((second.binary, second.sender, second.data), (True, "alice", b"\x00\xffbytes"))
        self.assertEqual(heard, [first, second])
        # Without echo the sender hears nothing of its own: a heartbeat has
        # come back after the messages, so they would have arrived by now.
        received: list[Message] = []
        alice.on_message = received.append
        await alice.heartbeat()
        self.assertEqual(received, [])

    async def test_echo_delivers_own_messages(self) -> None:
        alice = await self.client(user="alice", echo=True)
        await alice.join("lobby")
        stream = alice.messages()
        await alice.send("lobby", "me too")
        message = await stream.__anext__()
        self.assertEqual((message.sender, message.content), ("alice", "me too"))

    async def test_500_concurrent_requests_are_matched_by_id(self) -> None:
        client = await self.client()
        requests = []
        for number in range(500):
            if number % 7 == 0:
                requests.append(client.join("\x07bad"))  # INVALID_ROOM, answered in line
            elif number % 2:
                requests.append(client.join(f"room-{number % 40}"))
            else:
                requests.append(client.leave(f"room-{number % 40}"))
        results = await defer.DeferredList(requests, consumeErrors=True)
        for number, (succeeded, result) in enumerate(results):
            if number % 7 == 0:
                self.assertFalse(succeeded)
                self.assertIs(result.value.code, ErrorCode.INVALID_ROOM)
            else:
                self.assertTrue(succeeded, result)
                self.assertEqual(result["room"], f"room-{number % 40}")
                self.assertEqual(result["status"], "left" if number % 2 == 0 else "joined")

    async def test_invalid_room_fails_join(self) -> None:
        client = await self.client()
        failure = await self.assertFailure(client.join(" "), RelayError)
        self.assertIs(failure.code, ErrorCode.INVALID_ROOM)
        self.assertTrue(client.is_open)

    async def test_room_limit_is_bad_request(self) -> None:
        client = await self.client()
        for number in range(self.factory.config.max_rooms):
            await client.join(f"r{number}")
        failure = await self.assertFailure(client.join("one-too-many"), RelayError)
        self.assertIs(failure.code, ErrorCode.BAD_REQUEST)

    async def test_invalid_user_id_fails_connect_with_bad_request(self) -> None:
        failure = await self.assertFailure(
            connect(reactor, endpoint_of(self.port), user="x" * 129), RelayError
        )
        self.assertIs(failure.code, ErrorCode.BAD_REQUEST)

    async def test_send_to_room_not_joined_reports_not_in_room(self) -> None:
        client = await self.client()
        refused: defer.Deferred[RelayError] = defer.Deferred()
        client.on_error = refused.callback
        await client.send("elsewhere", "hello?")
        refusal = await refused
        self.assertIs(refusal.code, ErrorCode.NOT_IN_ROOM)
        self.assertIsNotNone(refusal.request_id)
        self.assertTrue(client.is_open)

    async def test_binary_send_to_room_not_joined_reports_not_in_room(self) -> None:
        client = await self.client()
        refused: defer.Deferred[RelayError] = defer.Deferred()
        client.on_error = refused.callback
        await client.send_binary("elsewhere", b"data")
        self.assertIs((await refused).code, ErrorCode.NOT_IN_ROOM)

    async def test_heartbeat_round_trip(self) -> None:
        client = await self.client()
        round_trips = await defer.gatherResults([client.heartbeat() for _ in range(5)])
        self.assertEqual(len(round_trips), 5)
        for seconds in round_trips:
            self.assertGreaterEqual(seconds, 0)
            self.assertLess(seconds, 5)

    async def test_server_heartbeat_interval_is_advertised(self) -> None:
        client = await self.client()
        self.assertEqual(client.heartbeat_interval, self.factory.config.heartbeat_interval)

    async def test_message_stream_ends_when_connection_closes(self) -> None:
        client = await self.client()
        await client.join("lobby")
        collected = []

        async def consume() -> None:
            async for message in client.messages():
                collected.append(message)

        consuming = defer.ensureDeferred(consume())
        other = await self.client(user="other")
        await other.join("lobby")
        await other.send("lobby", 1)
        await other.send("lobby", 2)
        await other.heartbeat()
        await client.heartbeat()  # both deliveries are in by now
        await client.disconnect()
        await consuming
        self.assertEqual([message.content for message in collected], [1, 2])

    async def test_fatal_server_shutdown_fails_pending_requests(self) -> None:
        client = await self.client()
        pinging = client.heartbeat()
        await self.factory.shutdown()
        await client.when_closed()
        self.assertTrue(client.close_reason.check(RelayError))
        self.assertIs(client.close_reason.value.code, ErrorCode.SERVER_SHUTDOWN)
        # The echo was sent before the shutdown error, or the shutdown failed it.
        await pinging.addErrback(lambda failure: failure.trap(RelayError))


class BinaryRoomWriterTests(IntegrationTestCase):
    async def test_file_streams_into_a_room_at_the_sockets_pace(self) -> None:
        sender = await connect(reactor, endpoint_of(self.port), user="sender")
        self.addCleanup(sender.disconnect)
        receiver = await connect(reactor, endpoint_of(self.port), user="receiver")
        self.addCleanup(receiver.disconnect)
        await sender.join("files")
        await receiver.join("files")
        content = os.urandom(FileSender.CHUNK_SIZE * 20 + 123)
        chunks: list[bytes] = []
        receiver.on_message = lambda message: chunks.append(message.data)
        await FileSender().beginFileTransfer(io.BytesIO(content), BinaryRoomWriter(sender, "files"))
        # Once the sender's echo is back, the server has fanned every chunk
        # out; the receiver's echo then comes after all of them.
        await sender.heartbeat()
        await receiver.heartbeat()
        self.assertEqual(b"".join(chunks), content)


class UnixSocketTests(unittest.TestCase):
    async def test_unix_endpoint(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "relay.sock")
        factory = RelayFactory(reactor=reactor)
        port = await endpoints.UNIXServerEndpoint(reactor, path).listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.wait_closed)
        client = await connect(reactor, f"unix:path={path}", user="local")
        self.addCleanup(client.disconnect)
        self.assertEqual((await client.join("lobby"))["members"], 1)


# Reconnection


class ReconnectTests(IntegrationTestCase):
    async def test_reconnects_and_rejoins_after_server_restart(self) -> None:
        events: list[str] = []
        waiters: dict[str, list[defer.Deferred[Any]]] = {}

        def event(name: str) -> Any:
            def hook(*args: Any) -> None:
                events.append(name)
                for waiter in waiters.pop(name, []):
                    waiter.callback(args)
            return hook

        def next_event(name: str) -> defer.Deferred[Any]:
            waiter: defer.Deferred[Any] = defer.Deferred()
            waiters.setdefault(name, []).append(waiter)
            return waiter

        client = ReconnectingClient(reactor, endpoint_of(self.port), user="carol",
                                    retry_policy=lambda attempt: 0.02)
        client.on_connected = event("connected")
        client.on_disconnected = event("disconnected")
        client.on_reconnecting = event("reconnecting")
        connected = next_event("connected")
        client.start()
        self.addCleanup(client.stop)
        await connected
        await client.join("lobby")
        stream = client.messages()

        disconnected = next_event("disconnected")
        await self.stop_server()
        (reason,) = await disconnected
        self.assertIs(reason.value.code, ErrorCode.SERVER_SHUTDOWN)

        reconnected = next_event("connected")
        await self.start_server_again()
        port = self.port
        self.addCleanup(client.stop)  # runs first: the server waits for it
        await reconnected
        self.assertIn("reconnecting", events)
        self.assertEqual(list(client.rooms), ["lobby"])

        other = await connect(reactor, endpoint_of(port), user="dave")
        self.addCleanup(other.disconnect)
        self.assertEqual((await other.join("lobby"))["members"], 2)
        await other.send("lobby", "welcome back")
        message = await stream.__anext__()
        self.assertEqual((message.sender, message.content), ("dave", "welcome back"))
        # Requests through the reconnecting client use the new connection.
        self.assertGreaterEqual(await client.heartbeat(), 0)

    async def test_requests_wait_for_the_first_connection(self) -> None:
        client = ReconnectingClient(reactor, endpoint_of(self.port), retry_policy=lambda a: 0.02)
        joining = client.join("early")
        client.start()
        self.addCleanup(client.stop)
        self.assertEqual((await joining)["room"], "early")
        self.assertEqual(list(client.rooms), ["early"])

    async def test_stop_cancels_waiting_requests(self) -> None:
        client = ReconnectingClient(reactor, "tcp:host=127.0.0.1:port=1",
                                    retry_policy=lambda attempt: 0.02)
        failed: defer.Deferred[Any] = defer.Deferred()
        client.on_reconnecting = lambda *args: failed.callback(None) if not failed.called else None
        joining = client.join("never")
        client.start()
        await failed
        await client.stop()
        await self.assertFailure(joining, defer.CancelledError)


# Backpressure


@implementer(IPushProducer)
class RecordingProducer:
    """A push producer that counts how often it was paused and resumed."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.resumes = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1

    def stopProducing(self) -> None:
        self.paused = True


class StreamingProducer(RecordingProducer):
    """Streams ``total`` bytes as binary messages while the client accepts them."""

    chunk = 60 * 1024

    def __init__(self, client: RelayClientProtocol, room: str, total: int) -> None:
        super().__init__()
        self.client = client
        self.room = room
        self.remaining = total
        self.first_pause: defer.Deferred[None] = defer.Deferred()
        self.finished: defer.Deferred[None] = defer.Deferred()

    def pauseProducing(self) -> None:
        super().pauseProducing()
        if not self.first_pause.called:
            self.first_pause.callback(None)

    def resumeProducing(self) -> None:
        super().resumeProducing()
        while not self.paused and self.remaining > 0:
            size = min(self.chunk, self.remaining)
            self.remaining -= size
            self.client.send_binary(self.room, b"x" * size)
        if self.remaining == 0 and not self.finished.called:
            self.client.unregisterProducer()
            self.finished.callback(None)


class StallingServer(Protocol):
    """Acks HELLO, then reads nothing until ``start_reading``."""

    def connectionMade(self) -> None:
        self.decoder = permissive_decoder()
        self.data_bytes = 0
        self.expected = 0
        self.all_received: defer.Deferred[None] = defer.Deferred()
        self.factory.connected.callback(self)
        # Small kernel buffers, so the client's socket fills quickly.
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            if frame.type == MessageType.HELLO:
                request_id = loads(frame.payload)["id"]
                self.transport.write(hello_ack(request_id=request_id, max_frame_size=1 << 20))
                self.transport.pauseProducing()
            elif frame.type == MessageType.MESSAGE:
                self.data_bytes += len(frame.payload) - len(b"\x00\x05files")
        if self.expected and self.data_bytes >= self.expected and not self.all_received.called:
            self.all_received.callback(None)

    def start_reading(self, expected: int) -> None:
        self.expected = expected
        self.transport.resumeProducing()


class BackpressureTests(unittest.TestCase):
    async def test_producer_paused_while_socket_is_full_and_resumed_after_reading(self) -> None:
        factory = Factory.forProtocol(StallingServer)
        factory.connected = defer.Deferred()
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = await connect(reactor, endpoint_of(port))
        self.addCleanup(client.disconnect)
        server = await factory.connected
        client.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)

        total = 16 * 1024 * 1024  # far more than the kernel buffers hold
        producer = StreamingProducer(client, "files", total)
        client.registerProducer(producer, True)
        producer.resumeProducing()
        await producer.first_pause
        self.assertTrue(producer.paused)
        self.assertGreater(producer.remaining, 0)
        resumes_before_reading = producer.resumes

        server.start_reading(total)
        await producer.finished
        await server.all_received
        self.assertGreater(producer.resumes, resumes_before_reading)
        self.assertEqual(server.data_bytes, total)


# TLS


class CertificateMixin:
    """A trustme CA, a server certificate and a client certificate on disk."""

    def setUp(self: Any) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        self.ca = trustme.CA()
        server_cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = self.write("ca.pem", self.ca.cert_pem.bytes())
        self.server_pem = server_cert.private_key_and_cert_chain_pem.bytes()
        client_cert = self.ca.issue_cert("client.example")
        self.client_pem = self.write("client.pem", client_cert.private_key_and_cert_chain_pem.bytes())

    def write(self: Any, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as out:
            out.write(data)
        return path

    async def connected(self: Any, description: str, **options: Any) -> RelayClientProtocol:
        client = await connect(reactor, description, user="tls-user", **options)
        self.addCleanup(client.disconnect)
        return client


class TLSTests(CertificateMixin, unittest.TestCase):
    async def listen(self, require_client_cert: bool = False) -> str:
        certificate = ssl.PrivateCertificate.loadPEM(self.server_pem)
        if require_client_cert:
            options = certificate.options(ssl.Certificate.loadPEM(self.ca.cert_pem.bytes()))
        else:
            options = certificate.options()
        factory = RelayFactory(reactor=reactor)
        port = await endpoints.SSL4ServerEndpoint(
            reactor, 0, options, interface="127.0.0.1"
        ).listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.wait_closed)
        return f"tls:host=127.0.0.1:port={port.getHost().port}"

    async def test_server_certificate_is_verified_by_default(self) -> None:
        description = await self.listen()
        lost = await self.assertFailure(connect(reactor, description), error.ConnectionLost)
        self.assertTrue(lost.reason.check(SSL.Error), lost.reason)

    async def test_ca_file_makes_the_server_trusted(self) -> None:
        description = await self.listen()
        client = await self.connected(description, ca_file=self.ca_file)
        self.assertEqual((await client.join("secure"))["members"], 1)

    async def test_server_name_must_match_the_certificate(self) -> None:
        self.server_pem = self.ca.issue_cert("relay.example").private_key_and_cert_chain_pem.bytes()
        description = await self.listen()
        lost = await self.assertFailure(
            connect(reactor, description, ca_file=self.ca_file), error.ConnectionLost
        )
        self.assertTrue(lost.reason.check(SSL.Error, VerificationError), lost.reason)

    async def test_client_certificate_is_presented(self) -> None:
        description = await self.listen(require_client_cert=True)
        await self.assertFailure(
            connect(reactor, description, ca_file=self.ca_file), error.ConnectionLost
        )
        client = await self.connected(description, ca_file=self.ca_file, client_cert=self.client_pem)
        self.assertEqual((await client.join("mtls"))["members"], 1)


# WebSocket


class WebSocketTests(unittest.TestCase):
    async def setUp(self) -> None:
        from relay.server import websocket

        self.factory = RelayFactory(reactor=reactor)
        self.addCleanup(self.factory.wait_closed)
        self.http_port = await self.listen(websocket.make_site(self.factory))
        self.tcp_port = await self.listen(self.factory)

    async def listen(self, factory: Any) -> Any:
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return port

    async def connected(self, description: str, user: str) -> RelayClientProtocol:
        client = await connect(reactor, description, user=user)
        self.addCleanup(client.disconnect)
        return client

    async def test_websocket_client_chats_with_a_tcp_client(self) -> None:
        url = f"ws://127.0.0.1:{self.http_port.getHost().port}/relay"
        web = await self.connected(url, "web")
        tcp = await self.connected(endpoint_of(self.tcp_port), "tcp")
        await web.join("mixed")
        await tcp.join("mixed")
        web_stream, tcp_stream = web.messages(), tcp.messages()
        await web.send("mixed", "from the browser side")
        await tcp.send_binary("mixed", b"\x00from tcp")
        heard_by_tcp = await tcp_stream.__anext__()
        heard_by_web = await web_stream.__anext__()
        self.assertEqual((heard_by_tcp.sender, heard_by_tcp.content), ("web", "from the browser side"))
        self.assertEqual((heard_by_web.sender, heard_by_web.data), ("tcp", b"\x00from tcp"))
        self.assertGreaterEqual(await web.heartbeat(), 0)
        failure = await self.assertFailure(web.join(" "), RelayError)
        self.assertIs(failure.code, ErrorCode.INVALID_ROOM)

    async def test_default_path_is_relay(self) -> None:
        web = await self.connected(f"ws://127.0.0.1:{self.http_port.getHost().port}", "web")
        self.assertEqual((await web.join("lobby"))["members"], 1)

    async def test_websocket_close_fails_pending_requests(self) -> None:
        web = await self.connected(f"ws://127.0.0.1:{self.http_port.getHost().port}/relay", "web")
        pinging = web.heartbeat()
        await self.factory.shutdown()
        await web.when_closed()
        self.assertIs(web.close_reason.value.code, ErrorCode.SERVER_SHUTDOWN)
        await pinging.addErrback(lambda failure: failure.trap(RelayError))

    async def test_handshake_refused_fails_connect(self) -> None:
        url = f"ws://127.0.0.1:{self.http_port.getHost().port}/nowhere"
        await self.assertFailure(connect(reactor, url), error.ConnectError)


class SecureWebSocketTests(CertificateMixin, unittest.TestCase):
    async def test_wss_with_ca_file(self) -> None:
        from relay.server import websocket

        factory = RelayFactory(reactor=reactor)
        self.addCleanup(factory.wait_closed)
        options = ssl.PrivateCertificate.loadPEM(self.server_pem).options()
        port = await endpoints.SSL4ServerEndpoint(
            reactor, 0, options, interface="127.0.0.1"
        ).listen(websocket.make_site(factory))
        self.addCleanup(port.stopListening)
        url = f"wss://127.0.0.1:{port.getHost().port}/relay"
        await self.assertFailure(connect(reactor, url), error.ConnectError, error.ConnectionLost)
        client = await self.connected(url, ca_file=self.ca_file)
        self.assertEqual((await client.join("secure-web"))["members"], 1)


class RefusingServer(Protocol):
    """Answers the first frame with a fatal UNAUTHORIZED, as an auth server would."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.attempts += 1
        self.transport.write(encode_error(ErrorCode.UNAUTHORIZED, "bad token"))
        self.transport.loseConnection()


class TerminalErrorTests(unittest.TestCase):
    async def test_unauthorized_stops_reconnecting(self) -> None:
        factory = Factory.forProtocol(RefusingServer)
        factory.attempts = 0
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = ReconnectingClient(reactor, endpoint_of(port), token="wrong",
                                    retry_policy=lambda attempt: 0.01)
        gave_up: defer.Deferred[RelayError] = defer.Deferred()
        client.on_gave_up = lambda reason: gave_up.callback(reason.value)
        joining = client.join("lobby")
        client.start()
        self.addCleanup(client.stop)
        refusal = await gave_up
        self.assertIs(refusal.code, ErrorCode.UNAUTHORIZED)
        self.assertEqual(factory.attempts, 1)
        await self.assertFailure(joining, defer.CancelledError)
