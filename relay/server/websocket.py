"""Relay over WebSocket, plus the browser demo page, on one HTTP listener.

``/relay`` upgrades to WebSocket (autobahn) and runs an unchanged
``RelayProtocol`` on top; ``/`` serves ``relay/server/static/index.html``.

Messages follow the mapping in ``relay.wsmapping``, shared with the client
adapter: the bytes of every binary message go to
``RelayProtocol.dataReceived``, so a frame may be split across messages and
several frames may share one; towards the client, each frame is a message of
its own (the transport provides ``IMessageTransport``, so the protocol hands
it its outbox, and ``MessageTransport.write_entries`` frames the messages and
writes them to the socket at once, a broadcast's framing shared by every
WebSocket member).

Backpressure works as on TCP: the relay connection is registered as the push
producer of the socket under the WebSocket, so it is paused (DRAINING) when
that socket's buffer fills.  The HTTP channel that read the upgrade request
registered itself as that socket's producer, and the registration outlives
autobahn's takeover of the socket, so it is released when the WebSocket
opens, just before the relay connection registers itself.

Why not a subclass of autobahn's ``WrappingWebSocketServerProtocol``: it does
forward producer registration to the socket (``WebSocketAdapterProtocol``
provides it), but it calls ``connectionLost(None)`` from ``onClose``, has no
``abortConnection``, raises from ``write`` once the closing handshake has
begun, refuses clients that offer no subprotocol it knows, has a base64 text
mode where Relay refuses text, and builds the wrapped protocol before the
handshake is accepted, so a refused handshake would end a relay connection
that never opened.  A subclass would override every method it has and reach
into its private ``_proto`` and ``_binaryMode``; this adapter is smaller.
"""

from __future__ import annotations

import struct
from importlib import resources
from functools import partial
from typing import Any, Callable, Iterable, Sequence

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from relay.server.factory import RelayFactory
from relay.server.fanout import Fanout, frames_of
from relay.server.protocol import IMessageTransport, RelayProtocol, State
from relay.server.socket_write import DrainWatch, socket_send
from relay.wsmapping import (
    ACCEPTED_SUBPROTOCOLS,
    PATH,
    BinaryMessageTransport,
    mask,
    max_message_size,
    refuse_text,
)

log = Logger()

# A client gets this long to finish the HTTP upgrade.
OPEN_HANDSHAKE_TIMEOUT = 10.0
# The request line and headers of one request, together.
MAX_REQUEST_HEAD = 16 * 1024


_DEFAULT_PORTS = {"http": "80", "https": "443"}


def origin_patterns(origins: Iterable[str]) -> list[str]:
    """autobahn's origin patterns for the origins a browser page may have.

    autobahn matches patterns against ``scheme://host:port`` with the port
    always spelled out; an origin given without one gets its scheme's
    default port, so ``https://chat.example`` means what it says.
    """
    patterns = []
    for origin in origins:
        scheme, separator, host = origin.partition("://")
        if separator and ":" not in host and scheme in _DEFAULT_PORTS:
            origin = f"{origin}:{_DEFAULT_PORTS[scheme]}"
        patterns.append(origin)
    return patterns


# Server-to-client frames (RFC 6455 section 5.2): FIN and the binary opcode,
# never masked; the length in 7 bits, or 16, or 64 after a marker.
_BINARY_FINAL = 0x82
_SHORT_HEADERS = tuple(bytes((_BINARY_FINAL, size)) for size in range(126))
_MEDIUM_HEADER = struct.Struct("!BBH")
_LONG_HEADER = struct.Struct("!BBQ")


def message_header(size: int) -> bytes:
    """The header of one unfragmented, unmasked binary frame of ``size`` payload bytes."""
    if size < 126:
        return _SHORT_HEADERS[size]
    if size < 0x10000:
        return _MEDIUM_HEADER.pack(_BINARY_FINAL, 126, size)
    return _LONG_HEADER.pack(_BINARY_FINAL, 127, size)


