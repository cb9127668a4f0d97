"""RelayFactory: the server side that outlives connections.

It owns the configuration, the room registry, the set of live connections,
the batch of outboxes to flush (``relay.server.fanout.Batch``), the run
statistics, and graceful shutdown.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

from relay.compression import DEFAULT_COMPRESS_LEVEL, DEFAULT_COMPRESS_MIN
from relay.server.backplane import (
    DEFAULT_CLUSTER_NAME,
    DEFAULT_MEMBERSHIP_TTL,
    DEFAULT_REDIS_QUEUE,
    IBackplane,
    IBackplaneChannels,
    IClusterNode,
    RedisAddress,
)
from relay.server.auth import Authenticator
from relay.server.compression import DeliveryCompressor
from relay.server.direct import DirectRegistry
from relay.server.fanout import Batch
from relay.server.history import make_history
from relay.server.limits import ServerLimits
from relay.server.presence import DEFAULT_EVENTS_LIMIT, DEFAULT_LIST_LIMIT, Presence
from relay.server.protocol import IMessageTransport, RelayProtocol
from relay.server.rooms import RoomRegistry
from relay.wire import DEFAULT_MAX_FRAME_SIZE, ErrorCode

log = Logger()

# Clients get this long to take their SERVER_SHUTDOWN before being dropped.
SHUTDOWN_GRACE_SECONDS = 2.0
DEFAULT_IDLE_TIMEOUT = 60


@dataclass(frozen=True)
class RelayConfig:
    """Limits and timeouts; every field is a command-line option."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    idle_timeout: int = DEFAULT_IDLE_TIMEOUT  # 0: never time a connection out
    max_pending: int = 4 * 1024 * 1024
    max_rooms: int = 64
    max_connections: int = 50_000
    # Bytes read from a client at once, and the transport buffer at which it
    # is paused.  Larger reads put more frames in each flush; just under
    # glibc's 128 KiB mmap threshold, so each read still comes off the heap.
    read_size: int = 124 * 1024
    debug: bool = False
    # Cluster on Redis (relay.server.backplane): off without a Redis address.
    redis: RedisAddress | None = None
    cluster_name: str = DEFAULT_CLUSTER_NAME
    redis_queue: int = DEFAULT_REDIS_QUEUE
    membership_ttl: int = DEFAULT_MEMBERSHIP_TTL
    # Limits and abuse resistance (relay.server.limits, docs/security.md);
    # hello_timeout is also the deadline of an authenticated HELLO.
    hello_timeout: float = 10.0
    rate_limit: float | None = None
    rate_burst: int | None = None
    byte_rate: int | None = None
    join_rate: float | None = 20.0
    rate_strikes: int = 50
    max_connections_per_ip: int | None = None
    max_pending_total: int = 1024**3
    send_buffer: int = 256 * 1024
    # The compression extension (relay.server.compression): deliveries to
    # connections that enabled it, over compress_min payload bytes.
    compress_min: int = DEFAULT_COMPRESS_MIN
    compress_level: int = DEFAULT_COMPRESS_LEVEL
    # The history extension (relay.server.history): off while history is 0.
    history: int = 0
    history_ttl: float = 300
    history_memory: int = 64 * 1024 * 1024
    # Presence (relay.server.presence)
    presence_list_limit: int = DEFAULT_LIST_LIMIT
    presence_events_limit: int = DEFAULT_EVENTS_LIMIT

    @property
    def heartbeat_interval(self) -> int:
        """The interval the HELLO ack advertises: half the idle timeout.

        Without an idle timeout, clients are still asked to heartbeat at the
        default pace: their heartbeats are what tells them the server is alive.
        """
        return max(1, (self.idle_timeout or DEFAULT_IDLE_TIMEOUT) // 2)


@dataclass
class Stats:
    """Counters for the run summary."""

    started: float = 0.0
    connections_total: int = 0
    connections_peak: int = 0
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    messages_published: int = 0
    # Observability: counted per connection, per request or per error, never
    # per delivery; relay.server.metrics reads them at scrape time.
    connections_by_transport: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    errors_sent: Counter[ErrorCode] = field(default_factory=Counter)
    # Frames in of every type but MESSAGE, counted by their handlers; the
    # MESSAGE count is frames_in less these.
    frames_in_by_type: Counter[int] = field(default_factory=Counter)
    # Frames written one by one (not in a shared Fanout), by type; the
    # frames of shared Fanouts are all MESSAGE deliveries.
    frames_out_by_type: Counter[int] = field(default_factory=Counter)


def transport_kind(transport: Any) -> str:
    """What a connection runs on: websocket, tls, unix or tcp."""
    if IMessageTransport.providedBy(transport):
        return "websocket"
    if ISSLTransport.providedBy(transport):
        return "tls"
    try:
        if isinstance(transport.getHost(), UNIXAddress):
            return "unix"
    except Exception:
        pass
    return "tcp"


@implementer(IClusterNode)
class RelayFactory(ServerFactory):
    """Builds a ``RelayProtocol`` per connection and holds what they share."""

    def __init__(
        self,
        config: RelayConfig | None = None,
        reactor: Any = None,
        backplane: IBackplane | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config or RelayConfig()
        self.registry = RoomRegistry(backplane)
        # The other nodes of a cluster (a LocalBackplane when there are none).
        self.backplane = self.registry.backplane
        self.connections: set[RelayProtocol] = set()
        self.stats = Stats(started=reactor.seconds())
        # What the current read produced, written out by flush().
        self.batch = Batch()
        # Who connections are and where they may go; None: no authentication.
        self.auth = auth
        self.limits = ServerLimits(self.config, reactor.seconds)
        # Compressed deliveries, made once per broadcast for all who asked.
        self.compressor = DeliveryCompressor(self.config.compress_level, self.config.compress_min)
        self._closed_waiters: list[defer.Deferred[None]] = []
        # True from the start of shutdown: /healthz then answers 503.
        self.shutting_down = False
        # What each live connection runs on, decided once when it opens.
        self._transport_kinds: dict[RelayProtocol, str] = {}
        # The history extension (relay.server.history); None when it is off.
        self.history = make_history(self)
        # The presence and direct extensions: nothing per message.
        self.presence = Presence(self)
        self.direct = DirectRegistry(self)
        if IBackplaneChannels.providedBy(self.backplane):
            from relay.server.redis_presence import attach

            attach(self, self.backplane)

    def buildProtocol(self, addr: Any) -> RelayProtocol:
        return RelayProtocol(self)

    @staticmethod
    def new_connection_id() -> str:
        return uuid.uuid4().hex[:12]

    # Connection bookkeeping

    def connection_opened(self, connection: RelayProtocol) -> None:
        self.connections.add(connection)
        self.stats.connections_total += 1
        kind = self._transport_kinds[connection] = transport_kind(connection.transport)
        self.stats.connections_by_transport[kind] += 1
        self.stats.connections_peak = max(self.stats.connections_peak, len(self.connections))

    def over_capacity(self) -> bool:
        return len(self.connections) > self.config.max_connections

    def connection_refused(self, reason: str) -> None:
        """Count a connection turned away before any work, by ``reason``."""
        self.stats.refused[reason] += 1

    def connection_closed(self, connection: RelayProtocol) -> None:
        kind = self._transport_kinds.pop(connection, None)
        if kind is not None:
            self.stats.connections_by_transport[kind] -= 1
        self.connections.discard(connection)
        if not self.connections:
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def flush(self) -> None:
        """Write every outbox filled since the last flush."""
        self.batch.flush()

    def deliver_remote(self, room: str, frames: list[bytes]) -> None:
        """Hand frames another node broadcast to ``room`` to its local members
        (``IClusterNode``); the backplane flushes after each read."""
        local = self.registry.get(room)
        if local is not None:
            local.deliver(frames, self.batch)

    # Shutdown

    def shutdown(self) -> defer.Deferred[None]:
        """Send SERVER_SHUTDOWN to every client; fire once all are gone.

        Clients still connected after the grace period are aborted.
        """
        self.shutting_down = True
        for connection in list(self.connections):
            connection.fail(ErrorCode.SERVER_SHUTDOWN, "the server is shutting down")
        done = self.wait_closed()
        if done.called:
            return done
        abort = self.reactor.callLater(SHUTDOWN_GRACE_SECONDS, self._abort_all)
        done.addBoth(lambda result: abort.cancel() if abort.active() else None)
        return done

    def wait_closed(self) -> defer.Deferred[None]:
        """A Deferred that fires once no connection is left."""
        if not self.connections:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters.append(waiter)
        return waiter

    def _abort_all(self) -> None:
        for connection in list(self.connections):
            connection.transport.abortConnection()

    def summary(self) -> dict[str, Any]:
        """The figures logged when the server stops."""
        stats = self.stats
        return {
            "uptime": round(self.reactor.seconds() - stats.started, 3),
            "connections_total": stats.connections_total,
            "connections_peak": stats.connections_peak,
            "rooms_now": len(self.registry),
            "rooms_peak": self.registry.peak_rooms,
            "messages_published": stats.messages_published,
            "frames_in": stats.frames_in,
            "frames_out": stats.frames_out,
            "bytes_in": stats.bytes_in,
            "bytes_out": stats.bytes_out,
        }
