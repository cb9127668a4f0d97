"""Relay over WebSocket, client side: an endpoint that yields a stream protocol.

Messages follow the mapping in ``relay.wsmapping``, shared with the server
adapter: every write, and every element of ``writeSequence``, is a binary
message of its own, and the bytes of every binary message the server sends
go to the wrapped protocol's ``dataReceived``.  The wrapped protocol sees an
ordinary stream transport: producers are registered on the socket under the
WebSocket (so backpressure works), the transport is itself a push producer
(pausing it pauses reading), ``abortConnection`` drops the connection, and
``connectionLost`` gets a ``Failure`` that says how the WebSocket closed.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.wsmapping import BinaryMessageTransport, refuse_text


@implementer(IPushProducer)
class WebSocketStreamTransport(BinaryMessageTransport):
    """The stream transport a wrapped protocol sees over one WebSocket."""

    def pauseProducing(self) -> None:
        self.stream.pauseProducing()

    def resumeProducing(self) -> None:
        self.stream.resumeProducing()

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
            refuse_text(self)
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