# Client messages up to this size are read by Relay itself (below);
# autobahn's masker is the faster one past it, and its per-frame work no
# longer matters next to the payload's.
SMALL_MESSAGE = 2048
_U16 = struct.Struct("!H")


# What small_client_message says of the beginning of a small message.
INCOMPLETE = (-1, -1, b"")


def small_client_message(data: bytes, offset: int, largest: int) -> tuple[int, int, bytes] | None:
    """Where the payload of the client frame at ``data[offset:]`` lies, and its
    masking key, if that frame is a whole binary message of at most
    ``largest`` bytes: final, masked, no extension bits, minimal length.

    ``INCOMPLETE`` if the bytes there are the start of such a frame; None
    for anything else (a control frame, text, a fragment, an unmasked or
    larger frame), which is autobahn's to read.
    """
    available = len(data) - offset
    if available < 2:
        return INCOMPLETE if not available or data[offset] == _BINARY_FINAL else None
    second = data[offset + 1]
    size = second & 0x7F
    if data[offset] != _BINARY_FINAL or not second & 0x80 or size == 127:
        return None
    start = offset + 6
    if size == 126:
        if available < 4:
            return INCOMPLETE
        size = _U16.unpack_from(data, offset + 2)[0]
        if size < 126:  # not minimal: autobahn fails the connection
            return None
        start += 2
    if size > largest:
        return None
    end = start + size
    if end > len(data):
        return INCOMPLETE
    return start, end, data[start - 4 : start]


def framed(fanout: Fanout, largest: int) -> bytes | None:
    """A Fanout's frames as WebSocket messages, one each, made once for every member.

    Closes the Fanout, as ``Fanout.join`` does: its bytes must not change
    once made.  None if a frame is above ``largest``, the limit autobahn
    enforces on every message it sends.
    """
    data = fanout.framed
    if data is None:
        fanout.close()
        parts = []
        for frame in fanout.frames:
            if len(frame) > largest:
                return None
            parts.append(message_header(len(frame)))
            parts.append(frame)
        data = fanout.framed = b"".join(parts)
    return data


@implementer(IMessageTransport)
class MessageTransport(BinaryMessageTransport):
    """The transport a ``RelayProtocol`` sees on a WebSocket connection.

    Writes become binary messages, one per frame (``relay.wsmapping``);
    a wss connection also shows its client certificate.

    ``write_entries`` (the protocol's outbox) is the fast path: with
    ``direct``, it frames the messages itself and writes them to the stream
    under the WebSocket in one write, a shared Fanout's framing made once
    for all its WebSocket members.  That is safe because a server's data
    frames are unmasked, so every member gets the same bytes, and because
    autobahn writes its own frames (pings, pongs, close) whole and at once
    to the same stream: the two interleave at frame boundaries only.  It
    is taken while the WebSocket is OPEN and autobahn is not in the middle
    of a message of its own (``send_state``, its public sending state);
    without ``direct`` (an extension such as permessage-deflate, or options
    that make autobahn frame differently) every frame goes through
    ``sendMessage``, as every write does.
    """

    def __init__(self, websocket: Any, direct: bool, largest: int) -> None:
        super().__init__(websocket)
        self._direct = direct
        self._largest = largest

    def write_entries(self, entries: list[bytes | Fanout]) -> None:
        """Send every frame of ``entries`` (frames and Fanouts), in order, one message each."""
        websocket = self._websocket
        if websocket.state != websocket.STATE_OPEN:
            return  # closing: dropped, as ``write`` drops them
        data = None
        if self._direct and websocket.send_state == websocket.SEND_STATE_GROUND:
            data = self._framed(entries)
        if data is None:
            self.writeSequence(frames_of(entries))
        else:
            websocket.write_stream(data)

    def _framed(self, entries: list[bytes | Fanout]) -> bytes | None:
        """The messages of ``entries`` as stream bytes; None if one is too big."""
        largest = self._largest
        if len(entries) == 1:
            entry = entries[0]
            if type(entry) is Fanout:
                return framed(entry, largest)
            if len(entry) > largest:
                return None
            return message_header(len(entry)) + entry
        parts = []
        for entry in entries:
            if type(entry) is Fanout:
                data = framed(entry, largest)
                if data is None:
                    return None
                parts.append(data)
            elif len(entry) > largest:
                return None
            else:
                parts.append(message_header(len(entry)))
                parts.append(entry)
        return b"".join(parts)

    def getPeerCertificate(self) -> Any:
        """The client certificate of a wss connection with mutual TLS."""
        stream = self.stream
        if ISSLTransport.providedBy(stream):
            return stream.getPeerCertificate()
        return None


