"""Relay over WebSocket, client side: an endpoint that yields a stream protocol.

Binary WebSocket messages carry Relay frame bytes.  The wrapped protocol sees
an ordinary stream transport, with what autobahn's own wrapping adapter lacks:
producer registration that reaches the TCP socket (so backpressure works),
``abortConnection``, and a real ``Failure`` in ``connectionLost``.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet import defer, error
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

# RFC 6455 close codes.
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED_DATA = 1003


@implementer(ITransport, IConsumer, IPushProducer)
class WebSocketStreamTransport:
    """The stream transport a wrapped protocol sees over one WebSocket."""

    def __init__(self, websocket: WebSocketClientProtocol) -> None:
        self._websocket = websocket

    @property
    def _open(self) -> bool:
        return self._websocket.state == WebSocketProtocol.STATE_OPEN

    def write(self, data: bytes) -> None:
        if self._open:  # like a TCP transport, drop writes once closing
            self._websocket.sendMessage(data, isBinary=True)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self._open:
            self._websocket.sendClose(CLOSE_NORMAL)

    def abortConnection(self) -> None:
        self._websocket.dropConnection(abort=True)

    def getPeer(self) -> Any:
        return self._websocket.transport.getPeer()

    def getHost(self) -> Any:
        return self._websocket.transport.getHost()

    # Producers go to the socket underneath, where the buffer really fills.

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._websocket.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._websocket.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self._websocket.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._websocket.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abortConnection()


class _StreamOverWebSocket(WebSocketClientProtocol):
    """Runs the wrapped stream protocol once the WebSocket handshake is done."""

    wrapped: Any = None

    def onOpen(self) -> None:
        self.wrapped = self.factory.wrapped_factory.buildProtocol(self.transport.getPeer())
        self.wrapped.makeConnection(WebSocketStreamTransport(self))
        if not self.factory.opened.called:
            self.factory.opened.callback(self.wrapped)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            # sendClose only takes application codes; 1003 is a protocol code.
            self.sendCloseFrame(CLOSE_UNSUPPORTED_DATA, b"Relay frames travel in binary messages")
            return
        if self.wrapped is not None:
            self.wrapped.dataReceived(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        why = f"WebSocket closed (code {code}{': ' + reason if reason else ''})"
        wrapped, self.wrapped = self.wrapped, None
        if wrapped is not None:
            failure_type = error.ConnectionDone if wasClean else error.ConnectionLost
            wrapped.connectionLost(Failure(failure_type(why)))
        elif not self.factory.opened.called:
            self.factory.opened.errback(error.ConnectError(string=f"handshake failed: {why}"))


@implementer(IStreamClientEndpoint)
class WebSocketClientEndpoint:
    """Connects a stream protocol factory over WebSocket through ``inner``.

    ``connect`` fires with the wrapped protocol once the handshake is done.
    """

    def __init__(self, reactor: Any, inner: IStreamClientEndpoint, url: str,
                 subprotocol: str) -> None:
        self._reactor = reactor
        self._inner = inner
        self._url = url
        self._subprotocol = subprotocol

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        ws_factory = WebSocketClientFactory(
            url=self._url, protocols=[self._subprotocol], reactor=self._reactor
        )
        ws_factory.protocol = _StreamOverWebSocket
        ws_factory.wrapped_factory = factory
        connecting = self._inner.connect(ws_factory)
        websocket: list[_StreamOverWebSocket] = []

        def cancel(opened: defer.Deferred[Any]) -> None:
            if websocket:
                websocket[0].dropConnection(abort=True)
            else:
                connecting.cancel()

        ws_factory.opened = defer.Deferred(cancel)

        def connected(protocol: _StreamOverWebSocket) -> None:
            websocket.append(protocol)

        def failed(failure: Failure) -> None:
            if not ws_factory.opened.called:
                ws_factory.opened.errback(failure)

        connecting.addCallbacks(connected, failed)
        return ws_factory.opened
