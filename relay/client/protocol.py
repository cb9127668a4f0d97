"""Relay client connection: one connection speaking Relay v1, Deferred-based.

``RelayClientProtocol`` sends HELLO, matches replies to requests by the JSON
``"id"`` every request carries, heartbeats at the interval the server
advertises, and hands deliveries to ``on_message`` and ``messages()``.
Plain Relay v1 has no ack for MESSAGE: ``send()`` fires once the frame is
written, and an ERROR the server sends back for it later goes to
``on_error``.  With the ``acks`` extension negotiated in HELLO, ``send()``
fires with the room's ``seq`` once the server accepted the message, or fails
with its ERROR.  It speaks the wire format through the project's codec
(``relay.wire``).
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from twisted.internet import defer, error, task
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from relay import __version__
from relay.compression import (
    COMPRESSION,
    DEFAULT_COMPRESS_LEVEL,
    DEFAULT_COMPRESS_MIN,
    InflatingDecoder,
    compress_frame,
)
from relay.wire import (
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
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
# The HELLO extension that acknowledges each accepted JSON MESSAGE.
ACKS = "acks"
# The HELLO extension that replays, on a join with since, what was missed.
HISTORY = "history"
# Join/leave events and member lists; messages to users.
PRESENCE = "presence"
DIRECT = "direct"


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
    ``seq`` are set when the server sent them (JSON messages only).  With
    the ``history`` extension JSON messages also carry the room's ``epoch``,
    and ``replayed`` is True for those replayed by a join with ``since``.
    """

    room: str
    sender: str
    content: Any = None
    data: bytes | None = None
    timestamp: int | None = None
    seq: int | None = None
    binary: bool = False
    epoch: str | None = None
    replayed: bool = False


@dataclass(frozen=True)
class PresenceEvent:
    """A member joined or left one of this connection's rooms (``presence``).

    ``event`` is ``"join"`` or ``"leave"``; a disconnect is a leave.
    """

    room: str
    event: str
    user_id: str
    connection_id: str


@dataclass(frozen=True)
class MemberList:
    """Who is in a room (``who()``): ``members`` lists (user id, connections),
    ``count`` the distinct users, ``truncated`` whether the list was capped."""

    room: str
    members: list[tuple[str, int]]
    count: int
    truncated: bool = False


@dataclass(frozen=True)
class DirectMessage:
    """A message sent to this connection's user (``direct``), not to a room."""

    to: str
    sender: str
    content: Any = None
    timestamp: int | None = None


class MessageStream:
    """An async iterator over incoming messages, from when it was created.

    Messages wait in the stream until consumed; iteration ends once the
    connection (or the reconnecting client) is closed and the backlog is read.
    """

    def __init__(self, hub: MessageHub) -> None:
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


class MessageHub:
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