class RelayWebSocketProtocol(WebSocketServerProtocol):
    """One WebSocket connection carrying one ``RelayProtocol``."""

    relay: RelayProtocol | None = None
    # The largest client message Relay reads itself; 0: autobahn reads all.
    _small_message = 0
    # The start of a small message, kept for the next read (at most
    # _small_message + 8 bytes); autobahn then holds nothing.
    _partial = b""
    # The socket's send while the stream holds no unsent byte, as for a
    # TCP connection (relay.server.socket_write); None: through the stream.
    _direct: Callable[[bytes], int] | None = None
    # True once autobahn queued a write of its own for later: from then on
    # every byte goes through the stream.
    _direct_ended = False

    def onConnect(self, request: ConnectionRequest) -> str | None:
        # A client that offers no subprotocol is served anyway: refusing it
        # would only make hand-written clients harder to get right.
        for subprotocol in ACCEPTED_SUBPROTOCOLS:
            if subprotocol in request.protocols:
                return subprotocol
        return None

    def onOpen(self) -> None:
        stream = self.transport
        # Release the HTTP channel's registration (see the module docstring):
        # the relay connection is the stream's producer from now on.
        stream.unregisterProducer()
        self.relay = self.factory.relay_factory.buildProtocol(stream.getPeer())
        transport = MessageTransport(self, self._frames_as_autobahn_would(), self.maxMessagePayloadSize)
        self.relay.makeConnection(transport)
        if ISSLTransport.providedBy(stream):
            # The TLS handshake finished before the upgrade request arrived.
            self.relay.handshakeCompleted()
        if self.requireMaskedClientFrames and not (
            self.websocket_extensions_in_use or self.logFrames or self.trackTimings
        ):
            limits = [size for size in (self.maxFramePayloadSize, self.maxMessagePayloadSize) if size]
            self._small_message = min(SMALL_MESSAGE, *limits)
        send = socket_send(stream)
        if send is not None and not self.logOctets:
            # The handshake's answer is still in the stream's buffer: write
            # directly once it has gone.
            self._wait_for_drain(send)

    def write_stream(self, data: bytes) -> None:
        """Write ``data`` to the socket: every byte of an open WebSocket
        goes through here, autobahn's (``sendData``) and Relay's alike, so
        a direct ``send()`` never overtakes bytes the stream still holds.

        A partial send hands the rest to the stream and pauses the relay
        connection (DRAINING) until the stream has sent it all.
        """
        send = self._direct
        if send is not None:
            try:
                sent = send(data)
            except OSError:  # full, or broken: the stream finds out which
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
            relay = self.relay
            if relay is not None and relay.state is State.OPEN:
                relay.pauseProducing()
            self._wait_for_drain(send)
        self.transport.write(data)

    def _wait_for_drain(self, send: Callable[[bytes], int]) -> None:
        """Write through the stream until it has sent all it holds."""
        self._direct = None
        if self.relay is not None:
            DrainWatch(self.relay, self.transport, partial(self._drained, send)).start()

    def _drained(self, send: Callable[[bytes], int]) -> None:
        if not self._direct_ended:
            self._direct = send
        if self.relay is not None:
            self.relay.resumeProducing()

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # autobahn's one way to the socket (control frames, and messages it
        # frames itself).  Its queued and chopped writes go out later, from
        # its own timer: those end direct writes for this connection.
        if sync or chopsize or self.send_queue:
            self._direct = None
            self._direct_ended = True
            super().sendData(data, sync, chopsize)
        elif self.state == self.STATE_OPEN or self.state == self.STATE_CLOSING:
            self.write_stream(data)
        else:
            super().sendData(data, sync, chopsize)

    def _frames_as_autobahn_would(self) -> bool:
        """Whether ``message_header`` frames messages as autobahn would here.

        Decided once the handshake is done, when the extensions in use are
        settled: none (no compression), unmasked, unfragmented.
        """
        return not (self.websocket_extensions_in_use or self.maskServerFrames or self.autoFragmentSize)

    def dataReceived(self, data: bytes) -> None:
        # Every message of a read is handled before anything is written, as
        # the frames of a TCP read are: one flush per read, not per message.
        try:
            rest = self._receive_small_messages(data)
            if rest:
                super().dataReceived(rest)
        finally:
            self.factory.relay_factory.flush()

    def _receive_small_messages(self, data: bytes) -> bytes:
        """Hand the small binary messages at the start of ``data`` to the relay
        connection; return the rest, from the first frame autobahn must read.

        autobahn reads a client frame in several Python calls, each more
        than Relay's own handling of the message inside: for the common
        frame (see ``small_client_message``) that is most of a WebSocket
        publish.  Only while autobahn holds nothing, between messages, so
        what it reads next always starts at a frame boundary; the start of
        a small message at the end of a read waits here for the rest,
        rather than be handed to autobahn.
        """
        if self._partial:
            data, self._partial = self._partial + data, b""
        largest = self._small_message  # 0 until the WebSocket is open
        if not largest or self.state != self.STATE_OPEN:
            return data
        if self.data or self.current_frame is not None or self.inside_message:
            return data  # autobahn is inside a frame or a message
        # The payloads are one byte stream (relay.wsmapping): the relay
        # connection takes them all at once, as it takes a TCP read.
        payloads = []
        offset = 0
        while True:
            frame = small_client_message(data, offset, largest)
            if frame is None:
                rest = data[offset:] if offset else data
                break
            if frame is INCOMPLETE:
                self._partial, rest = data[offset:], b""
                break
            start, end, key = frame
            payloads.append(mask(data[start:end], key))
            offset = end
        if payloads:
            self.relay.receive(payloads[0] if len(payloads) == 1 else b"".join(payloads))
        return rest

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # Once either side has sent a close frame, later messages are moot.
        if self.relay is None or self.state != self.STATE_OPEN:
            return
        if not isBinary:
            log.info(
                "{conn} sent a text WebSocket message; closing",
                conn=self.relay.connection_id,
            )
            self.factory.relay_factory.flush()  # the answers to earlier messages go first
            refuse_text(self)
            return
        self.relay.receive(payload)

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        # Whatever earlier messages of this read produced goes before the
        # closing handshake (after it, writes are dropped).
        self.factory.relay_factory.flush()
        return super().onCloseFrame(code, reasonRaw)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        relay, self.relay = self.relay, None
        if relay is not None:
            # The stream's own Failure (ConnectionDone after a clean close,
            # ConnectionAborted after an abort), as on TCP.
            relay.connectionLost(reason)


