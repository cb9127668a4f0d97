"""Relay over WebSocket: the one mapping both sides follow.

Relay is a byte stream of length-prefixed frames; RFC 6455 carries messages.
The mapping between the two, used by the server adapter
(``relay.server.websocket``) and the client adapter
(``relay.client.websocket``) alike:

- **Binary messages carry Relay frame bytes as a stream.**  A receiver hands
  the payload of every message, in order, to its Relay protocol, which decodes
  frames from that stream: a frame may be split across messages and several
  may share one.
- **A sender sends each chunk it writes as a message of its own**, and
  ``writeSequence`` sends each element as its own message, in order, never
  joined.  Both Relay protocols write whole frames, so every message they send
  holds exactly one frame: the server promises this to clients, and it keeps
  every message within ``max_message_size``.
- **Text messages are refused**: close code 1003 with ``TEXT_REFUSED``.
- **Closing**: ``loseConnection`` starts the closing handshake with 1000;
  ``abortConnection`` drops the TCP connection through autobahn, so autobahn
  knows at once that the WebSocket is closed (the peer sees 1006).

``BinaryMessageTransport`` implements the sending half over an open autobahn
WebSocket protocol; each adapter subclasses it for what only its side needs.
This module imports nothing from autobahn, so the client library can name the
path and subprotocol without loading it.
"""

from __future__ import annotations

import enum
from typing import Any, Iterable

from twisted.internet.interfaces import IConsumer, ITransport
from zope.interface import implementer

from relay.wire import LENGTH_SIZE, MAX_ENVELOPE

PATH = "/relay"
SUBPROTOCOL = "relay.v1"
# What the server accepts, in its order of preference; "binary" is the name
# websockify-style clients give a raw byte stream.
ACCEPTED_SUBPROTOCOLS = (SUBPROTOCOL, "binary")
TEXT_REFUSED = "Relay speaks binary WebSocket messages only"


class CloseCode(enum.IntEnum):
    """The RFC 6455 close codes the mapping uses."""

    NORMAL = 1000
    UNSUPPORTED_DATA = 1003
    MESSAGE_TOO_BIG = 1009


def max_message_size(max_frame_size: int) -> int:
    """The largest WebSocket message, and WebSocket frame, the server sends or accepts.

    That is the largest frame the server sends, a delivery of a frame of
    ``max_frame_size`` plus the envelope it adds, with its length prefix:
    autobahn applies one limit to both directions, and ``sendMessage``
    raises for a message above it.  A client's message holds at most one
    frame of ``max_frame_size``, so it fits with room to spare.
    """
    return LENGTH_SIZE + max_frame_size + MAX_ENVELOPE


def refuse_text(websocket: Any) -> None:
    """Answer a text message on ``websocket`` as the mapping says: close with 1003."""
    # sendClose only takes application codes (1000, 3000-4999); 1003 is a
    # protocol code, so the close frame is sent directly.
    websocket.sendCloseFrame(CloseCode.UNSUPPORTED_DATA, TEXT_REFUSED.encode("utf-8"))


@implementer(ITransport, IConsumer)
class BinaryMessageTransport:
    """The stream transport a Relay protocol sees over one autobahn WebSocket.

    Every write is one binary message.  Once the closing handshake has begun,
    writes are dropped, as a TCP transport drops them after
    ``loseConnection``, instead of raising in the middle of a broadcast.
    Producers are registered on the stream under the WebSocket, where the
    send buffer really fills, so backpressure works as on TCP.
    """

    def __init__(self, websocket: Any) -> None:
        self._websocket = websocket

    @property
    def stream(self) -> Any:
        """The TCP or TLS transport under the WebSocket."""
        return self._websocket.transport

    def _is_open(self) -> bool:
        websocket = self._websocket
        return websocket.state == websocket.STATE_OPEN

    def write(self, data: bytes) -> None:
        if self._is_open():
            self._websocket.sendMessage(data, isBinary=True)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def loseConnection(self) -> None:
        if self._is_open():
            # autobahn checks that the code's type is exactly int.
            self._websocket.sendClose(int(CloseCode.NORMAL))

    def abortConnection(self) -> None:
        self._websocket.dropConnection(abort=True)

    def getPeer(self) -> Any:
        return self.stream.getPeer()

    def getHost(self) -> Any:
        return self.stream.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.stream.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.stream.unregisterProducer()


def mask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XORed with the repeated 4-byte ``key`` (RFC 6455 5.3).

    One XOR of two integers does it at C speed, however long the payload.
    """
    size = len(payload)
    if not size:
        return b""
    keys = (key * (size // 4 + 1))[:size]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(keys, "little")
    return value.to_bytes(size, "little")
