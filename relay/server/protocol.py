"""RelayProtocol: one client connection, on any stream transport.

The protocol is thin glue between a transport and the sans-IO codec in
``relay.wire``.  It owns the connection's lifecycle::

    INIT -> OPEN <-> DRAINING -> CLOSING -> CLOSED

and its outbound path.  Frames for the client (replies and deliveries) are
appended to an outbox; the factory flushes every dirty outbox once at the end
of each inbound read, so each member gets one transport write per read,
however many frames it carried.  Consecutive broadcasts to a room share one
outbox entry, a ``Fanout``, joined once for all members at the flush
(``relay.server.fanout``).  Requests are parsed and checked by the sans-IO
``relay.requests``; what is left here depends on the connection's state.
The protocol is the transport's push producer: while the transport is paused
(DRAINING) the outbox keeps growing, and past ``max_pending`` bytes the
client is cut off as a slow consumer.
"""

from __future__ import annotations

import enum
import socket
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, NoReturn

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from relay import __version__
from relay.compression import COMPRESSION, InflatingDecoder
from relay.requests import (
    Hello,
    RequestError,
    json_body,
    normalize_room_name,
    parse_binary_publish,
    parse_hello,
    parse_publish,
    parse_room_request,
)
from relay.server.auth import Grant, Unauthorized
from relay.server.direct import DIRECT, direct_request, offline_error
from relay.server.fanout import Fanout, frames_of
from relay.server.history import HISTORY, parse_since
from relay.server.limits import clip, rate_limited_error
from relay.server.presence import PRESENCE
from relay.server.rooms import Room
from relay.server.socket_write import DrainWatch, socket_send
from relay.server.tls import certificate_user_id
from relay.wire import (
    MAX_ENVELOPE,
    Decoder,
    ErrorCode,
    Flags,
    Frame,
    MessageType,
    ProtocolError,
    encode,
    encode_binary_delivery_frame,
    encode_error,
    encode_json,
)

if TYPE_CHECKING:
    from relay.server.factory import RelayFactory

log = Logger()

# HELLO extensions: acks answers each accepted JSON MESSAGE that has an id.
ACKS = "acks"
# The extensions this server offers, in the order its HELLO ack lists them.
SUPPORTED_FEATURES = (ACKS, COMPRESSION, HISTORY, PRESENCE, DIRECT)
# How long a closing connection may take to flush its last frames to a peer
# that does not read, before it is aborted.
CLOSE_GRACE_SECONDS = 5.0


class State(enum.Enum):
    INIT = "INIT"
    OPEN = "OPEN"
    DRAINING = "DRAINING"
    CLOSING = "CLOSING"
    CLOSED = "CLOSED"


# The hot paths compare against plain module globals: looking a member up on
# its enum class, or combining IntFlags, costs far more than the work itself.
_OPEN = State.OPEN
_DRAINING = State.DRAINING
_BINARY = int(Flags.BINARY)
_MESSAGE = int(MessageType.MESSAGE)
# The socket families that TCP options apply to.
_INET = (socket.AF_INET, socket.AF_INET6)

_ALLOWED_TRANSITIONS = {
    State.INIT: {State.OPEN},
    State.OPEN: {State.DRAINING, State.CLOSING, State.CLOSED},
    State.DRAINING: {State.OPEN, State.CLOSING, State.CLOSED},
    State.CLOSING: {State.CLOSED},
    State.CLOSED: set(),
}


class _Held(Exception):
    """Stops handling the frames of a read: until a cluster join is counted,
    or because a new decoder took the rest of it."""


class IMessageTransport(Interface):
    """A transport that keeps message boundaries (WebSocket).

    The protocol hands it outbox entries instead of joined bytes, and it
    sends each frame as one message (a shared ``Fanout`` framed once for
    all the members on such transports).
    """

    def write_entries(entries: list[bytes | Fanout]) -> None:
        """Send every frame of ``entries`` (frames and Fanouts), in order, one message each."""