class RelayWebSocketFactory(WebSocketServerFactory):
    """Builds ``RelayWebSocketProtocol``s whose limits follow Relay's config."""

    protocol = RelayWebSocketProtocol

    def __init__(self, relay_factory: RelayFactory, allowed_origins: Sequence[str] = ("*",)) -> None:
        super().__init__(reactor=relay_factory.reactor)
        self.relay_factory = relay_factory
        config = relay_factory.config
        largest = max_message_size(config.max_frame_size)
        self.setProtocolOptions(
            maxFramePayloadSize=largest,
            maxMessagePayloadSize=largest,
            openHandshakeTimeout=OPEN_HANDSHAKE_TIMEOUT,
            # Pings find dead peers whose TCP connection lingers; a peer
            # that misses a pong for a heartbeat interval is dropped.
            autoPingInterval=config.heartbeat_interval,
            autoPingTimeout=config.heartbeat_interval,
            allowedOrigins=origin_patterns(allowed_origins),
            # "Any origin" includes pages without one (file://, sandboxed).
            allowNullOrigin="*" in allowed_origins,
            # Tell a misbehaving client why (e.g. 1009 for a message too
            # big) with a close frame, instead of just dropping it.
            failByDrop=False,
        )


def demo_page() -> bytes:
    """The browser demo page, read from the installed package."""
    return resources.files("relay.server").joinpath("static", "index.html").read_bytes()


