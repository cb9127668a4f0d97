"""Relay client library: Deferred-based requests over TCP, TLS or WebSocket.

``connect()`` gives one connection; ``ReconnectingClient`` keeps one up, with
backoff, and re-joins its rooms after each reconnection.  Both speak Relay v1
through the project's codec (``relay.wire``)::

    client = await connect(reactor, "tcp:host=127.0.0.1:port=4000", user="alice")
    await client.join("lobby")
    await client.send("lobby", "hi")
    async for message in client.messages():
        print(message.sender, message.content)

Replies are matched to requests by the JSON ``"id"`` every request carries.
MESSAGE has no ack in Relay v1: ``send()`` fires once the frame is written, and
an ERROR the server sends back for it later goes to ``on_error``.
"""

from __future__ import annotations

import collections
import itertools
import re
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, error, ssl, task
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from relay import __version__
from relay.server.tls import split_description
from relay.wire import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_ENVELOPE,
    Decoder,
    ErrorCode,
    Flags,
    Frame,
    MessageType,
    ProtocolError,
    decode_binary_delivery,
    dumps,
    encode,
    encode_binary_message,
    encode_json,
    loads,
)

log = Logger()

# How long the server gets to acknowledge HELLO before the attempt is dropped.
HELLO_TIMEOUT_SECONDS = 30.0
# The server is presumed dead after this many heartbeat intervals of silence.
MISSED_HEARTBEATS = 2
# Codes after which reconnecting cannot help: the same request would fail again.
TERMINAL_CODES = frozenset({ErrorCode.UNAUTHORIZED, ErrorCode.UNSUPPORTED_VERSION})
# Reconnection backoff: 0.75 s, 1.1 s, 1.7 s ... up to 30 s, each plus jitter.
RETRY_INITIAL_DELAY_SECONDS = 0.5
RETRY_MAX_DELAY_SECONDS = 30.0
# How long one TCP connection attempt may take (Twisted's default too).
CONNECT_TIMEOUT_SECONDS = 30.0
WEBSOCKET_SUBPROTOCOL = "relay.v1"
WEBSOCKET_PATH = "/relay"
WEBSOCKET_DEFAULT_PORTS = {"ws": 80, "wss": 443}