@implementer(IPushProducer, IHandshakeListener)
class RelayProtocol(Protocol, TimeoutMixin):
    """One client connection speaking Relay v1."""

    # MessageType.ERROR once a client's ERROR frame was logged; shared and
    # empty until then.
    _refusals_logged: frozenset[MessageType] = frozenset()
    # State most connections never change, as class defaults: past 29
    # instance attributes CPython 3.11 stops sharing dict keys, and every
    # attribute read on the hot path gets slower.
    certified_user_id: str | None = None  # from a verified client certificate
    acks = False  # the acks extension, enabled by HELLO
    history = False  # the history extension (relay.server.history), enabled by HELLO
    _close_call: Any = None
    _held = False  # True while a JOIN waits for the cluster's member count
    _auth: Any = None  # relay.server.auth.Authenticator, when configured
    grant: Grant | None = None
    _auth_timer: Any = None
    # Extensions (relay.server.presence, relay.server.direct), set by HELLO.
    presence = False
    direct = False
    # The socket's send while the transport holds no unsent byte: writes
    # skip the transport (relay.server.socket_write).  None: write through it.
    _send: Any = None

    def __init__(self, factory: RelayFactory) -> None:
        self.factory = factory
        config = factory.config
        self._debug = config.debug
        self._max_pending = config.max_pending
        self._max_delivery = config.max_frame_size + MAX_ENVELOPE
        self._reactor = factory.reactor
        self._batch = factory.batch
        self.callLater = factory.reactor.callLater  # for TimeoutMixin
        self._decoder = Decoder(config.max_frame_size)
        self.state = State.INIT
        self.connection_id = factory.new_connection_id()
        self.user_id = f"anon-{self.connection_id}"
        self.echo = False
        self.rooms: set[str] = set()
        self._outbox: list[bytes | Fanout] = []
        # The outbox's last entry when it is a Fanout that may still grow.
        self._shared_tail: Fanout | None = None
        self._pending_bytes = 0
        self._said_hello = False
        self._requests_seen = False
        self._keeps_message_boundaries = False
        # Limits (relay.server.limits): rate buckets, strikes, logged limits,
        # the hello deadline, in one attribute (see the class defaults).
        self._limits = factory.limits.connection_limits()
        self._handlers: dict[int, Callable[[Frame], None]] = {
            MessageType.HELLO: self._on_hello,
            MessageType.JOIN_ROOM: self._on_join,
            MessageType.LEAVE_ROOM: self._on_leave,
            MessageType.MESSAGE: self._on_message,
            MessageType.HEARTBEAT: self._on_heartbeat,
            MessageType.ERROR: self._on_client_error,
        }
        if self._limits.limits_publishes:
            self._handlers[MessageType.MESSAGE] = self._on_limited_message
        # Authentication (relay.server.auth): until a HELLO proves who the
        # client is, it may only say HELLO and heartbeat.
        # The rooms it may publish to: its rooms, unless a grant says
        # otherwise; then a set of its own, decided at each join.
        self._publishable = self.rooms
        if factory.auth is not None:
            self._auth = factory.auth
            self._granted_handlers = self._handlers
            self._handlers = self._unauthenticated_handlers()

    def __repr__(self) -> str:
        return f"<RelayProtocol {self.connection_id} {self.state.value}>"

    # Lifecycle

    def _transition(self, new: State) -> bool:
        old = self.state
        if new not in _ALLOWED_TRANSITIONS[old]:
            log.critical(
                "BUG: illegal state transition {old} -> {new} on {conn}",
                old=old.value,
                new=new.value,
                conn=self.connection_id,
            )
            return False
        self.state = new
        if self._debug:
            log.debug(
                "{conn} state {old} -> {new}",
                conn=self.connection_id,
                old=old.value,
                new=new.value,
            )
            self._check_shared_tail(old)
        return True

    def _check_shared_tail(self, old: State) -> None:
        """A member holding an open Fanout stays OPEN until the flush
        (``relay.server.fanout``); leaving OPEN with one is a bug."""
        tail = self._shared_tail
        if old is _OPEN and tail is not None and not tail.closed:
            log.critical(
                "BUG: {conn} left OPEN holding an open shared fan-out entry",
                conn=self.connection_id,
            )

    @property
    def accepting(self) -> bool:
        """True while the connection takes new work (OPEN or DRAINING)."""
        state = self.state
        return state is _OPEN or state is _DRAINING

    def connectionMade(self) -> None:
        self._transition(State.OPEN)
        refusal = self.factory.limits.admit(self, self.transport.getPeer())
        if refusal is not None:
            self.fail(ErrorCode.TOO_MANY_CONNECTIONS, refusal)
            return
        if hasattr(self.transport, "bufferSize"):  # socket transports, not wrappers
            # Bigger reads batch more frames into each flush.  The write
            # buffer counts toward max-pending, so it stays well under it.
            config = self.factory.config
            self.transport.bufferSize = min(config.read_size, config.max_pending // 4)
        cap_send_buffer(self.transport, self.factory.config.send_buffer)
        # Decided once: the flush asks it for every write.
        self._keeps_message_boundaries = IMessageTransport.providedBy(self.transport)
        send = None if self._keeps_message_boundaries else socket_send(self.transport)
        if send is not None:
            self._send = send
        sock = stream_socket(self.transport)  # under TLS and WebSocket too
        if sock is not None and sock.family in _INET:
            # Finds peers that vanished without a word, even with no idle timeout.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            # Each flush is one write of all that is due: Nagle's algorithm
            # would only hold a small delivery back until the peer's
            # delayed ACK (up to 40 ms), as Redis and NATS know.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.registerProducer(self, True)
        self.factory.connection_opened(self)
        if self._auth is not None and self.factory.config.hello_timeout:
            self._auth_timer = self.callLater(self.factory.config.hello_timeout, self._hello_missed)
        log.info(
            "{conn} connected from {peer}",
            conn=self.connection_id,
            peer=_describe_peer(self.transport),
        )
        if self.factory.over_capacity():
            self.factory.connection_refused("max_connections")
            self.fail(
                ErrorCode.TOO_MANY_CONNECTIONS,
                f"the server is at its limit of {self.factory.config.max_connections} connections",
            )
            return
        self.setTimeout(self.factory.config.hello_timeout or None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.state is State.CLOSED:
            return
        self._transition(State.CLOSED)
        self.setTimeout(None)
        self._end_auth()
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        self._take_outbox()
        for room in self.rooms:
            self.factory.registry.leave(self, room)
        self.rooms.clear()
        if self.direct:
            self.factory.direct.remove(self)
        self.factory.flush()  # presence events of the leaves, outside any read
        self.factory.limits.release(self)
        self.factory.connection_closed(self)
        log.info(
            "{conn} disconnected: {why}{suppressed}",
            conn=self.connection_id,
            why=reason.getErrorMessage(),
            suppressed=_suppressed_note(self._limits.suppressed),
        )
        # Break the cycles through bound methods and buffers, so reference
        # counting frees the connection without the cyclic collector.
        self._handlers.clear()
        vars(self).pop("enqueue", None)  # a delivery variant's override (compression)
        self._decoder = None
        self._close_call = None

    def handshakeCompleted(self) -> None:
        """A TLS transport finished its handshake: a client certificate
        (only ever requested, and so only present, when a client CA is
        configured) names the user."""
        user_id = certificate_user_id(self.transport.getPeerCertificate())
        if user_id is not None:
            self.user_id = self.certified_user_id = user_id

    def timeoutConnection(self) -> None:
        if self._limits.hello_pending:
            self.fail(*self.hello_timeout_error())
            return
        self.fail(
            ErrorCode.HEARTBEAT_TIMEOUT,
            f"no frame received for {self.factory.config.idle_timeout} seconds",
        )

    def hello_timeout_error(self) -> tuple[ErrorCode, str]:
        """The fatal ERROR for a connection that missed its hello deadline.

        Authentication, when configured, answers UNAUTHORIZED instead.
        """
        return (
            ErrorCode.HEARTBEAT_TIMEOUT,
            f"no complete frame received within {self.factory.config.hello_timeout} seconds",
        )

    def hello_deadline_met(self) -> bool:
        """Whether the frames received so far meet the hello deadline.

        Any complete frame does; authentication, when configured, waits for
        the HELLO instead.
        """
        return True

    def _frames_completed(self) -> None:
        """A read completed frames: the idle timer counts complete frames only."""
        limits = self._limits
        if not limits.hello_pending:
            self.resetTimeout()
        elif self.hello_deadline_met():
            limits.hello_pending = False
            self.setTimeout(self.factory.config.idle_timeout or None)

    def fail(self, code: ErrorCode, message: str, error: bytes | None = None) -> None:
        """End the connection with a fatal ERROR, written after what is queued.

        ``error`` is the ERROR frame to send, when it carries more than
        ``code`` and ``message``.
        """
        if not self.accepting:
            return
        self.factory.stats.errors_sent[code] += 1
        log.info(
            "{conn} closing: {code} {message}", conn=self.connection_id, code=code.value, message=message
        )
        # Written now, so no Fanout in it is held past this point.
        frames = self._take_outbox()
        self.factory.limits.outbound.release(self)
        self._transition(State.CLOSING)
        self.setTimeout(None)
        if error is None:
            error = encode_error(code, message)
        if code is ErrorCode.SLOW_CONSUMER:
            # It cannot be flushed to: best effort, then drop it at once.
            self._trace_out(error)
            stats = self.factory.stats
            stats.frames_out += 1
            stats.bytes_out += len(error)
            stats.frames_out_by_type[MessageType.ERROR] += 1
            self.transport.write(error)
            self.transport.abortConnection()
            return
        frames.append(error)
        self._write(frames)
        self.transport.loseConnection()
        self._close_call = self.callLater(CLOSE_GRACE_SECONDS, self.transport.abortConnection)

    # Inbound

    def dataReceived(self, data: bytes) -> None:
        try:
            self.receive(data)
        finally:
            self.factory.flush()

    def receive(self, data: bytes) -> None:
        """Handle the frames ``data`` completes, leaving what they produce
        queued: the caller flushes (``RelayFactory.flush``), once per read."""
        if not self.accepting:
            return  # nothing is parsed after a violation
        stats = self.factory.stats
        stats.bytes_in += len(data)
        seen = stats.frames_in
        if self._held:  # a JOIN waits for the cluster: frames wait too
            self._decoder.feed(data)
            return
        try:
            for frame in self._decoder.feed(data):
                stats.frames_in += 1
                if self._debug:
                    self._trace("in", frame)
                try:  # inline: a call per frame is a measurable share of s3
                    self._handlers[frame.type](frame)
                except RequestError as refusal:
                    self._refuse(refusal)
                state = self.state
                if state is not _OPEN and state is not _DRAINING:
                    break
        except ProtocolError as error:
            self.fail(error.code, error.message)
        except _Held:
            pass
        finally:
            if stats.frames_in != seen:
                self._frames_completed()

    def _refuse(self, refusal: RequestError) -> None:
        """Answer a request the server will not carry out (the connection stays)."""
        self.factory.stats.errors_sent[refusal.code] += 1
        self._log_refusal(refusal)
        self.factory.limits.counters[f"refused_{refusal.code.value}"] += 1
        self.enqueue(encode_error(refusal.code, refusal.message, refusal.request_id))

    def _log_refusal(self, refusal: RequestError) -> None:
        """Log the first refusal of each code on this connection (the rest
        are counted): a client repeating a mistake must not flood the log."""
        if not self._limits.first_time(refusal.code.value):
            return
        log.info(
            "{conn} refused a request: {code} {message} (logged once per code per connection)",
            conn=self.connection_id,
            code=refusal.code.value,
            message=_bounded(refusal.message),
        )

    def _on_hello(self, frame: Frame) -> None:
        self.factory.stats.frames_in_by_type[MessageType.HELLO] += 1
        hello = parse_hello(frame)
        request_id = hello.request_id
        if self._said_hello or self._requests_seen:
            raise RequestError(
                ErrorCode.BAD_REQUEST, "HELLO is accepted once, as the first request", request_id
            )
        grant = self._authenticate(hello) if self._auth is not None else None
        if hello.user_id is not None and self.certified_user_id not in (None, hello.user_id):
            raise RequestError(
                ErrorCode.BAD_REQUEST,
                f'"userId" must be {self.certified_user_id!r}, the client certificate\'s name',
                request_id,
            )
        self._said_hello = True
        if hello.user_id is not None:
            self.user_id = hello.user_id
        if grant is not None:
            self._admit(grant)
        self.echo = hello.echo
        enabled = negotiate_features(hello.features)
        self.acks = ACKS in enabled
        if HISTORY in enabled:  # offered only when --history is on
            self.history = self.factory.history is not None
            if not self.history:
                enabled.remove(HISTORY)
        self._enable_extensions(enabled)
        compressing = COMPRESSION in enabled
        if compressing:  # relay.server.compression
            self._decoder = InflatingDecoder(self._decoder)
            self.factory.compressor.serve(self)
        config = self.factory.config
        self._reply(
            MessageType.HELLO,
            {
                "status": "connected",
                "connectionId": self.connection_id,
                "userId": self.user_id,
                "serverVersion": __version__,
                "heartbeatInterval": config.heartbeat_interval,
                "maxFrameSize": config.max_frame_size,
                "features": enabled,
            },
            request_id,
        )
        if compressing or (PRESENCE in enabled and self._decoder.buffered):
            self._decode_rest()

    def _decode_rest(self) -> NoReturn:
        """The decoder changed (compressed frames or the PRESENCE type are
        now accepted): the new one decodes the rest of this read, and the
        old loop stops."""
        self.dataReceived(b"")
        raise _Held()

    def _enable_extensions(self, enabled: list[str]) -> None:
        """Turn on the negotiated extensions that need handlers of their own."""
        if PRESENCE in enabled:
            self.presence = True
            self._decoder.known_types = self._decoder.known_types | {MessageType.PRESENCE}
            self._handlers[MessageType.PRESENCE] = self._on_presence
        if DIRECT in enabled:
            self.direct = True
            self.factory.direct.add(self)
            room_path = self._handlers[MessageType.MESSAGE]
            self._handlers[MessageType.MESSAGE] = lambda frame: self._on_message_or_direct(room_path, frame)

    def _on_presence(self, frame: Frame) -> None:
        self.factory.stats.frames_in_by_type[MessageType.PRESENCE] += 1
        self._requests_seen = True
        reply = self.factory.presence.query(self, frame)
        if isinstance(reply, Deferred):  # a cluster's list, from Redis: reply in order
            self._hold(reply.addCallback(self._answer_held))
        self.enqueue(reply)

    def _on_message_or_direct(self, room_path: Callable[[Frame], None], frame: Frame) -> None:
        """A MESSAGE of a direct-enabled connection: to a room, or (no
        ``"room"``, a ``"to"``) to a user.  Rate limits apply to both."""
        try:
            room_path(frame)
            return
        except RequestError:
            request = direct_request(frame)
            if request is None:
                raise
        delivered = self.factory.direct.send(self, request)
        if isinstance(delivered, Deferred):  # nobody here: did another node take it?
            answer = delivered.addCallback(self._direct_answer, request)
            self._hold(answer.addCallback(self._answer_held))  # raises: no frame until then
        self._answer_direct(delivered, request)

    def _direct_answer(self, delivered: bool, request: Any) -> bytes | None:
        if delivered:
            return self._direct_ack(request)
        refusal = offline_error(request.to, request.request_id)
        self.factory.stats.errors_sent[refusal.code] += 1
        return encode_error(refusal.code, refusal.message, refusal.request_id)

    def _answer_direct(self, delivered: bool, request: Any) -> None:
        if not delivered:
            raise offline_error(request.to, request.request_id)
        ack = self._direct_ack(request)
        if ack is not None:
            self.enqueue(ack)

    def _direct_ack(self, request: Any) -> bytes | None:
        if not self.acks or request.request_id is None:
            return None
        ack = {"status": "published", "to": request.to, "id": request.request_id}
        return encode_json(MessageType.MESSAGE, ack)

    def _answer_held(self, frame: bytes | None) -> None:
        """The answer a held request waited for: send it, then go on with
        the frames that arrived meanwhile."""
        if frame is not None and self.accepting:
            self.enqueue(frame)
        if IPushProducer.providedBy(self.transport):
            self.transport.resumeProducing()
        self._resume()

    def _resume(self) -> None:
        self._held = False
        if self.accepting:
            self.dataReceived(b"")

    def _on_join(self, frame: Frame) -> None:
        self.factory.stats.frames_in_by_type[MessageType.JOIN_ROOM] += 1
        self._requests_seen = True
        request_id, room = parse_room_request(frame)
        since = parse_since(frame, request_id) if self.history else None
        new = room not in self.rooms
        if new:
            if self.grant is not None and not self.grant.may_join(room):
                raise RequestError(
                    ErrorCode.FORBIDDEN, f"room {room!r} is not granted to this connection", request_id
                )
            limit = self.factory.config.max_rooms
            if len(self.rooms) >= limit:
                raise RequestError(
                    ErrorCode.BAD_REQUEST,
                    f"a connection may be in at most {limit} rooms",
                    request_id,
                )
            # Only a join that adds a membership costs a token: rejoining is an ack.
            joins = self._limits.joins
            if joins is not None:
                wait = joins.take(self._reactor.seconds())
                if wait:
                    self._rate_limited("join", wait, request_id)
                    return
            self.rooms.add(room)
            if self.grant is not None and self.grant.may_publish(room):
                self._publishable.add(room)  # decided once, so publishing checks nothing more
            log.info("{conn} ({user}) joined {room}", conn=self.connection_id, user=self.user_id, room=room)
        counted = self.factory.registry.count_members(room, new)
        if self.history:  # replays what the connection missed, before the ack
            counted = self.factory.history.join(self, room, since, counted)
        if isinstance(counted, Deferred):  # a cluster counts in Redis: ack later, in order
            self._hold(counted.addCallback(self._joined_cluster, room, request_id))
        members = len(self.factory.registry.join(self, room))
        self._ack_join(room, members if counted is None else counted, request_id)

    def _ack_join(self, room: str, members: int, request_id: Any) -> None:
        body = {"status": "joined", "room": room, "members": members}
        if self.history:
            body.update(self.factory.history.ack_fields(self, room))
        self._reply(MessageType.JOIN_ROOM, body, request_id)

    def _joined_cluster(self, members: int, room: str, request_id: Any) -> None:
        """The cluster counted ``room``: join it, ack, and go on with the
        frames that arrived meanwhile."""
        self._held = False
        if not self.accepting:
            return
        self.factory.presence.counted(room, members)
        self.factory.registry.join(self, room)
        self._ack_join(room, members, request_id)
        if IPushProducer.providedBy(self.transport):
            self.transport.resumeProducing()
        self.dataReceived(b"")

    def _hold(self, counting: Deferred[Any]) -> NoReturn:
        """Handle no frame until ``counting`` fires, so that replies keep the
        order of their requests.  Reading pauses where the transport can
        (TCP); elsewhere frames wait in the decoder, for at most the
        backplane's reply timeout."""
        self._held = True
        if IPushProducer.providedBy(self.transport):
            self.transport.pauseProducing()
        counting.addErrback(lambda failure: log.failure("BUG: a cluster join failed", failure))
        raise _Held()

    def _on_leave(self, frame: Frame) -> None:
        self.factory.stats.frames_in_by_type[MessageType.LEAVE_ROOM] += 1
        self._requests_seen = True
        request_id, room = parse_room_request(frame)
        if room in self.rooms:
            self.rooms.discard(room)
            self._publishable.discard(room)
            self.factory.registry.leave(self, room)
            log.info("{conn} ({user}) left {room}", conn=self.connection_id, user=self.user_id, room=room)
        self._reply(MessageType.LEAVE_ROOM, {"status": "left", "room": room}, request_id)

    def _on_limited_message(self, frame: Frame) -> None:
        """A MESSAGE under --rate-limit or --byte-rate: dropped past the buckets."""
        wait = self._limits.publish_wait(self._reactor.seconds(), len(frame.payload))
        if wait:
            self._requests_seen = True
            self._rate_limited("publish", wait, None if frame.flags & _BINARY else _request_id_of(frame))
            return
        self._on_message(frame)

    def _rate_limited(self, what: str, wait: float, request_id: Any) -> None:
        """Refuse a request past its rate; enough strikes close the connection."""
        limits = self.factory.limits
        limits.counters[f"rate_limited_{what}"] += 1
        if self._limits.strikes.add(self._reactor.seconds()):
            limits.counters["rate_strikes"] += 1
            message = f"more than {self.factory.config.rate_strikes} rate-limited requests within 10 seconds"
            self.fail(ErrorCode.RATE_LIMITED, message, rate_limited_error(message, wait, request_id, True))
            return
        if self._limits.first_time(f"rate:{what}"):
            log.info(
                "{conn} rate-limited ({what}); further ones are counted, not logged",
                conn=self.connection_id,
                what=what,
            )
        self.enqueue(rate_limited_error(f"{what} rate exceeded; the request was dropped", wait, request_id))

    def _on_message(self, frame: Frame) -> None:
        """A MESSAGE to publish: binary, or JSON (handled here, the common case)."""
        self._requests_seen = True
        if frame.flags & _BINARY:
            self._on_binary_message(frame)
            return
        request_id, name, content = parse_publish(frame)
        # Most names are sent as joined (and, with auth, granted).
        if name in self._publishable:
            room = self.factory.registry.get(name)  # the registry dict's own get
        else:
            room = self._member_room(name, request_id)
        try:
            delivery = encode_json(
                _MESSAGE,
                {
                    "room": room.name,
                    "from": self.user_id,
                    "content": content,
                    "timestamp": int(self._reactor.seconds() * 1000),
                    "seq": room.seq + 1,
                },
            )
        except ValueError:
            raise RequestError(
                ErrorCode.BAD_REQUEST, '"content" is nested too deeply to relay', request_id
            ) from None
        self._publish(room, delivery, request_id)
        if self.acks and request_id is not None:
            # After the broadcast, so an echoed delivery comes first; sender only.
            ack = {"status": "published", "room": room.name, "seq": room.seq}
            self._reply(MessageType.MESSAGE, ack, request_id)

    def _on_binary_message(self, frame: Frame) -> None:
        name, start = parse_binary_publish(frame)
        room = self._member_room(name, None)
        delivery = encode_binary_delivery_frame(room.name, self.user_id, frame.payload, start)
        self._publish(room, delivery, None)

    def _member_room(self, name: str, request_id: Any) -> Room:
        """The room this connection may publish to, by the name it gave."""
        # Most names are sent as joined (and, with auth, granted): skip normalising.
        if name not in self._publishable:  # the same set as self.rooms without auth
            normalized = normalize_room_name(name)
            if normalized is None:
                raise RequestError(ErrorCode.INVALID_ROOM, f"invalid room name {clip(name)}", request_id)
            if normalized not in self.rooms:
                raise RequestError(
                    ErrorCode.NOT_IN_ROOM, f"not a member of room {clip(normalized)}", request_id
                )
            if normalized not in self._publishable:
                raise RequestError(
                    ErrorCode.FORBIDDEN, f"publishing to room {normalized!r} is not granted", request_id
                )
            name = normalized
        return self.factory.registry.get(name)

    def _publish(self, room: Room, delivery: bytes, request_id: Any) -> None:
        if len(delivery) - 4 > self._max_delivery:
            raise RequestError(
                ErrorCode.BAD_REQUEST,
                "the message would exceed the largest frame the server delivers",
                request_id,
            )
        room.seq += 1  # counts publishes that were delivered
        self.factory.stats.messages_published += 1
        room.broadcast(delivery, None if self.echo else self, self._batch, self.connection_id)

    def _on_heartbeat(self, frame: Frame) -> None:
        self.factory.stats.frames_in_by_type[MessageType.HEARTBEAT] += 1
        self.enqueue(encode(MessageType.HEARTBEAT, frame.flags, frame.payload))

    def _on_client_error(self, frame: Frame) -> None:
        self.factory.stats.frames_in_by_type[MessageType.ERROR] += 1
        if MessageType.ERROR in self._refusals_logged:
            return
        self._refusals_logged = self._refusals_logged | {MessageType.ERROR}
        log.warn(
            "{conn} sent an ERROR frame ({size} bytes); ignored (logged once per connection)",
            conn=self.connection_id,
            size=len(frame.payload),
        )

    def _reply(self, type_: MessageType, body: dict[str, Any], request_id: Any) -> None:
        if request_id is not None:
            body["id"] = request_id
        self.enqueue(encode_json(type_, body))

    # Authentication (relay.server.auth)

    def _unauthenticated_handlers(self) -> dict[int, Callable[[Frame], None]]:
        """Before a grant: HELLO and HEARTBEAT; any other frame is fatal."""
        handlers = dict.fromkeys(self._handlers, self._refuse_unauthenticated)
        handlers[MessageType.HELLO] = self._on_hello
        handlers[MessageType.HEARTBEAT] = self._on_heartbeat
        return handlers

    def _refuse_unauthenticated(self, frame: Frame) -> None:
        refusal = Unauthorized(f"{_type_name(frame.type)} before an accepted HELLO")
        raise self._auth.refused(refusal, self.connection_id)

    def _authenticate(self, hello: Hello) -> Grant:
        """The grant of a HELLO's token; raises Unauthorized (fatal)."""
        grant = self._auth.authenticate(
            hello.token, self._reactor.seconds(), self.connection_id, self.certified_user_id
        )
        identity = grant.user_id or self.user_id
        if hello.user_id not in (None, identity):
            raise RequestError(
                ErrorCode.BAD_REQUEST,
                f'"userId" must be {identity!r}, the identity the token gives, or be left out',
                hello.request_id,
            )
        return grant

    def _admit(self, grant: Grant) -> None:
        """Take the grant: its user id, the full request set, its expiry timer."""
        self.grant = grant
        if grant.user_id is not None:
            self.user_id = grant.user_id
        self._handlers = self._granted_handlers
        self._publishable = set()
        self._cancel_auth_timer()
        if grant.expires_at is not None:
            delay = max(0.0, grant.expires_at - self._reactor.seconds())
            self._auth_timer = self.callLater(delay, self._token_expired)

    def _hello_missed(self) -> None:
        self._auth_timer = None
        wanted = "HELLO" if self._auth.anonymous is not None else "HELLO with a token"
        timeout = self.factory.config.hello_timeout
        refusal = Unauthorized(f"no {wanted} within {timeout:g} seconds")
        self._auth.refused(refusal, self.connection_id)
        self.fail(refusal.code, refusal.message)

    def _token_expired(self) -> None:
        self._auth_timer = None
        self.fail(ErrorCode.UNAUTHORIZED, "token expired")

    def _cancel_auth_timer(self) -> None:
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self._auth_timer = None

    def _end_auth(self) -> None:
        self._cancel_auth_timer()
        self._granted_handlers = None  # no bound methods left to hold the connection

    # Outbound

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in this connection's outbox (not yet given to the transport)."""
        return _outbox_bytes(self._outbox)

    def enqueue(self, frame: bytes) -> None:
        """Queue one encoded frame for this client, in order.

        The caller (a read, through the factory) flushes after its batch.
        """
        if self._shared_tail is not None:
            self._shared_tail.close()  # this frame goes after it
            self._shared_tail = None
        state = self.state
        if state is _OPEN:
            outbox = self._outbox
            if not outbox:
                self._batch.mark_dirty(self)
            outbox.append(frame)
        elif state is _DRAINING:
            self._outbox.append(frame)
            self._pending_bytes += len(frame)
            if self._pending_bytes > self._max_pending:
                self.fail(
                    ErrorCode.SLOW_CONSUMER,
                    f"more than {self._max_pending} bytes waiting to be sent",
                )
                return
            outbound = self.factory.limits.outbound
            outbound.grow(self, len(frame))
            if outbound.total > outbound.limit:
                self.factory.limits.over_budget()

    def enqueue_shared(self, fanout: Fanout) -> bool:
        """Queue a room's shared ``fanout`` as one outbox entry, in order.

        Only while OPEN (a paused connection counts its bytes frame by
        frame); False asks the room for the frames one by one.
        """
        if self.state is not _OPEN:
            return False
        outbox = self._outbox
        if not outbox:
            self._batch.mark_dirty(self)
        elif self._shared_tail is not None:
            self._shared_tail.close()  # the new one goes after it
        outbox.append(fanout)
        self._shared_tail = fanout
        return True

    def flush(self) -> None:
        """Write the outbox to the transport, unless it is paused or closing."""
        entries = self._outbox
        if entries and self.state is _OPEN:
            # _take_outbox, inline: this runs once per member per flush.
            self._outbox = []
            self._shared_tail = None
            self._write(entries)

    def _take_outbox(self) -> list[bytes | Fanout]:
        """Empty the outbox, returning what it held."""
        entries, self._outbox = self._outbox, []
        self._shared_tail = None
        return entries

    def _write(self, entries: list[bytes | Fanout]) -> None:
        """Write outbox entries: frames, and shared fanouts joined once for all."""
        stats = self.factory.stats
        if self._debug:
            for frame in frames_of(entries):
                self._trace_out(frame)
        if self._keeps_message_boundaries:
            self._write_messages(entries)
            return
        if len(entries) == 1:
            entry = entries[0]
            if type(entry) is Fanout:
                stats.frames_out += len(entry.frames)
                data = entry.joined or entry.join()
            else:
                stats.frames_out += 1
                stats.frames_out_by_type[entry[5]] += 1
                data = entry
        else:
            parts = []
            for entry in entries:
                if type(entry) is Fanout:
                    stats.frames_out += len(entry.frames)
                    parts.append(entry.join())
                else:
                    stats.frames_out += 1
                    stats.frames_out_by_type[entry[5]] += 1
                    parts.append(entry)
            data = b"".join(parts)
        stats.bytes_out += len(data)
        send = self._send
        if send is not None:
            try:
                sent = send(data)
            except OSError:  # full (EAGAIN), or broken: the transport finds out which
                sent = 0
            if sent == len(data):
                return
            data = self._hand_to_transport(send, data[sent:])
        self.transport.write(data)
        if self.state is _DRAINING:
            self._paused_by_write(len(data))

    def _write_messages(self, entries: list[bytes | Fanout]) -> None:
        """Write outbox entries to a transport that keeps message boundaries."""
        stats = self.factory.stats
        size = 0
        for entry in entries:
            if type(entry) is Fanout:
                stats.frames_out += len(entry.frames)
                size += entry.size
            else:
                stats.frames_out += 1
                stats.frames_out_by_type[entry[5]] += 1
                size += len(entry)
        stats.bytes_out += size
        self.transport.write_entries(entries)
        if self.state is _DRAINING:
            self._paused_by_write(size)
    def _hand_to_transport(self, send: Any, rest: bytes) -> bytes:
        """A direct send was partial: ``rest`` goes through the transport,
        which may hold it for a while (see ``relay.server.socket_write``).

        An OPEN connection pauses itself until the transport is empty (the
        write of ``rest`` is then counted as pending, as a write that made
        Twisted pause it); a closing one just lets it go.
        """
        self._send = None
        if self.state is _OPEN:
            self._transition(State.DRAINING)
            self._pending_bytes = 0
            self.factory.limits.outbound.hold(self, 0)
            DrainWatch(self, self.transport, partial(self.drained, send)).start()
        return rest

    def drained(self, send: Any) -> None:
        """The transport sent all it held: write directly again, and resume."""
        self._send = send
        self.resumeProducing()

    def _paused_by_write(self, size: int) -> None:
        """The write of ``size`` bytes paused us: the transport holds them too."""
        self._pending_bytes += size
        self.factory.limits.outbound.grow(self, size)

    # IPushProducer: the transport tells us when its buffer is full.

    def pauseProducing(self) -> None:
        if self.state is State.OPEN:
            self._transition(State.DRAINING)
            # The transport pauses us once its buffer passes its size: count
            # that toward max-pending too (and the write that made it pause,
            # once it returns), so a paused connection's whole share of
            # memory is bounded, not only its outbox.
            self._pending_bytes = _outbox_bytes(self._outbox) + getattr(self.transport, "bufferSize", 0)
            self.factory.limits.outbound.hold(self, self._pending_bytes)

    def resumeProducing(self) -> None:
        if self.state is State.DRAINING:
            self._transition(State.OPEN)
            self._pending_bytes = 0
            self.factory.limits.outbound.release(self)
            self.flush()

    def stopProducing(self) -> None:
        self._take_outbox()

    # Debug tracing: only called when debug logging is on.

    def _trace(self, direction: str, frame: Frame) -> None:
        log.debug(
            "{conn} {direction} type={type} version=1 flags=0x{flags:02x} payload={size}B",
            conn=self.connection_id,
            direction=direction,
            type=_type_name(frame.type),
            flags=frame.flags,
            size=len(frame.payload),
        )

    def _trace_out(self, data: bytes) -> None:
        if self._debug:
            self._trace("out", Frame(data[5], data[6], data[7:]))


def negotiate_features(requested: tuple[str, ...]) -> list[str]:
    """The extensions to enable: those asked for that this server supports,
    in the server's order (a client that asks for nothing gets ``[]``)."""
    asked = set(requested)
    return [feature for feature in SUPPORTED_FEATURES if feature in asked]


def _outbox_bytes(entries: list[bytes | Fanout]) -> int:
    return sum(entry.size if type(entry) is Fanout else len(entry) for entry in entries)


# Longest refusal message logged: it may quote what the client sent.
_LOGGED_MESSAGE_LIMIT = 200


def _bounded(message: str) -> str:
    if len(message) <= _LOGGED_MESSAGE_LIMIT:
        return message
    return message[:_LOGGED_MESSAGE_LIMIT] + "..."
def _request_id_of(frame: Frame) -> Any:
    """The ``id`` of a JSON request refused before it was parsed, if it has a valid one."""
    try:
        return json_body(frame)[1]
    except (RequestError, ProtocolError):
        return None


def _suppressed_note(count: int) -> str:
    return f" ({count} more limit hits and refusals not logged)" if count else ""


def cap_send_buffer(transport: Any, size: int) -> None:
    """Cap the kernel send buffer of a socket transport at ``size`` bytes.

    What the kernel holds for a client that does not read is memory too;
    left to autotuning it grows to megabytes.  0 leaves it alone.
    """
    if not size:
        return
    sock = stream_socket(transport)
    if sock is not None and sock.family in _INET:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError as error:
            log.warn("Could not cap the socket send buffer: {error}", error=error)


def stream_socket(transport: Any) -> socket.socket | None:
    """The socket under ``transport``, or None (a transport without one).

    TLS wraps the socket's transport (its own handle is the TLS
    connection), and WebSocket wraps a TCP or TLS stream: look underneath.
    """
    layer = transport
    for _ in range(3):
        handle = getattr(layer, "getHandle", None)
        sock = handle() if handle is not None else None
        if isinstance(sock, socket.socket):
            return sock
        layer = getattr(layer, "stream", None) or getattr(layer, "transport", None)
    return None


def _type_name(type_: int) -> str:
    try:
        return MessageType(type_).name
    except ValueError:
        return f"0x{type_:02x}"


def _describe_peer(transport: Any) -> str:
    try:
        peer = transport.getPeer()
    except Exception:
        return "unknown"
    host = getattr(peer, "host", None)
    port = getattr(peer, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    return str(getattr(peer, "name", None) or peer)
