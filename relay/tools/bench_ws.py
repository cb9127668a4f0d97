"""relay-bench over WebSocket: ``ws://`` and ``wss://`` endpoints.

``client_endpoint`` turns a bench ``--endpoint`` into a Twisted client
endpoint: a Twisted description as before, or a WebSocket URL.  Over a URL
each bench connection runs on a small RFC 6455 client of its own, not on
autobahn: a load generator must count far faster than the server serves,
and autobahn parses and logs every frame through several Python calls.

The client follows ``relay.wsmapping``: the payloads of the server's binary
messages, in order, are the Relay byte stream handed to the bench
connection; each write of the bench connection is one binary message,
masked with a fresh random key as RFC 6455 requires of a client.  It answers
pings, answers a close frame and then closes, and drops a server that sends
text, masks its frames or breaks the framing.

``wss://`` verifies the server against the system's trust store, which
OpenSSL lets ``SSL_CERT_FILE`` replace with a PEM bundle of one's own.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import Any, Iterable
from urllib.parse import urlsplit

from twisted.internet import defer, ssl
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.wsmapping import PATH, SUBPROTOCOL, mask

DEFAULT_PORTS = {"ws": 80, "wss": 443}
CONNECT_TIMEOUT_SECONDS = 30.0
# The server's answer to the upgrade request, at most.
MAX_RESPONSE_HEAD = 16 * 1024
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# First bytes of the frames a server sends: FIN and the opcode.
_BINARY, _BINARY_FIRST, _CONTINUATION, _LAST_CONTINUATION = 0x82, 0x02, 0x00, 0x80
_CLOSE, _PING, _PONG = 0x88, 0x89, 0x8A
_DATA_OPCODES = frozenset((_BINARY, _BINARY_FIRST, _CONTINUATION, _LAST_CONTINUATION))
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_NORMAL_CLOSE = _U16.pack(1000)


def client_endpoint(reactor: Any, description: str) -> IStreamClientEndpoint:
    """The endpoint for a bench ``--endpoint``: a Twisted description or a WebSocket URL."""
    if not description.startswith(("ws://", "wss://")):
        return clientFromString(reactor, description)
    parts = urlsplit(description)
    host = parts.hostname
    if not host:
        raise ValueError(f"{description!r} names no host")
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    inner: IStreamClientEndpoint = HostnameEndpoint(
        reactor, host, port, timeout=CONNECT_TIMEOUT_SECONDS
    )
    if parts.scheme == "wss":
        inner = wrapClientTLS(ssl.optionsForClientTLS(host), inner)
    # "ws://host:port/" means the server's Relay path, as relay-client reads it.
    path = parts.path if parts.path not in ("", "/") else PATH
    if parts.query:
        path += "?" + parts.query
    return WebSocketEndpoint(inner, parts.netloc.rpartition("@")[2], path)


def client_frame(payload: bytes, key: bytes) -> bytes:
    """One masked binary frame holding ``payload``, as a client sends it."""
    size = len(payload)
    if size < 126:
        head = bytes((_BINARY, 0x80 | size))
    elif size < 1 << 16:
        head = bytes((_BINARY, 0x80 | 126)) + _U16.pack(size)
    else:
        head = bytes((_BINARY, 0x80 | 127)) + _U64.pack(size)
    return head + key + mask(payload, key)


def control_frame(first: int, payload: bytes, key: bytes) -> bytes:
    """A masked control frame (payload at most 125 bytes)."""
    return bytes((first, 0x80 | len(payload))) + key + mask(payload, key)


def accept_value(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` a server must answer ``key`` with."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


@implementer(IStreamClientEndpoint)
class WebSocketEndpoint:
    """Connects a bench connection over WebSocket, through ``inner``.

    ``connect`` fires with the bench connection once the upgrade is accepted.
    """

    def __init__(self, inner: IStreamClientEndpoint, host: str, path: str) -> None:
        self._inner = inner
        self.host = host
        self.path = path

    def connect(self, factory: Factory) -> defer.Deferred[Any]:
        opened: defer.Deferred[Any] = defer.Deferred()
        ws_factory = Factory.forProtocol(
            lambda: WebSocketStream(factory, self.host, self.path, opened)
        )
        connecting = self._inner.connect(ws_factory)

        def failed(failure: Failure) -> None:
            if not opened.called:
                opened.errback(failure)

        connecting.addErrback(failed)
        return opened


class WebSocketStream(Protocol):
    """One raw client WebSocket carrying one bench connection."""

    wrapped: Any = None
    broken: str | None = None  # why the server was dropped, if it was

    def __init__(self, factory: Factory, host: str, path: str, opened: defer.Deferred[Any]) -> None:
        self._factory = factory
        self._host = host
        self._path = path
        self._opened = opened
        self._key = base64.b64encode(os.urandom(16))
        self._head = b""
        self._buffer = b""
        self._closing = False

    def connectionMade(self) -> None:
        request = (
            f"GET {self._path} HTTP/1.1\r\n"
            f"Host: {self._host}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key.decode('ascii')}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"
            "\r\n"
        )
        self.transport.write(request.encode("ascii"))

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is None:
            self._upgrade(data)
            return
        self._frames(data)

    def _upgrade(self, data: bytes) -> None:
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_RESPONSE_HEAD:
                self._refused("the upgrade response is too long")
                return
            self._head = head
            return
        self._head = b""
        lines = head[:end].split(b"\r\n")
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or status[1] != b"101":
            self._refused(f"the server answered {lines[0][:200]!r}")
            return
        if fields.get(b"sec-websocket-accept") != accept_value(self._key):
            self._refused("the server's Sec-WebSocket-Accept is wrong")
            return
        self.wrapped = self._factory.buildProtocol(self.transport.getPeer())
        self.wrapped.makeConnection(WebSocketTransport(self))
        if not self._opened.called:
            self._opened.callback(self.wrapped)
        if len(head) > end + 4:
            self._frames(head[end + 4 :])

    def _refused(self, why: str) -> None:
        if not self._opened.called:
            self._opened.errback(ConnectionError(f"WebSocket upgrade refused: {why}"))
        self.transport.abortConnection()

    def _frames(self, data: bytes) -> None:
        """Hand the payloads of every complete data frame to the bench connection."""
        buffer = self._buffer + data if self._buffer else data
        position = 0
        end = len(buffer)
        payloads = []
        append = payloads.append
        # The common frame first: a whole binary message, unmasked, its
        # length in 7 or 16 bits; anything else takes the general path.
        while end - position >= 2:
            size = buffer[position + 1]
            if size < 126:
                start = position + 2
            elif size == 126:
                start = position + 4
                if start > end:
                    break
                size = buffer[position + 2] << 8 | buffer[position + 3]
            else:
                if size & 0x80:
                    self._broken("the server masked a frame")
                    return
                start = position + 10
                if start > end:
                    break
                size = _U64.unpack_from(buffer, position + 2)[0]
            stop = start + size
            if stop > end:
                break
            first = buffer[position]
            if first == _BINARY:
                append(buffer[start:stop])
            elif first in _DATA_OPCODES:
                append(buffer[start:stop])
            elif not self._control(first, buffer[start:stop]):
                return
            position = stop
        self._buffer = buffer[position:]
        if payloads:
            self.wrapped.dataReceived(payloads[0] if len(payloads) == 1 else b"".join(payloads))

    def _control(self, first: int, payload: bytes) -> bool:
        """Answer a control frame; False once the connection is being dropped."""
        if first == _PING:
            self.transport.write(control_frame(_PONG, payload, os.urandom(4)))
        elif first == _CLOSE:
            if not self._closing:
                self._closing = True
                self.transport.write(control_frame(_CLOSE, payload[:2], os.urandom(4)))
            self.transport.loseConnection()
            return False
        elif first != _PONG:
            self._broken(f"the server sent a frame starting 0x{first:02x}")
            return False
        return True

    def _broken(self, why: str) -> None:
        self.broken = why
        self.transport.abortConnection()

    def send(self, payload: bytes) -> None:
        """Send ``payload`` as one binary message, unless closing."""
        if not self._closing:
            self.transport.write(client_frame(payload, os.urandom(4)))

    def send_each(self, payloads: list[bytes]) -> None:
        """Send each of ``payloads`` as a binary message of its own, in one write."""
        if not self._closing:
            keys = os.urandom(4 * len(payloads))  # a fresh key for every frame
            frames = [client_frame(p, keys[4 * n : 4 * n + 4]) for n, p in enumerate(payloads)]
            self.transport.write(b"".join(frames))

    def close(self) -> None:
        """Begin the closing handshake; the server closes the TCP connection."""
        if not self._closing:
            self._closing = True
            self.transport.write(control_frame(_CLOSE, _NORMAL_CLOSE, os.urandom(4)))

    def connectionLost(self, reason: Failure = None) -> None:
        wrapped, self.wrapped = self.wrapped, None
        if wrapped is not None:
            wrapped.connectionLost(reason)
        elif not self._opened.called:
            self._opened.errback(ConnectionError("connection lost before the WebSocket opened"))


class WebSocketTransport:
    """The stream transport a bench connection sees over a ``WebSocketStream``."""

    def __init__(self, websocket: WebSocketStream) -> None:
        self._websocket = websocket

    @property
    def bufferSize(self) -> int:
        return self._websocket.transport.bufferSize

    @bufferSize.setter
    def bufferSize(self, size: int) -> None:
        # The bench asks for big reads; they are the socket's.
        self._websocket.transport.bufferSize = size

    def write(self, data: bytes) -> None:
        self._websocket.send(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        # Each element its own message (relay.wsmapping), as a browser sends
        # each frame: a publisher's batch is many messages, not one.
        self._websocket.send_each(list(data))

    def loseConnection(self) -> None:
        self._websocket.close()

    def abortConnection(self) -> None:
        self._websocket.transport.abortConnection()

    def getPeer(self) -> Any:
        return self._websocket.transport.getPeer()

    def getHost(self) -> Any:
        return self._websocket.transport.getHost()
