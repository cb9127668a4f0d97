"""Shared pieces for the server tests.

A RelayProtocol on a StringTransport for unit tests; a real server on
loopback and a raw frame client that speaks Relay v1 through the project's
codec for integration tests.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from relay.server.factory import RelayConfig, RelayFactory
from relay.server.protocol import RelayProtocol
from relay.wire import Decoder, Flags, Frame, MessageType, encode, encode_json, loads


def permissive_decoder() -> Decoder:
    """A decoder for reading what a server sends: any type, any length.

    Deliveries may exceed the frame limit by the envelope, and a test may
    want to see a type the server should never send.
    """
    return Decoder(max_frame_size=2**31, known_types=frozenset(range(256)))


class StringConnection:
    """One server-side RelayProtocol on a StringTransport, and what its
    client has received so far.

    Build the factory on a ``task.Clock`` so the test moves time itself.
    Pass ``transport`` for a StringTransport that records more.
    """

    def __init__(self, factory: RelayFactory, transport: StringTransport | None = None) -> None:
        self.transport = StringTransport() if transport is None else transport
        self.protocol: RelayProtocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self._decoder = permissive_decoder()

    def send(self, data: bytes) -> None:
        """Deliver ``data`` to the server as one read."""
        self.protocol.dataReceived(data)

    def send_json(self, type_: MessageType, body: Any) -> None:
        self.send(encode_json(type_, body))

    def received(self) -> list[Frame]:
        """Frames written since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return list(self._decoder.feed(data))

    def replies(self) -> list[tuple[int, Any]]:
        """``received()`` as (type, body): JSON payloads decoded, others raw."""
        return [
            (f.type, loads(f.payload) if f.flags & Flags.JSON else f.payload)
            for f in self.received()
        ]

    def only_reply(self) -> tuple[int, Any]:
        (reply,) = self.replies()
        return reply

    def contents(self) -> list[Any]:
        """The content of each JSON MESSAGE received since the last call."""
        return [
            loads(frame.payload)["content"]
            for frame in self.received()
            if frame.type == MessageType.MESSAGE
        ]

    @property
    def closing(self) -> bool:
        """The server has asked the transport to close."""
        return self.transport.disconnecting


class FrameClient(protocol.Protocol):
    """A minimal Relay client for tests: sends frames, collects what arrives.

    ``next_frame()`` returns a Deferred for the next frame not yet taken.
    """

    def __init__(self) -> None:
        self._decoder = permissive_decoder()
        self.frames: list[Frame] = []
        self._taken = 0
        self._waiters: list[defer.Deferred[Frame]] = []
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.connected = False

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        for frame in self._decoder.feed(data):
            self.frames.append(frame)
        self._wake()

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = False
        self._wake()
        if not self.closed.called:
            self.closed.callback(None)

    def _wake(self) -> None:
        while self._waiters and self._taken < len(self.frames):
            frame = self.frames[self._taken]
            self._taken += 1
            self._waiters.pop(0).callback(frame)
        if not self.connected:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.errback(ConnectionError("connection closed"))

    def next_frame(self) -> defer.Deferred[Frame]:
        waiter: defer.Deferred[Frame] = defer.Deferred()
        self._waiters.append(waiter)
        self._wake()
        return waiter

    async def next_json(self) -> tuple[int, dict[str, Any]]:
        frame = await self.next_frame()
        assert frame.flags & Flags.JSON, frame
        return frame.type, loads(frame.payload)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def send_json(self, type_: MessageType, body: Any) -> None:
        self.send(encode_json(type_, body))

    def send_frame(self, type_: int, flags: int = 0, payload: bytes = b"") -> None:
        self.send(encode(type_, flags, payload))

    async def request(self, type_: MessageType, body: Any) -> tuple[int, dict[str, Any]]:
        self.send_json(type_, body)
        return await self.next_json()

    async def hello(self, **fields: Any) -> dict[str, Any]:
        type_, body = await self.request(MessageType.HELLO, fields)
        assert type_ == MessageType.HELLO, body
        return body

    async def join(self, room: str) -> dict[str, Any]:
        type_, body = await self.request(MessageType.JOIN_ROOM, {"room": room})
        assert type_ == MessageType.JOIN_ROOM, body
        return body


class LoopbackServerMixin:
    """Runs a RelayFactory on a real loopback TCP port for one test."""

    def start_server(self: Any, **config: Any) -> defer.Deferred[RelayFactory]:
        return self._serve(0, config)

    async def restart_server(self: Any, **config: Any) -> RelayFactory:
        """Shut the server down as an operator would, then serve a fresh
        factory on the same port number.

        Its clients are sent SERVER_SHUTDOWN and closed first; rooms do not
        survive.  ``self.factory`` and ``self.port`` become the new ones.
        """
        await self.stop_server()
        return await self.start_server_again(**config)

    async def stop_server(self: Any) -> None:
        """Stop listening, then send SERVER_SHUTDOWN to every client."""
        self.stopped_port_number = self.port.getHost().port
        await self.port.stopListening()
        await self.factory.shutdown()

    def start_server_again(self: Any, **config: Any) -> defer.Deferred[RelayFactory]:
        """A fresh factory on the port number ``stop_server`` stopped."""
        return self._serve(self.stopped_port_number, config)

    def _serve(self: Any, port_number: int, config: dict[str, Any]) -> defer.Deferred[RelayFactory]:
        factory = RelayFactory(RelayConfig(**config), reactor=reactor)
        endpoint = endpoints.TCP4ServerEndpoint(reactor, port_number, interface="127.0.0.1")

        def listening(port: Any) -> RelayFactory:
            self.factory, self.port = factory, port
            self.addCleanup(port.stopListening)
            # Runs after the clients' cleanups: wait for the server side too.
            self.addCleanup(factory.wait_closed)
            return factory

        return endpoint.listen(factory).addCallback(listening)

    async def connect(self: Any) -> FrameClient:
        return await connect_frame_client(self, self.port)


async def connect_frame_client(test: unittest.TestCase, port: Any) -> FrameClient:
    """A FrameClient connected over TCP to a listening ``port``, closed at cleanup."""
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    client = await endpoints.connectProtocol(endpoint, FrameClient())
    test.addCleanup(_disconnect, client)
    return client


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Let the reactor run until ``condition()`` holds; fail after ``timeout`` s.

    For server-side effects no client can observe in order, such as noticing
    a reset connection.
    """
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what}: not true after {timeout} s")
        await task.deferLater(reactor, 0.01, lambda: None)


def _disconnect(client: FrameClient) -> defer.Deferred[None]:
    if client.connected:
        client.transport.abortConnection()
    return client.closed


class IntegrationTestCase(LoopbackServerMixin, unittest.TestCase):
    """Trial test case with a fresh server per test; ``await self.connect()``."""

    server_config: dict[str, Any] = {}

    def setUp(self) -> defer.Deferred[RelayFactory]:
        return self.start_server(**self.server_config)
