"""Direct writes to a plain socket, while its transport holds nothing.

``transport.write`` on a Twisted socket transport buffers the bytes, asks
the reactor to watch the socket for writability (one ``epoll_ctl``), sends
them in a later reactor turn, and stops watching once its buffer is empty
(another ``epoll_ctl``).  At chat-like rates every delivery is its own
write, so that is three syscalls and a reactor turn per delivery where one
``send()`` would do.  When nothing is buffered in the transport, sending
straight to the socket is what Twisted would end up doing anyway, minus
the bookkeeping; that is what asyncio's transports and Redis do too.

The condition is the whole point: bytes sent directly must never overtake
bytes the transport still holds.  Twisted does not say how much it holds
(not in public), so the protocol keeps its own account:

- Every byte of a connection goes out through ``RelayProtocol._write``.
  While its ``_send`` is set, the transport has been given nothing that is
  not yet sent, and ``_write`` calls the socket's ``send``.
- A partial send (the kernel's buffer is full) hands the rest to the
  transport and clears ``_send``: from then on the transport may hold
  bytes.  The connection is then, by its own decision, paused (DRAINING):
  it writes nothing more, and queues what comes, counting it against
  ``max-pending`` exactly as when Twisted pauses it.
- To learn when the transport is empty again, the connection registers a
  ``DrainWatch`` as the transport's *pull* producer in its own place.
  ``IConsumer`` promises a pull producer ``resumeProducing()`` each time the
  consumer's buffer runs dry, which is the public signal needed.  The watch
  then puts the connection back as the streaming producer, sets ``_send``
  again and resumes it (DRAINING -> OPEN, which flushes what was queued).
- Anything else (TLS, WebSocket, transports without a socket) keeps
  ``_send`` None and writes through the transport, as before.

A WebSocket over plain TCP does the same one layer down: every byte its
adapter or autobahn writes goes through ``RelayWebSocketProtocol.write_stream``
(relay.server.websocket), which keeps the same account for the socket
under the WebSocket and pauses the relay connection on a partial send.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer

SendFunction = Callable[[bytes], int]


def socket_send(transport: Any) -> SendFunction | None:
    """The ``send`` of the stream socket under ``transport``, if writing to it
    directly is equivalent to ``transport.write`` on an empty buffer.

    Only a transport whose own handle is the socket qualifies (TCP and Unix
    stream sockets): a TLS transport's handle is its TLS connection, whose
    bytes must go through the TLS layer.
    """
    handle = getattr(transport, "getHandle", None)
    if handle is None or not hasattr(transport, "registerProducer"):
        return None
    sock = handle()
    if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
        return None
    return sock.send


@implementer(IPullProducer)
class DrainWatch:
    """Waits for a transport to run dry, in place of its paused producer.

    Once the transport has sent everything it was given, ``producer`` is
    its streaming producer again and ``drained()`` is called.
    """

    __slots__ = ("_producer", "_transport", "_drained", "_registering")

    def __init__(self, producer: Any, transport: Any, drained: Callable[[], None]) -> None:
        self._producer = producer
        self._transport = transport
        self._drained = drained
        self._registering = False

    def start(self) -> None:
        """Stand in for the producer as the transport's producer."""
        transport = self._transport
        transport.unregisterProducer()
        # A pull producer is resumed once at registration: that call says
        # nothing about the buffer, so it is ignored.
        self._registering = True
        try:
            transport.registerProducer(self, False)
        finally:
            self._registering = False

    def resumeProducing(self) -> None:
        """The transport's buffer ran dry: hand back to the producer."""
        if self._registering:
            return
        transport = self._transport
        transport.unregisterProducer()
        transport.registerProducer(self._producer, True)
        self._drained()

    def stopProducing(self) -> None:
        """The connection is lost: the producer's own stopProducing."""
        self._producer.stopProducing()