def default_error_handler(relay_error: RelayError) -> None:
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

    ``acks=True`` asks the server for the ``acks`` extension; once the HELLO
    ack lists it (``acks_enabled``), ``send()`` waits for the server's answer.

    ``compression=True`` asks for the ``compression`` extension; once the
    HELLO ack lists it (``compression_enabled``), compressed deliveries are
    inflated (bounded by the frame limit, like any frame) and MESSAGE
    payloads over ``compress_min`` bytes are sent compressed.

    ``history=True`` asks for the ``history`` extension: ``positions`` then
    holds each room's last ``(seq, epoch)`` seen, from deliveries and join
    acks; ``join(room, since=...)`` has the server replay what came after
    it, and a delivery seen already (same epoch, seq not past the
    position) is dropped, so none reaches the application twice.

    ``presence=True`` asks for join/leave events (``on_presence`` and
    ``presence_events()``, each a ``PresenceEvent``) and lets ``who(room)``
    ask for a room's members.  ``direct=True`` asks for direct messages:
    ``send_direct(user, content)`` and, for messages to this user,
    ``on_direct`` and ``direct_messages()`` (each a ``DirectMessage``).
    """

    def __init__(self, reactor: Any, user: str | None = None, token: str | None = None,
                 echo: bool = False, acks: bool = False, compression: bool = False,
                 compress_min: int = DEFAULT_COMPRESS_MIN, history: bool = False,
                 presence: bool = False, direct: bool = False) -> None:
        self._reactor = reactor
        self.callLater = reactor.callLater  # for TimeoutMixin
        asked = ((ACKS, acks), (COMPRESSION, compression), (HISTORY, history), (PRESENCE, presence), (DIRECT, direct))
        features = [name for name, wanted in asked if wanted]
        self._hello = _hello_body(user, token, echo, features)
        self._asked_acks = acks
        self._asked_compression = compression
        # Frames longer than this are sent compressed, once negotiated.
        self._compress_above: int | None = None
        self._compress_min = compress_min
        self._asked_history = history
        # Room -> (seq, epoch) of the last delivery or join ack (history only).
        self.positions: dict[str, tuple[int, str]] = {}
        # Ids of sends written before the HELLO ack said whether acks are on.
        self._unconfirmed_sends: set[int] = set()
        self._decoder = Decoder(DEFAULT_MAX_FRAME_SIZE + MAX_ENVELOPE, known_types=frozenset(MessageType))
        self._ids = itertools.count(1)
        self._pending: dict[int, defer.Deferred[dict[str, Any]]] = {}
        self._pings: collections.deque[tuple[int, float, defer.Deferred[float] | None]] = (
            collections.deque()
        )
        self._ping_ids = itertools.count(1)
        self._heartbeat: task.LoopingCall | None = None
        self._hub = MessageHub()
        self._close_reason: Failure | None = None
        self._closed_waiters: list[defer.Deferred[None]] = []
        self.is_open = False
        self._closing = False
        self.ready: defer.Deferred[RelayClientProtocol] = defer.Deferred(self._cancel_hello)
        self.server_info: dict[str, Any] = {}
        self.max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.on_message: Callable[[Message], Any] | None = None
        self.on_error: Callable[[RelayError], Any] = default_error_handler
        # The presence and direct extensions.
        self._presence_hub = MessageHub()
        self._direct_hub = MessageHub()
        self.on_presence: Callable[[PresenceEvent], Any] | None = None
        self.on_direct: Callable[[DirectMessage], Any] | None = None

    # Public API

    @property
    def user_id(self) -> str | None:
        """The user id the server assigned (after ``ready``)."""
        return self.server_info.get("userId")

    @property
    def heartbeat_interval(self) -> float | None:
        """Seconds between automatic heartbeats, as the server advertised."""
        return self.server_info.get("heartbeatInterval")

    @property
    def features(self) -> list[str]:
        """The extensions the HELLO ack enabled for this connection."""
        features = self.server_info.get("features")
        return [f for f in features if isinstance(f, str)] if isinstance(features, list) else []

    @property
    def acks_enabled(self) -> bool:
        """Whether the server acknowledges each accepted ``send()``."""
        return self._asked_acks and ACKS in self.features

    @property
    def compression_enabled(self) -> bool:
        """Whether frames with flag 0x04 (zlib payloads) may flow both ways."""
        return self._asked_compression and COMPRESSION in self.features

    @property
    def history_enabled(self) -> bool:
        """Whether the server keeps history for this connection's rooms."""
        return self._asked_history and HISTORY in self.features

    def join(self, room: str, since: tuple[int, str] | None = None) -> defer.Deferred[dict[str, Any]]:
        """Join ``room``; fires with the ack body (``room``, ``members``).

        With history enabled the ack also has the room's ``seq`` and
        ``epoch``, and ``since`` (a ``(seq, epoch)`` from ``positions``)
        has the missed messages replayed first, the ack then saying
        ``recovered`` (nothing was missed) and how many were ``replayed``.
        """
        body: dict[str, Any] = {"room": room}
        if since is not None and self.history_enabled:
            body["since"] = {"seq": since[0], "epoch": since[1]}
        joining = self._request(MessageType.JOIN_ROOM, body)
        if self._asked_history:
            joining.addCallback(self._track_join)
        return joining

    def _track_join(self, ack: dict[str, Any]) -> dict[str, Any]:
        room, seq, epoch = ack.get("room"), ack.get("seq"), ack.get("epoch")
        if isinstance(room, str) and type(seq) is int and isinstance(epoch, str) and epoch:
            known = self.positions.get(room)
            if known is None or known[1] != epoch or known[0] < seq:
                self.positions[room] = (seq, epoch)
        return ack

    @property
    def presence_enabled(self) -> bool:
        """Whether the server sends presence events and answers ``who()``."""
        return PRESENCE in self.features

    @property
    def direct_enabled(self) -> bool:
        """Whether the server relays ``send_direct()`` and direct messages to this user."""
        return DIRECT in self.features

    def who(self, room: str) -> defer.Deferred[MemberList]:
        """The members of ``room`` (one of this connection's rooms), across
        the cluster; needs ``presence``.  Fails with the server's RelayError
        (NOT_IN_ROOM, FORBIDDEN...)."""
        return self._request(MessageType.PRESENCE, {"room": room}).addCallback(_member_list)

    def send_direct(self, user: str, content: Any) -> defer.Deferred[None]:
        """Send JSON ``content`` to every direct-enabled connection of ``user``.

        With ``acks_enabled`` it fires once the server delivered it, or fails
        with its RelayError (USER_OFFLINE, FORBIDDEN...); otherwise it fires
        once written and a refusal reaches ``on_error``.
        """
        request_id = next(self._ids)
        frame = encode_json(MessageType.MESSAGE, {"id": request_id, "to": user, "content": content})
        if not (self.ready.called and self.acks_enabled):
            return self._write_frame(frame)
        problem = self._unsendable(frame)
        if problem is not None:
            return defer.fail(problem)
        accepted = self._expect(request_id)
        self.transport.write(frame)
        return accepted.addCallback(lambda ack: None)

    def presence_events(self) -> AsyncIterator[PresenceEvent]:
        """An async iterator over the presence events received from now on."""
        return self._presence_hub.subscribe()

    def direct_messages(self) -> AsyncIterator[DirectMessage]:
        """An async iterator over the direct messages received from now on."""
        return self._direct_hub.subscribe()

    def leave(self, room: str) -> defer.Deferred[dict[str, Any]]:
        """Leave ``room``; fires with the ack body."""
        return self._request(MessageType.LEAVE_ROOM, {"room": room})

    def send(self, room: str, content: Any) -> defer.Deferred[int | None]:
        """Publish JSON ``content`` to ``room``.

        With ``acks_enabled`` it fires with the room's ``seq`` for the message
        once the server accepted it, or fails with the server's RelayError
        (NOT_IN_ROOM, RATE_LIMITED...).  Otherwise plain Relay v1 applies: it
        fires with None once the frame is written, and a refusal reaches
        ``on_error``, its ``request_id`` being this message's id.
        """
        request_id = next(self._ids)
        frame = encode_json(MessageType.MESSAGE, {"id": request_id, "room": room, "content": content})
        if not self._asked_acks or (self.ready.called and not self.acks_enabled):
            return self._write_frame(frame)
        problem = self._unsendable(frame)
        if problem is not None:
            return defer.fail(problem)
        accepted = self._expect(request_id)
        if not self.ready.called:
            self._unconfirmed_sends.add(request_id)
        self.transport.write(self._compressed(frame))
        return accepted.addCallback(lambda ack: ack.get("seq"))

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
        self._presence_hub.close()
        self._direct_hub.close()
        log.info("Relay connection closed: {why}", why=self._close_reason.getErrorMessage())
        waiters, self._closed_waiters = self._closed_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return  # nothing is read after a fatal ERROR or a violation
        self.resetTimeout()
        decoder = self._decoder
        try:
            for frame in decoder.feed(data):
                self._dispatch(frame)
                if self._closing:
                    return
                if self._decoder is not decoder:  # compression: the rest is read by the new one
                    self.dataReceived(b"")
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
        elif frame.type == MessageType.PRESENCE:
            self._on_presence(loads(frame.payload))
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
        if frame.is_binary:
            message = _binary_delivery(frame)
        else:
            body = loads(frame.payload)
            if not isinstance(body, dict):
                raise ProtocolError(ErrorCode.PARSE_ERROR, "MESSAGE payload is not an object")
            if self._asked_acks and _is_publish_ack(body):
                self._on_reply(body)
                return
            if "to" in body and "room" not in body:
                self._on_direct(body)
                return
            message = _json_delivery(body)
            if message.epoch is not None and self._seen_already(message):
                return
        if self.on_message is not None:
            try:
                self.on_message(message)
            except Exception:
                log.failure("on_message raised; the message is still delivered to streams")
        self._hub.publish(message)

    def _seen_already(self, message: Message) -> bool:
        """Track a history delivery's position; True if it was delivered before."""
        seq = message.seq
        if type(seq) is not int:
            return False
        known = self.positions.get(message.room)
        if known is not None and known[1] == message.epoch and seq <= known[0]:
            return True
        self.positions[message.room] = (seq, message.epoch)
        return False
    def _on_presence(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise ProtocolError(ErrorCode.PARSE_ERROR, "PRESENCE payload is not an object")
        if "event" not in body:  # a member list, answering who()
            self._on_reply(body)
            return
        event = PresenceEvent(
            room=str(body.get("room", "")),
            event=str(body.get("event", "")),
            user_id=str(body.get("userId", "")),
            connection_id=str(body.get("connectionId", "")),
        )
        self._hand_over(self.on_presence, self._presence_hub, event)

    def _on_direct(self, body: dict[str, Any]) -> None:
        message = DirectMessage(
            to=str(body.get("to", "")),
            sender=str(body.get("from", "")),
            content=body.get("content"),
            timestamp=body.get("timestamp"),
        )
        self._hand_over(self.on_direct, self._direct_hub, message)

    @staticmethod
    def _hand_over(callback: Callable[[Any], Any] | None, hub: MessageHub, item: Any) -> None:
        if callback is not None:
            try:
                callback(item)
            except Exception:
                log.failure("an application callback raised; the item still goes to streams")
        hub.publish(item)

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
        if self.compression_enabled:
            self._decoder = InflatingDecoder(self._decoder)
            self._compress_above = self._compress_min + HEADER_SIZE
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
        self._settle_unconfirmed_sends()
        log.info("Relay connected as {user}", user=self.user_id)
        self.ready.callback(self)

    def _settle_unconfirmed_sends(self) -> None:
        """Sends written before the HELLO ack: without acks, none will come."""
        unconfirmed, self._unconfirmed_sends = self._unconfirmed_sends, set()
        if self.acks_enabled:
            return
        for request_id in unconfirmed:
            waiter = self._pending.pop(request_id, None)
            if waiter is not None and not waiter.called:
                waiter.callback({})

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
        problem = self._unsendable(frame)
        if problem is not None:
            return defer.fail(problem)
        self.transport.write(self._compressed(frame))
        return defer.succeed(None)

    def _compressed(self, frame: bytes) -> bytes:
        """``frame`` compressed when negotiated and its payload is over ``compress_min``.

        The server bounds the inflated frame by its limit, as the plain one:
        ``_unsendable`` checks the frame before it is compressed.
        """
        above = self._compress_above
        if above is not None and len(frame) > above:
            return compress_frame(frame, DEFAULT_COMPRESS_LEVEL)
        return frame

    def _unsendable(self, frame: bytes) -> Exception | None:
        """Why ``frame`` cannot be written now, or None if it can."""
        if not self.is_open:
            return self._not_connected()
        length = len(frame) - 4
        if length > self.max_frame_size:
            return ValueError(
                f"a {length}-byte frame exceeds the server's limit of {self.max_frame_size}"
            )
        return None

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


def _hello_body(user: str | None, token: str | None, echo: bool,
                features: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = {"clientVersion": f"relay-client/{__version__}", "echo": echo}
    if user is not None:
        body["userId"] = user
    if token is not None:
        body["token"] = token
    if features:  # a client asking for nothing sends no list, as before
        body["features"] = features
    return body


def _is_publish_ack(body: dict[str, Any]) -> bool:
    # An ack has no "from", so it cannot be taken for a delivery.
    return body.get("status") == "published" and "from" not in body


def _member_list(body: dict[str, Any]) -> MemberList:
    members = body.get("members")
    entries = members if isinstance(members, list) else []
    listed = [
        (str(entry.get("userId", "")), int(entry.get("connections", 0)))
        for entry in entries
        if isinstance(entry, dict)
    ]
    return MemberList(
        room=str(body.get("room", "")),
        members=listed,
        count=int(body.get("count", len(listed))),
        truncated=bool(body.get("truncated", False)),
    )


def _binary_delivery(frame: Frame) -> Message:
    room, sender, data = decode_binary_delivery(frame.payload)
    return Message(room=room, sender=sender, data=data, binary=True)


def _json_delivery(body: dict[str, Any]) -> Message:
    epoch = body.get("epoch")
    return Message(
        room=str(body.get("room", "")),
        sender=str(body.get("from", "")),
        content=body.get("content"),
        timestamp=body.get("timestamp"),
        seq=body.get("seq"),
        epoch=epoch if isinstance(epoch, str) else None,
        replayed=body.get("replayed") is True,
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


class RelayClientFactory(Factory):
    """Builds one configured ``RelayClientProtocol`` per connection."""

    def __init__(self, reactor: Any, **options: Any) -> None:
        self.reactor = reactor
        self.options = options

    def buildProtocol(self, addr: Any) -> RelayClientProtocol:
        return RelayClientProtocol(self.reactor, **self.options)
