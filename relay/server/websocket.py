"""Relay over WebSocket, plus the browser demo page, on one HTTP listener.

``/relay`` upgrades to WebSocket (autobahn) and runs an unchanged
``RelayProtocol`` on top; ``/`` serves ``relay/server/static/index.html``.

Messages follow the mapping in ``relay.wsmapping``, shared with the client
adapter: the bytes of every binary message go to
``RelayProtocol.dataReceived``, so a frame may be split across messages and
several frames may share one; towards the client, each frame is a message of
its own (the transport provides ``IMessageTransport``, so the protocol hands
it frames one by one).

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

from importlib import resources
from typing import Any, Iterable, Sequence

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from relay.server.factory import RelayFactory
from relay.server.protocol import IMessageTransport, RelayProtocol
from relay.wsmapping import (
    ACCEPTED_SUBPROTOCOLS,
    PATH,
    BinaryMessageTransport,
    max_message_size,
    refuse_text,
)

log = Logger()

# A client gets this long to finish the HTTP upgrade.
OPEN_HANDSHAKE_TIMEOUT = 10.0


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


@implementer(IMessageTransport)
class MessageTransport(BinaryMessageTransport):
    """The transport a ``RelayProtocol`` sees on a WebSocket connection.

    Writes become binary messages, one per frame (``relay.wsmapping``);
    a wss connection also shows its client certificate.
    """

    def getPeerCertificate(self) -> Any:
        """The client certificate of a wss connection with mutual TLS."""
        stream = self.stream
        if ISSLTransport.providedBy(stream):
            return stream.getPeerCertificate()
        return None


class RelayWebSocketProtocol(WebSocketServerProtocol):
    """One WebSocket connection carrying one ``RelayProtocol``."""

    relay: RelayProtocol | None = None

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
        self.relay.makeConnection(MessageTransport(self))
        if ISSLTransport.providedBy(stream):
            # The TLS handshake finished before the upgrade request arrived.
            self.relay.handshakeCompleted()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        # Once either side has sent a close frame, later messages are moot.
        if self.relay is None or self.state != self.STATE_OPEN:
            return
        if not isBinary:
            log.info(
                "{conn} sent a text WebSocket message; closing",
                conn=self.relay.connection_id,
            )
            refuse_text(self)
            return
        self.relay.dataReceived(payload)

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


def make_site(relay_factory: RelayFactory, allowed_origins: Sequence[str] = ("*",)) -> Site:
    """The HTTP site: the demo page at ``/`` and WebSocket at ``/relay``."""
    root = Resource()
    root.putChild(b"", DemoPage(demo_page()))
    ws_factory = RelayWebSocketFactory(relay_factory, allowed_origins)
    root.putChild(PATH.lstrip("/").encode("ascii"), WebSocketResource(ws_factory))
    # Idle HTTP connections time out on the relay's reactor, like relay connections.
    return Site(root, timeout=relay_factory.config.idle_timeout, reactor=relay_factory.reactor)