class RelayError(Exception):
    """An ERROR frame from the server.

    ``code`` is an ``ErrorCode`` (or the raw string, for a code this client does
    not know), ``message`` the server's text, ``fatal`` whether the connection
    ended with it, ``request_id`` the id of the request it answers, if any.
    """

    def __init__(self, code: ErrorCode | str, message: str, fatal: bool = False,
                 request_id: Any = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.fatal = fatal
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> RelayError:
        """Build the error an ERROR frame's JSON body describes."""
        raw = str(body.get("code", ""))
        try:
            code: ErrorCode | str = ErrorCode(raw)
        except ValueError:
            code = raw
        fatal = bool(body.get("fatal", code.fatal if isinstance(code, ErrorCode) else True))
        return cls(code, str(body.get("message", "")), fatal, body.get("id"))


def connection_lost(reason: Failure | None, description: str = "") -> error.ConnectionLost:
    """The ``ConnectionLost`` pending requests fail with; ``.reason`` keeps the cause."""
    if reason is not None and reason.check(error.ConnectionLost):
        return reason.value
    why = description or (reason.getErrorMessage() if reason is not None else "connection closed")
    lost = error.ConnectionLost(why)
    lost.reason = reason
    return lost


@dataclass(frozen=True)
class Message:
    """One message delivered from a room.

    ``content`` holds the JSON value of a JSON message, ``data`` the bytes of a
    binary one (``binary`` tells which).  ``timestamp`` (ms since the epoch) and
    ``seq`` are set when the server sent them (JSON messages only).
    """

    room: str
    sender: str
    content: Any = None
    data: bytes | None = None
    timestamp: int | None = None
    seq: int | None = None
    binary: bool = False


class MessageStream:
    """An async iterator over incoming messages, from when it was created.

    Messages wait in the stream until consumed; iteration ends once the
    connection (or the reconnecting client) is closed and the backlog is read.
    """

    def __init__(self, hub: _MessageHub) -> None:
        self._hub = hub
        self._backlog: collections.deque[Message] = collections.deque()
        self._waiter: defer.Deferred[Message] | None = None
        self._ended = False

    def __aiter__(self) -> MessageStream:
        return self

    def __anext__(self) -> defer.Deferred[Message]:
        if self._backlog:
            return defer.succeed(self._backlog.popleft())
        if self._ended:
            return defer.fail(StopAsyncIteration())
        self._waiter = defer.Deferred(lambda _: self.close())
        return self._waiter

    def close(self) -> None:
        """Stop receiving; iteration ends after the backlog."""
        self._hub.streams.discard(self)
        self._end()

    def _put(self, message: Message) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(message)
        else:
            self._backlog.append(message)

    def _end(self) -> None:
        self._ended = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.errback(StopAsyncIteration())


class _MessageHub:
    """Fans incoming messages out to every open ``MessageStream``."""

    def __init__(self) -> None:
        self.streams: set[MessageStream] = set()
        self.closed = False

    def subscribe(self) -> MessageStream:
        stream = MessageStream(self)
        if self.closed:
            stream._end()
        else:
            self.streams.add(stream)
        return stream

    def publish(self, message: Message) -> None:
        for stream in list(self.streams):
            stream._put(message)

    def close(self) -> None:
        self.closed = True
        streams, self.streams = self.streams, set()
        for stream in streams:
            stream._end()


def _default_error_handler(relay_error: RelayError) -> None:
    log.warn("Relay server refused a request: {error}", error=relay_error)


@implementer(IConsumer)
class RelayClientProtocol(Protocol, TimeoutMixin):
    """One client connection speaking Relay v1.

    ``ready`` fires with the protocol once the server acknowledged HELLO.
    Set ``on_message(message)`` to receive deliveries as they arrive, or
    iterate ``messages()``.  ``on_error(relay_error)`` receives non-fatal
    errors that answer no pending request (those for ``send``/``send_binary``).

    The protocol is an ``IConsumer``: a producer registered here is registered
    on the transport, so it is paused while the socket cannot take more.
    ``write()`` takes whole encoded Relay frames.
    """

    def __init__(self, reactor: Any, user: str | None = None, token: str | None = None,
                 echo: bool = False) -> None:
        self._reactor = reactor
        self.callLater = reactor.callLater  # for TimeoutMixin
        self._hello = _hello_body(user, token, echo)
        self._decoder = Decoder(DEFAULT_MAX_FRAME_SIZE + MAX_ENVELOPE)
        self._ids = itertools.count(1)
        self._pending: dict[int, defer.Deferred[dict[str, Any]]] = {}
        self._pings: collections.deque[tuple[int, float, defer.Deferred[float] | None]] = (
            collections.deque()
        )
        self._ping_ids = itertools.count(1)
        self._heartbeat: task.LoopingCall | None = None
        self._hub = _MessageHub()
        self._close_reason: Failure | None = None
        self._closed_waiters: list[defer.Deferred[None]] = []
        self.is_open = False
        self._closing = False
        self.ready: defer.Deferred[RelayClientProtocol] = defer.Deferred(self._cancel_hello)
        self.server_info: dict[str, Any] = {}
        self.max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.on_message: Callable[[Message], Any] | None = None
        self.on_error: Callable[[RelayError], Any] = _default_error_handler

    # Public API

    @property
    def user_id(self) -> str | None:
        """The user id the server assigned (after ``ready``)."""
        return self.server_info.get("userId")

    @property
    def heartbeat_interval(self) -> float | None:
        """Seconds between automatic heartbeats, as the server advertised."""
        return self.server_info.get("heartbeatInterval")

    def join(self, room: str) -> defer.Deferred[dict[str, Any]]:
        """Join ``room``; fires with the ack body (``room``, ``members``)."""
        return self._request(MessageType.JOIN_ROOM, {"room": room})

    def leave(self, room: str) -> defer.Deferred[dict[str, Any]]:
        """Leave ``room``; fires with the ack body."""
        return self._request(MessageType.LEAVE_ROOM, {"room": room})

    def send(self, room: str, content: Any) -> defer.Deferred[None]:
        """Publish JSON ``content`` to ``room``; fires once the frame is written.

        Relay v1 does not acknowledge MESSAGE, so success only means "sent".
        If the server refuses it (NOT_IN_ROOM, RATE_LIMITED...) the RelayError
        reaches ``on_error``, its ``request_id`` being this message's id.
        """
        body = {"id": next(self._ids), "room": room, "content": content}
        return self._write_frame(encode_json(MessageType.MESSAGE, body))

    def send_binary(self, room: str, data: bytes) -> defer.Deferred[None]:
        """Publish ``data`` to ``room`` byte for byte; fires once written.

        A binary MESSAGE carries no id: a refusal reaches ``on_error``.
        """
        payload = encode_binary_message(room, data)
        return self._write_frame(encode(MessageType.MESSAGE, Flags.BINARY, payload))

    def heartbeat(self) -> defer.Deferred[float]:
        """Ping the server; fires with the round trip time in seconds."""
        done: defer.Deferred[float] = defer.Deferred()
        if not self._send_ping(done):
            return defer.fail(self._not_connected())
        return done

    def messages(self) -> AsyncIterator[Message]:
        """An async iterator over the messages received from now on."""
        return self._hub.subscribe()

    def disconnect(self) -> defer.Deferred[None]:
        """Close the connection; fires once it is closed."""
        done = self.when_closed()
        if self.is_open:
            self.transport.loseConnection()
        return done

    def when_closed(self) -> defer.Deferred[None]:
        """A Deferred that fires (with None) once the connection is gone."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if self._close_reason is not None and not self.is_open:
            waiter.callback(None)
        else:
            self._closed_waiters.append(waiter)
        return waiter

    @property
    def close_reason(self) -> Failure | None:
        """Why the connection ended: the transport's reason, or a RelayError
        for a fatal ERROR, or ConnectionLost for a server presumed dead."""
        return self._close_reason

    # IConsumer: lets an application producer follow the socket's pace.

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._require_connected()
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.is_open:
            self.transport.unregisterProducer()

    def write(self, data: bytes) -> None:
        self._require_connected()
        self.transport.write(data)

    # Connection events

    def connectionMade(self) -> None:
        self.is_open = True
        self.setTimeout(HELLO_TIMEOUT_SECONDS)
        hello_id = next(self._ids)
        acked = self._expect(hello_id)
        self.transport.write(encode_json(MessageType.HELLO, {"id": hello_id, **self._hello}))
        acked.addCallbacks(self._on_hello_ack, self._on_hello_failed)

    def connectionLost(self, reason: Failure | None = None) -> None:
        # Wrapping WebSocket transports may pass None.
        if not self.is_open:
            return
        self.is_open = False
        self.setTimeout(None)
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        if self._close_reason is None:
            self._close_reason = reason or Failure(error.ConnectionLost("closed by the transport"))
        if self._close_reason.check(RelayError, error.ConnectionLost):
            self._fail_pending(self._close_reason)
        else:
            self._fail_pending(Failure(connection_lost(self._close_reason)))
        self._hub.close()
        log.info("Relay connection closed: {why}", why=self._close_reason.getErrorMessage())
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return  # nothing is read after a fatal ERROR or a violation
        self.resetTimeout()
        try:
            for frame in self._decoder.feed(data):
                self._dispatch(frame)
                if self._closing:
                    return
        except ProtocolError as violation:
            log.error("The Relay server broke the protocol: {error}", error=violation)
            self._drop(Failure(violation))

    def timeoutConnection(self) -> None:
        if self.ready.called:
            silence = MISSED_HEARTBEATS * self.heartbeat_interval
            why = f"no frame from the server for {silence} seconds"
        else:
            why = f"no HELLO ack within {HELLO_TIMEOUT_SECONDS} seconds"
        log.warn("Relay server presumed dead: {why}", why=why)
        self._drop(Failure(error.ConnectionLost(why)))

    # Inbound frames

    def _dispatch(self, frame: Frame) -> None:
        if frame.type == MessageType.MESSAGE:
            self._on_message(frame)
        elif frame.type == MessageType.HEARTBEAT:
            self._on_heartbeat_echo(frame)
        elif frame.type == MessageType.ERROR:
            self._on_error(loads(frame.payload))
        else:
            self._on_reply(loads(frame.payload))

    def _on_reply(self, body: Any) -> None:
        request_id = body.get("id") if isinstance(body, dict) else None
        waiter = self._pending.pop(request_id, None)
        if waiter is None or waiter.called:  # unknown, or cancelled by its caller
            log.warn("Relay reply matches no request: {body}", body=body)
            return
        waiter.callback(body)

    def _on_error(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise ProtocolError(ErrorCode.PARSE_ERROR, "ERROR payload is not an object")
        relay_error = RelayError.from_body(body)
        if relay_error.fatal:
            log.warn("Relay server closed the connection: {error}", error=relay_error)
            self._drop(Failure(relay_error), abort=False)
            return
        waiter = self._pending.pop(relay_error.request_id, None)
        if waiter is not None:
            if not waiter.called:
                waiter.errback(relay_error)
        else:
            self.on_error(relay_error)

    def _on_message(self, frame: Frame) -> None:
        message = _parse_delivery(frame)
        if self.on_message is not None:
            try:
                self.on_message(message)
            except Exception:
                log.failure("on_message raised; the message is still delivered to streams")
        self._hub.publish(message)

    def _on_heartbeat_echo(self, frame: Frame) -> None:
        try:
            ping_id = loads(frame.payload).get("ping")
        except (ProtocolError, AttributeError):
            ping_id = None
        now = self._reactor.seconds()
        # The server echoes in order, so earlier pings cannot still be in flight.
        while self._pings:
            sent_id, sent_at, waiter = self._pings.popleft()
            if waiter is not None:
                waiter.callback(now - sent_at)
            if sent_id == ping_id:
                return
        log.warn("Unexpected HEARTBEAT echo {payload!r}", payload=frame.payload)

    # HELLO

    def _on_hello_ack(self, body: dict[str, Any]) -> None:
        self.server_info = body
        self.max_frame_size = int(body.get("maxFrameSize", DEFAULT_MAX_FRAME_SIZE))
        # Deliveries may exceed the frame limit by the server's envelope.
        self._decoder.max_frame_size = self.max_frame_size + MAX_ENVELOPE
        interval = float(body.get("heartbeatInterval", 0))
        if interval > 0:
            self._heartbeat = task.LoopingCall(self._send_ping, None)
            self._heartbeat.clock = self._reactor
            self._heartbeat.start(interval, now=False).addErrback(
                lambda failure: log.failure("heartbeat loop failed", failure)
            )
            self.setTimeout(MISSED_HEARTBEATS * interval)
        else:
            self.setTimeout(None)
        log.info("Relay connected as {user}", user=self.user_id)
        self.ready.callback(self)

    def _on_hello_failed(self, failure: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(failure)
        if self.is_open:
            self.transport.loseConnection()

    def _cancel_hello(self, ready: defer.Deferred[Any]) -> None:
        if self.is_open:
            self.transport.abortConnection()

    # Outbound

    def _request(self, type_: MessageType, body: dict[str, Any]) -> defer.Deferred[dict[str, Any]]:
        if not self.is_open:
            return defer.fail(self._not_connected())
        request_id = next(self._ids)
        waiter = self._expect(request_id)
        self.transport.write(encode_json(type_, {"id": request_id, **body}))
        return waiter

    def _expect(self, request_id: int) -> defer.Deferred[dict[str, Any]]:
        waiter: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._pending[request_id] = waiter
        return waiter

    def _write_frame(self, frame: bytes) -> defer.Deferred[None]:
        if not self.is_open:
            return defer.fail(self._not_connected())
        length = len(frame) - 4
        if length > self.max_frame_size:
            return defer.fail(ValueError(
                f"a {length}-byte frame exceeds the server's limit of {self.max_frame_size}"
            ))
        self.transport.write(frame)
        return defer.succeed(None)

    def _send_ping(self, waiter: defer.Deferred[float] | None) -> bool:
        if not self.is_open:
            return False
        ping_id = next(self._ping_ids)
        self._pings.append((ping_id, self._reactor.seconds(), waiter))
        payload = dumps({"ping": ping_id})
        self.transport.write(encode(MessageType.HEARTBEAT, Flags.JSON, payload))
        return True

    # Failure paths

    def _drop(self, reason: Failure, abort: bool = True) -> None:
        """Fail everything pending with ``reason`` and close the connection."""
        if self._close_reason is None:
            self._close_reason = reason
        self._closing = True
        self._fail_pending(reason)
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def _fail_pending(self, reason: Failure) -> None:
        pending, self._pending = self._pending, {}
        pings, self._pings = self._pings, collections.deque()
        waiters = list(pending.values()) + [w for _, _, w in pings if w is not None]
        if not self.ready.called:
            waiters.append(self.ready)
        for waiter in waiters:
            if not waiter.called:  # a failing HELLO may already have failed ``ready``
                waiter.errback(reason)

    def _not_connected(self) -> Exception:
        reason = self._close_reason
        if reason is None:
            return error.NotConnectingError("the Relay connection is not open")
        if reason.check(RelayError, error.ConnectionLost):
            return reason.value
        return connection_lost(reason)

    def _require_connected(self) -> None:
        if not self.is_open:
            raise self._not_connected()


def _hello_body(user: str | None, token: str | None, echo: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"clientVersion": f"relay-client/{__version__}", "echo": echo}
    if user is not None:
        body["userId"] = user
    if token is not None:
        body["token"] = token
    return body


def _parse_delivery(frame: Frame) -> Message:
    if frame.is_binary:
        room, sender, data = decode_binary_delivery(frame.payload)
        return Message(room=room, sender=sender, data=data, binary=True)
    body = loads(frame.payload)
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.PARSE_ERROR, "MESSAGE payload is not an object")
    return Message(
        room=str(body.get("room", "")),
        sender=str(body.get("from", "")),
        content=body.get("content"),
        timestamp=body.get("timestamp"),
        seq=body.get("seq"),
    )


@implementer(IConsumer)
class BinaryRoomWriter:
    """An ``IConsumer`` that publishes each ``write()`` as a binary message.

    Hand it to a producer (``FileSender().beginFileTransfer(f, writer)``) to
    stream a file into a room at the pace the socket allows.  Each write must
    fit in one frame (``client.max_frame_size`` minus the room name).
    """

    def __init__(self, client: RelayClientProtocol, room: str) -> None:
        self.client = client
        self.room = room

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.client.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.client.unregisterProducer()

    def write(self, data: bytes) -> None:
        self.client.send_binary(self.room, data).addErrback(
            lambda failure: log.failure("binary write failed", failure)
        )


# Endpoints


def build_endpoint(reactor: Any, description: str, ca_file: str | None = None,
                   client_cert: str | None = None) -> IStreamClientEndpoint:
    """Turn a client endpoint description or a ``ws://``/``wss://`` URL into an endpoint.

    ``ca_file`` (PEM certificates to trust instead of the system's) and
    ``client_cert`` (PEM holding a certificate and its private key) apply to
    ``tls:`` descriptions and ``wss://`` URLs.
    """
    if description.startswith(("ws://", "wss://")):
        return _websocket_endpoint(reactor, description, ca_file, client_cert)
    if ca_file is None and client_cert is None:
        return clientFromString(reactor, description)
    scheme, args, kwargs = split_description(description)
    if scheme != "tls":
        raise ValueError("ca_file and client_cert need a tls: endpoint or a wss:// URL")
    host = kwargs.get("host") or (args[0] if args else None)
    port = kwargs.get("port") or (args[1] if len(args) > 1 else None)
    if not host or not port:
        raise ValueError(f"{description!r} needs a host and a port")
    timeout = float(kwargs.get("timeout", CONNECT_TIMEOUT_SECONDS))
    inner = HostnameEndpoint(reactor, host, int(port), timeout=timeout)
    return wrapClientTLS(_tls_options(host, ca_file, client_cert), inner)


def _tls_options(host: str, ca_file: str | None, client_cert: str | None) -> Any:
    trust_root = None
    if ca_file is not None:
        with open(ca_file, "rb") as pem:
            blocks = _PEM_CERTIFICATE.findall(pem.read())
        if not blocks:
            raise ValueError(f"{ca_file} holds no PEM certificate")
        trust_root = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
    certificate = None
    if client_cert is not None:
        with open(client_cert, "rb") as pem:
            certificate = ssl.PrivateCertificate.loadPEM(pem.read())
    return ssl.optionsForClientTLS(host, trustRoot=trust_root, clientCertificate=certificate)


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def _websocket_endpoint(reactor: Any, url: str, ca_file: str | None,
                        client_cert: str | None) -> IStreamClientEndpoint:
    from relay.client.websocket import WebSocketClientEndpoint

    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname
    if not host:
        raise ValueError(f"{url!r} names no host")
    port = parts.port or WEBSOCKET_DEFAULT_PORTS[parts.scheme]
    inner: IStreamClientEndpoint = HostnameEndpoint(
        reactor, host, port, timeout=CONNECT_TIMEOUT_SECONDS
    )
    if secure:
        inner = wrapClientTLS(_tls_options(host, ca_file, client_cert), inner)
    if not parts.path:
        url = url + WEBSOCKET_PATH
    return WebSocketClientEndpoint(reactor, inner, url, WEBSOCKET_SUBPROTOCOL)


class _ClientFactory(Factory):
    """Builds one configured ``RelayClientProtocol`` per connection."""

    def __init__(self, reactor: Any, **options: Any) -> None:
        self.reactor = reactor
        self.options = options

    def buildProtocol(self, addr: Any) -> RelayClientProtocol:
        return RelayClientProtocol(self.reactor, **self.options)


def _handshake(endpoint: IStreamClientEndpoint, factory: Factory) -> defer.Deferred[Any]:
    """Connect, then wait for the HELLO ack; fires with the ready protocol."""
    connecting = endpoint.connect(factory)
    return connecting.addCallback(lambda client: client.ready)


def connect(reactor: Any, description: str, *, user: str | None = None,
            token: str | None = None, echo: bool = False, ca_file: str | None = None,
            client_cert: str | None = None) -> defer.Deferred[RelayClientProtocol]:
    """Connect once; fires with a ``RelayClientProtocol`` after the HELLO ack.

    ``description`` is a Twisted client endpoint string (``tcp:``, ``tls:``,
    ``unix:``) or a ``ws://``/``wss://`` URL.  ``tls:`` verifies the server
    against the system's trust store unless ``ca_file`` is given.
    A refused HELLO fails with ``RelayError``.
    """
    endpoint = build_endpoint(reactor, description, ca_file, client_cert)
    return _handshake(endpoint, _ClientFactory(reactor, user=user, token=token, echo=echo))


# Reconnection


class _Session(Protocol):
    """What ClientService holds for one established, ready connection."""

    client: RelayClientProtocol | None = None

    def attach(self, client: RelayClientProtocol) -> None:
        self.client = client


class _ReadyEndpoint:
    """Endpoint for ClientService: a connection counts once HELLO is acked.

    ClientService cannot cope with a connection dropping while its
    ``prepareConnection`` runs, so the handshake and the re-joins happen here,
    before ClientService sees the connection at all.
    """

    def __init__(self, owner: ReconnectingClient) -> None:
        self._owner = owner

    def connect(self, service_factory: Any) -> defer.Deferred[Any]:
        owner = self._owner
        attempt: list[RelayClientProtocol] = []

        def made(client: RelayClientProtocol) -> defer.Deferred[RelayClientProtocol]:
            attempt.append(client)
            return client.ready

        def failed(failure: Failure) -> Failure:
            # A cancelled or failed attempt must not leave its socket open.
            if attempt and attempt[0].is_open:
                attempt[0].transport.abortConnection()
            return owner._attempt_failed(failure)

        ready = owner.endpoint.connect(owner.factory).addCallback(made)
        ready.addCallback(owner._rejoin)
        ready.addCallback(self._present, service_factory)
        ready.addErrback(failed)
        return ready

    def _present(self, client: RelayClientProtocol, service_factory: Any) -> Any:
        session = service_factory.buildProtocol(client.transport.getPeer())
        session.attach(client)
        session.makeConnection(client.transport)
        # The owner hears of a loss before ClientService schedules the retry.
        self._owner._connected(client)
        client.when_closed().addCallback(lambda _: session.connectionLost(client.close_reason))
        return session


class ReconnectingClient:
    """Keeps a Relay connection up, reconnecting with exponential backoff and jitter.

    Rooms joined through it are joined again after every reconnection.
    Requests made while disconnected wait for the next connection; a request
    in flight when the connection drops fails with ``ConnectionLost``.

    Hooks (plain attributes, all optional):

    - ``on_connected(client)``: a connection is ready and its rooms re-joined;
    - ``on_disconnected(reason)``: an established connection ended;
    - ``on_reconnecting(attempt, delay, reason)``: next attempt in ``delay`` s;
    - ``on_gave_up(reason)``: a terminal error (e.g. UNAUTHORIZED); stopped;
    - ``on_message(message)`` and ``on_error(relay_error)`` as on the protocol.
    """

    def __init__(self, reactor: Any, description: str, *, user: str | None = None,
                 token: str | None = None, echo: bool = False, ca_file: str | None = None,
                 client_cert: str | None = None,
                 retry_policy: Callable[[int], float] | None = None) -> None:
        self.reactor = reactor
        self.description = description
        self.endpoint = build_endpoint(reactor, description, ca_file, client_cert)
        self.factory = _ClientFactory(reactor, user=user, token=token, echo=echo)
        self.rooms: dict[str, None] = {}  # ordered set of acked room names
        self.client: RelayClientProtocol | None = None
        self.on_connected: Callable[[RelayClientProtocol], Any] | None = None
        self.on_disconnected: Callable[[Failure], Any] | None = None
        self.on_reconnecting: Callable[[int, float, Failure | None], Any] | None = None
        self.on_gave_up: Callable[[Failure], Any] | None = None
        self.on_message: Callable[[Message], Any] | None = None
        self.on_error: Callable[[RelayError], Any] = _default_error_handler
        self._policy = retry_policy or backoffPolicy(
            initialDelay=RETRY_INITIAL_DELAY_SECONDS, maxDelay=RETRY_MAX_DELAY_SECONDS
        )
        self._last_failure: Failure | None = None
        self._hub = _MessageHub()
        self._service = ClientService(
            _ReadyEndpoint(self), Factory.forProtocol(_Session),
            retryPolicy=self._retry_delay, clock=reactor,
        )

    def start(self) -> None:
        """Start connecting (and keep reconnecting until ``stop``)."""
        self._service.startService()

    def stop(self) -> defer.Deferred[None]:
        """Stop reconnecting and close the connection; fires once closed."""
        self._hub.close()
        if not self._service.running:
            return defer.succeed(None)
        return self._service.stopService()

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.is_open

    def when_connected(self) -> defer.Deferred[RelayClientProtocol]:
        """The current ready connection, or the next one."""
        return self._service.whenConnected().addCallback(lambda session: session.client)

    def join(self, room: str) -> defer.Deferred[dict[str, Any]]:
        """Join ``room`` (now and after each reconnection); fires with the ack."""
        def joined(ack: dict[str, Any]) -> dict[str, Any]:
            self.rooms[ack.get("room", room)] = None
            return ack

        return self._call(lambda client: client.join(room)).addCallback(joined)

    def leave(self, room: str) -> defer.Deferred[dict[str, Any]]:
        """Leave ``room`` and stop re-joining it; fires with the ack."""
        self.rooms.pop(room.strip(), None)
        return self._call(lambda client: client.leave(room))

    def send(self, room: str, content: Any) -> defer.Deferred[None]:
        """Publish JSON ``content``; fires once written (see ``RelayClientProtocol.send``)."""
        return self._call(lambda client: client.send(room, content))

    def send_binary(self, room: str, data: bytes) -> defer.Deferred[None]:
        """Publish ``data`` as a binary message; fires once written."""
        return self._call(lambda client: client.send_binary(room, data))

    def heartbeat(self) -> defer.Deferred[float]:
        """Ping the server; fires with the round trip in seconds."""
        return self._call(lambda client: client.heartbeat())

    def messages(self) -> AsyncIterator[Message]:
        """Messages from every connection, from now until ``stop``."""
        return self._hub.subscribe()

    def _call(self, request: Callable[[RelayClientProtocol], defer.Deferred[Any]]) -> defer.Deferred[Any]:
        return self.when_connected().addCallback(request)

    # Connection life cycle, driven by _ReadyEndpoint and ClientService

    def _rejoin(self, client: RelayClientProtocol) -> defer.Deferred[RelayClientProtocol]:
        client.on_message = self._deliver
        client.on_error = lambda relay_error: self.on_error(relay_error)
        joins = [client.join(room).addErrback(self._rejoin_failed, room) for room in list(self.rooms)]
        return defer.gatherResults(joins, consumeErrors=True).addCallback(lambda _: client)

    def _rejoin_failed(self, failure: Failure, room: str) -> None:
        if failure.check(RelayError) and not failure.value.fatal:
            # The server no longer accepts this room: stop asking for it.
            self.rooms.pop(room, None)
            self.on_error(failure.value)
            return None
        return failure

    def _connected(self, client: RelayClientProtocol) -> None:
        self.client = client
        self._last_failure = None
        client.when_closed().addCallback(lambda _: self._disconnected(client))
        if self.on_connected is not None:
            self.on_connected(client)

    def _disconnected(self, client: RelayClientProtocol) -> None:
        if self.client is client:
            self.client = None
        reason = client.close_reason
        self._last_failure = reason
        if self.on_disconnected is not None:
            self.on_disconnected(reason)
        self._check_terminal(reason)

    def _attempt_failed(self, failure: Failure) -> Failure:
        self._last_failure = failure
        self._check_terminal(failure)
        return failure

    def _check_terminal(self, reason: Failure | None) -> None:
        if reason is not None and reason.check(RelayError) and reason.value.code in TERMINAL_CODES:
            # Let ClientService settle first, then stop its retry.
            self.reactor.callLater(0, self._give_up, reason)

    def _give_up(self, reason: Failure) -> None:
        if not self._service.running:
            return
        self.stop()
        if self.on_gave_up is not None:
            self.on_gave_up(reason)

    def _retry_delay(self, attempt: int) -> float:
        delay = self._policy(attempt)
        terminal = self._last_failure is not None and self._last_failure.check(RelayError) \
            and self._last_failure.value.code in TERMINAL_CODES
        if self.on_reconnecting is not None and not terminal:
            # Not from inside ClientService's transition: the hook may stop us.
            self.reactor.callLater(0, self.on_reconnecting, attempt, delay, self._last_failure)
        return delay

    def _deliver(self, message: Message) -> None:
        if self.on_message is not None:
            self.on_message(message)
        self._hub.publish(message)