class DemoPage(Resource):
    """The demo page: one self-contained HTML file, nothing else to load."""

    isLeaf = True

    def __init__(self, page: bytes) -> None:
        super().__init__()
        self._page = page

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-cache")
        return self._page


class BoundedRequest(Request):
    """A request whose body, if it announces one, is refused unread.

    No resource here takes a body; without this, twisted.web would spool a
    large one to a temporary file before answering 405.
    """

    refused = False

    def gotLength(self, length: int | None) -> None:
        if length == 0:
            super().gotLength(length)
            return
        # A Content-Length, or a chunked body (length None): never read it.
        self.refused = True
        self.content = _Discard()
        self.channel.refuse(b"413 Content Too Large")

    def handleContentChunk(self, data: bytes) -> None:
        if not self.refused:
            super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self.refused:
            super().requestReceived(command, path, version)


class _Discard:
    """A request body that keeps nothing."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


class BoundedHTTPChannel(HTTPChannel):
    """An HTTP connection bounded in time and bytes until its request is in.

    twisted.web's own timeout restarts on every byte, and autobahn's opening
    handshake timer only starts after the upgrade, so a client trickling a
    request line or headers would be kept for ever.  Here the whole request
    (line, headers) must arrive within ``OPEN_HANDSHAKE_TIMEOUT`` and fit in
    ``MAX_REQUEST_HEAD`` bytes (else 431); a body is refused (413).
    """

    deadline_seconds = OPEN_HANDSHAKE_TIMEOUT
    MAX_LENGTH = MAX_REQUEST_HEAD
    totalHeadersSize = MAX_REQUEST_HEAD

    _deadline: Any = None
    _head_bytes = 0
    _refused = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm_deadline()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline is None:  # the first bytes of a next request
            self._arm_deadline()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        self._head_bytes += len(line) + 2
        if self._head_bytes > MAX_REQUEST_HEAD:
            self.refuse(b"431 Request Header Fields Too Large")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(b"431 Request Header Fields Too Large")

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        self._head_bytes = 0
        super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def refuse(self, status: bytes) -> None:
        """Answer ``status`` and close, reading nothing more."""
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        log.info("HTTP request refused: {status}", status=status.decode("ascii"))
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )
        self.transport.loseConnection()
        # A peer that does not read cannot hold the socket open either.
        self._deadline = self.callLater(2.0, self.transport.abortConnection)

    def _arm_deadline(self) -> None:
        self._deadline = self.callLater(self.deadline_seconds, self._deadline_passed)

    def _cancel_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport is not None:
            log.info("HTTP request not complete within {seconds} s; dropped", seconds=self.deadline_seconds)
            self.transport.abortConnection()


class RelaySite(Site):
    """The HTTP site, on bounded channels and requests."""

    protocol = BoundedHTTPChannel
    requestFactory = BoundedRequest


def make_site(relay_factory: RelayFactory, allowed_origins: Sequence[str] = ("*",)) -> Site:
    """The HTTP site: the demo page at ``/`` and WebSocket at ``/relay``."""
    root = Resource()
    root.putChild(b"", DemoPage(demo_page()))
    ws_factory = RelayWebSocketFactory(relay_factory, allowed_origins)
    root.putChild(PATH.lstrip("/").encode("ascii"), WebSocketResource(ws_factory))
    # Idle HTTP connections time out on the relay's reactor, like relay connections.
    return RelaySite(root, timeout=relay_factory.config.idle_timeout, reactor=relay_factory.reactor)
