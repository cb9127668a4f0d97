"""The Redis backplane: every node started with the same Redis serves the same rooms.

What lives in Redis (``P`` is the cluster name, ``relay`` by default):

- channel ``P:room:<room>``: pub/sub.  A node subscribes when its first local
  member joins the room and unsubscribes when its last one leaves.  What is
  published there is an *envelope*::

      version u8 (1) | node id length u8 | node id | connection id length u8 |
      connection id | Relay frames, as sent to members, one after another

  The frames are the deliveries the publishing node encoded for its own
  members; receiving nodes hand the same bytes to theirs without decoding
  them.  One envelope carries the consecutive broadcasts one read produced
  for one room from one connection, so a busy publisher costs one PUBLISH
  per read, not per message.
- hash ``P:node:<node id>``: this node's share of membership, room -> local
  member count.  It expires ``--membership-ttl`` seconds after the node last
  refreshed it (every third of that), so a node that dies stops being
  counted with nobody's help.
- set ``P:nodes``: the ids of nodes that may hold members; a count prunes the
  ids whose hash is gone.

Two connections: one for commands (publishes, in order, pipelined: nothing
waits for a reply), one subscribed.  Each is kept up on its own, with
backoff; the link is up when both are.  When a connection comes back the
node re-subscribes every room it serves, or re-registers its whole share,
and then sends what it held while the link was down.
"""

from __future__ import annotations

import random
import struct
import uuid
from collections import deque
from typing import Any, Callable

import txredisapi
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from relay.pem import load_certificates, load_private_certificate
from relay.server.backplane import (
    DEFAULT_CLUSTER_NAME,
    DEFAULT_MEMBERSHIP_TTL,
    DEFAULT_REDIS_QUEUE,
    BackplaneStats,
    METRICS,
    IBackplane,
    IBackplaneChannels,
    IClusterNode,
    IRedisBackplane,
    RedisAddress,
)
from relay.wire import LENGTH_SIZE, MIN_LENGTH

log = Logger()

ENVELOPE_VERSION = 1
_LENGTH = struct.Struct("!I")
# Reconnecting: the first retry after FIRST_RETRY_DELAY, doubling up to
# MAX_RETRY_DELAY, each less up to JITTER of it so that nodes spread out.
# The ceiling is what lets cross-node delivery resume within about a second
# of Redis coming back.
FIRST_RETRY_DELAY = 0.05
MAX_RETRY_DELAY = 1.0
JITTER = 0.2
# From starting to connect to a usable connection (TCP, TLS, AUTH, SELECT, PING).
CONNECT_TIMEOUT = 2.0
# A usable connection is PINGed this often; one that has not answered for
# PING_TIMEOUT (a hung Redis: SIGSTOP, a dead host) is dropped.
PING_INTERVAL = 1.0
PING_TIMEOUT = 2.0
# Withdrawing this node's share at shutdown waits at most this long.
WITHDRAW_TIMEOUT = 1.0

# Sets this node's share of one room, then (if asked) counts the room's
# members on every node whose share has not expired, pruning dead node ids.
# KEYS: this node's hash, the node set.  ARGV: room, local count, ttl ms,
# node id, node key prefix, "1" to count.
SHARE_SCRIPT = """
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
if redis.call('PEXPIRE', KEYS[1], ARGV[3]) == 1 then
  redis.call('SADD', KEYS[2], ARGV[4])
end
if ARGV[6] ~= '1' then
  return 0
end
local total = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local key = ARGV[5] .. id
  local n = redis.call('HGET', key, ARGV[1])
  if n then
    total = total + tonumber(n)
  elseif redis.call('EXISTS', key) == 0 then
    redis.call('SREM', KEYS[2], id)
  end
end
return total
"""
# Replaces this node's whole share.  KEYS: this node's hash, the node set.
# ARGV: ttl ms, node id, then room, count, room, count...
REGISTER_SCRIPT = """
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if #ARGV > 2 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('SADD', KEYS[2], ARGV[2])
end
return (#ARGV - 2) / 2
"""


class EnvelopeError(ValueError):
    """An envelope from Redis that is not laid out as this version writes them."""


def envelope_head(node_id: str) -> bytes:
    """The bytes every envelope of node ``node_id`` starts with."""
    node = node_id.encode()
    return bytes([ENVELOPE_VERSION, len(node)]) + node


def origin_field(origin: str | None) -> bytes:
    """The connection id field of an envelope."""
    data = (origin or "").encode()[:255]
    return bytes([len(data)]) + data


def parse_envelope(payload: bytes) -> tuple[str, str, list[bytes]]:
    """An envelope's node id, connection id and frames; EnvelopeError if malformed."""
    size = len(payload)
    if size < 3 or payload[0] != ENVELOPE_VERSION:
        raise EnvelopeError("not an envelope of version 1")
    node_end = 2 + payload[1]
    if node_end >= size:
        raise EnvelopeError("truncated node id")
    origin_end = node_end + 1 + payload[node_end]
    if origin_end > size:
        raise EnvelopeError("truncated connection id")
    node = payload[2:node_end].decode(errors="replace")
    origin = payload[node_end + 1 : origin_end].decode(errors="replace")
    return node, origin, split_frames(payload, origin_end)


def split_frames(payload: bytes, start: int) -> list[bytes]:
    """The Relay frames laid one after another in ``payload`` from ``start``."""
    frames = []
    size = len(payload)
    unpack = _LENGTH.unpack_from
    position = start
    while position < size:
        if size - position < LENGTH_SIZE:
            raise EnvelopeError("truncated frame header")
        end = position + LENGTH_SIZE + unpack(payload, position)[0]
        if end - position < LENGTH_SIZE + MIN_LENGTH or end > size:
            raise EnvelopeError("frame length out of bounds")
        frames.append(payload[position:end])
        position = end
    if not frames:
        raise EnvelopeError("no frame")
    return frames


def retry_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds before reconnection attempt ``attempt`` (1, 2, ...); never above MAX_RETRY_DELAY."""
    base = min(MAX_RETRY_DELAY, FIRST_RETRY_DELAY * 2 ** min(attempt - 1, 30))
    return base * (1 - JITTER * rand())


def redis_endpoint(reactor: Any, address: RedisAddress) -> Any:
    """A client endpoint for ``address``: TCP, TLS (``rediss``) or a Unix socket."""
    if address.scheme == "unix":
        return UNIXClientEndpoint(reactor, address.path, timeout=CONNECT_TIMEOUT)
    endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=CONNECT_TIMEOUT)
    if not address.tls:
        return endpoint
    trust = (
        trustRootFromCertificates(load_certificates(address.trust_roots))
        if address.trust_roots
        else platformTrust()
    )
    client = (
        load_private_certificate(address.certificate, address.private_key)
        if address.certificate
        else None
    )
    options = optionsForClientTLS(address.host, trustRoot=trust, clientCertificate=client)
    return wrapClientTLS(options, endpoint)


def _ignore(result: Any) -> None:
    return None


def call(protocol: Any, *command: Any) -> defer.Deferred[Any]:
    """Send a command on a txredisapi connection; its reply, or its failure
    (also when the connection is already closing)."""
    return defer.maybeDeferred(protocol.execute_command, *command)


@implementer(IPushProducer)
class _WriteWindow:
    """Registered on the command connection's transport: tells the backplane
    when its write buffer is full, so that envelopes wait in the bounded
    queue instead of piling up in the transport."""

    def __init__(self, backplane: RedisBackplane) -> None:
        self._backplane = backplane

    def pauseProducing(self) -> None:
        self._backplane.writable = False

    def resumeProducing(self) -> None:
        self._backplane.writable = True
        self._backplane.drain()

    def stopProducing(self) -> None:
        pass


class _CommandProtocol(txredisapi.RedisProtocol):
    """The connection publishes and membership updates go out on."""

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.factory.connection.lost(self, why)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    """The subscribed connection: envelopes from the other nodes come in here."""

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        self.factory.connection.backplane.received(channel, message)

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        super().dataReceived(data, unpause)
        # What this read delivered leaves in one write per member.
        self.factory.connection.backplane.flush_node()

    def connectionLost(self, why: Failure) -> None:
        super().connectionLost(why)
        self.factory.connection.lost(self, why)


class _Factory(txredisapi.RedisFactory):
    """txredisapi's factory, its connections kept up by a ``RedisConnection``."""

    noisy = False

    def __init__(self, connection: RedisConnection, address: RedisAddress, protocol: type) -> None:
        super().__init__(
            str(address),
            address.db,
            1,
            isLazy=False,  # or txredisapi logs every refused AUTH itself
            charset=None,  # bytes in, bytes out: envelopes are binary
            password=address.password,
            convertNumbers=False,
            username=address.username,
        )
        self.protocol = protocol
        self.connection = connection
        # txredisapi reports a refused AUTH or SELECT here once per factory.
        self.deferred.addErrback(lambda failure: None)

    def connectionError(self, why: str) -> None:
        super().connectionError(why)
        self.connection.refused(why)

    def addConnection(self, conn: Any) -> None:
        """Not pooled: the ``RedisConnection`` holds its one connection."""


class RedisConnection:
    """One Redis connection, kept up: connect, AUTH and SELECT (txredisapi),
    PING, and only then usable; reconnect with backoff when it is lost or
    stops answering.

    ``protocol`` is the usable connection, or None.
    """

    def __init__(
        self,
        name: str,
        backplane: RedisBackplane,
        address: RedisAddress,
        protocol: type,
        on_usable: Callable[[Any], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.name = name
        self.backplane = backplane
        self._reactor = backplane.reactor
        self._address = address
        self._factory = _Factory(self, address, protocol)
        self._on_usable = on_usable
        self._on_lost = on_lost
        self.protocol: Any = None
        self._attempt: Any = None  # a protocol connected but not yet usable
        self._connecting: defer.Deferred[Any] | None = None
        self._deadline: Any = None
        self._retry: Any = None
        self._failures = 0
        self._ping_sent: float | None = None
        self._stopped = True
        self._closed: list[defer.Deferred[None]] = []
        self.last_error = ""

    def start(self) -> None:
        self._stopped = False
        self._connect()

    def _connect(self) -> None:
        self._retry = None
        self._deadline = self._reactor.callLater(CONNECT_TIMEOUT, self._give_up)
        try:
            endpoint = redis_endpoint(self._reactor, self._address)
        except Exception as error:  # PEM files gone since startup: retried
            self._attempt_failed(Failure(error))
            return
        self._connecting = endpoint.connect(self._factory)
        self._connecting.addCallbacks(self._connected, self._attempt_failed)

    def _connected(self, protocol: Any) -> None:
        self._connecting = None
        if not protocol.connected:  # lost before the endpoint said so
            self._schedule_retry()
            return
        self._attempt = protocol
        protocol.whenConnected().addCallback(lambda ready: ready.ping()).addCallbacks(
            self._answered, lambda failure: None, callbackArgs=(protocol,)
        )

    def _answered(self, pong: Any, protocol: Any) -> None:
        if protocol is not self._attempt:
            return
        self._cancel_deadline()
        self._attempt = None
        self._failures = 0
        self._ping_sent = None
        self.protocol = protocol
        self._on_usable(protocol)

    def _attempt_failed(self, failure: Failure) -> None:
        self._connecting = None
        self.last_error = failure.getErrorMessage()
        self._schedule_retry()

    def _give_up(self) -> None:
        """The attempt took too long (a hung Redis accepts, then says nothing)."""
        self._deadline = None
        self.last_error = f"no answer within {CONNECT_TIMEOUT} s"
        if self._connecting is not None:
            self._connecting.cancel()
        elif self._attempt is not None:
            self._attempt.transport.abortConnection()

    def refused(self, why: str) -> None:
        """Redis refused AUTH or SELECT: the connection is closed and retried."""
        self.last_error = why
        self.backplane.refused(self.name, why)

    def lost(self, protocol: Any, reason: Failure) -> None:
        if protocol is self.protocol:
            self.protocol = None
            self.last_error = reason.getErrorMessage()
            self._on_lost(self.last_error)
            self._schedule_retry()
        elif protocol is self._attempt:
            self._attempt = None
            self._schedule_retry()
        if self.protocol is None and self._attempt is None:
            closed, self._closed = self._closed, []
            for waiter in closed:
                waiter.callback(None)

    def _schedule_retry(self) -> None:
        self._cancel_deadline()
        if self._stopped or self._retry is not None:
            return
        self._failures += 1
        self.backplane.attempt_failed(self.name, self.last_error)
        self._retry = self._reactor.callLater(retry_delay(self._failures), self._connect)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def heartbeat(self) -> None:
        """PING the usable connection; drop it if the last PING went unanswered too long."""
        protocol = self.protocol
        if protocol is None:
            return
        now = self._reactor.seconds()
        if self._ping_sent is not None:
            if now - self._ping_sent >= PING_TIMEOUT:
                self.last_error = f"no answer to PING within {PING_TIMEOUT} s"
                protocol.transport.abortConnection()
            return
        self._ping_sent = now
        call(protocol, "PING").addBoth(self._pong, protocol)

    def _pong(self, result: Any, protocol: Any) -> None:
        if protocol is self.protocol:
            self._ping_sent = None

    def stop(self) -> defer.Deferred[None]:
        """Stop reconnecting and close; fires once the connection is gone."""
        self._stopped = True
        self._cancel_deadline()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connecting is not None:
            self._connecting.cancel()
        live = [p for p in (self.protocol, self._attempt) if p is not None]
        if not live:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._closed.append(waiter)
        for protocol in live:
            protocol.transport.loseConnection()
        return waiter


@implementer(IBackplane, IRedisBackplane, IBackplaneChannels)
class RedisBackplane:
    """The cluster backplane on one Redis (see the module docstring).

    For health checks and metrics: ``link_up``, ``link_down_since`` (a
    reactor time, or None), ``held_bytes`` (broadcasts waiting for the
    command connection), ``subscribed_rooms`` and ``stats``.
    """

    clustered = True

    def __init__(
        self,
        address: RedisAddress,
        cluster_name: str = DEFAULT_CLUSTER_NAME,
        queue_limit: int = DEFAULT_REDIS_QUEUE,
        membership_ttl: float = DEFAULT_MEMBERSHIP_TTL,
        reactor: Any = None,
        node_id: str | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.address = address
        self.node_id = node_id or uuid.uuid4().hex[:12]
        self.stats = BackplaneStats()
        self.queue_limit = queue_limit
        self.membership_ttl = membership_ttl
        self.cluster_name = cluster_name
        # Extensions' envelopes on room channels, by version byte.
        self._envelope_handlers: dict[int, Callable[[str, bytes], None]] = {}
        self._ttl_ms = int(membership_ttl * 1000)
        self._channel_prefix = f"{cluster_name}:room:".encode()
        self._node_key_prefix = f"{cluster_name}:node:"
        self.key_prefix = f"{cluster_name}:"
        self.node_key_prefix = self._node_key_prefix
        self._node_key = self._node_key_prefix + self.node_id
        self._nodes_key = f"{cluster_name}:nodes"
        self._head = envelope_head(self.node_id)
        self._node: IClusterNode | None = None
        # This node's share: room -> local members, joins being counted included.
        self._local: dict[str, int] = {}
        # Subscribed (or subscribing) channels, and the room each carries.
        self._channels: dict[bytes, str] = {}
        # Joins waiting for a room's SUBSCRIBE to be confirmed.
        self._subscribing: dict[str, list[defer.Deferred[None]]] = {}
        # Broadcasts forwarded since the last flush: [room, origin, frames].
        self._pending: list[tuple[str, str | None, list[bytes]]] = []
        # Envelopes waiting for the command connection (down, or its write
        # buffer full), and their bytes.
        self._queue: deque[tuple[bytes, bytes, int]] = deque()
        self.held_bytes = 0
        self.writable = False
        self._dropping = False
        self.link_up = False
        self.link_down_since: float | None = None
        self._stopping = False
        self._refusals: set[str] = set()
        self._outage_reported = False
        self._loops: list[task.LoopingCall] = []
        # IBackplaneChannels: channels of the extensions and their handlers;
        # hooks run when the command link is usable and at each refresh.
        self._extension_channels: dict[bytes, Callable[[bytes], None]] = {}
        self._link_hooks: list[tuple[Callable[[], None], Callable[[], None]]] = []
        redis_endpoint(reactor, address)  # unreadable PEM files stop startup here
        self._command = RedisConnection(
            "command", self, address, _CommandProtocol, self._command_usable, self._connection_lost
        )
        self._subscriber = RedisConnection(
            "subscriber", self, address, _SubscriberProtocol, self._subscriber_usable, self._connection_lost
        )

    @property
    def subscribed_rooms(self) -> int:
        return len(self._channels)

    def health(self) -> tuple[bool, str]:
        if self.link_up:
            return True, f"Redis link up, {self.subscribed_rooms} rooms subscribed"
        since = self.link_down_since
        down_for = f" for {self.reactor.seconds() - since:.1f} s" if since is not None else ""
        return False, f"Redis link down{down_for}: local delivery only"

    def metric_values(self) -> list[tuple[str, str, str, float]]:
        stats = self.stats
        values = {
            "relay_cluster_link_up": 1 if self.link_up else 0,
            "relay_cluster_subscribed_rooms": self.subscribed_rooms,
            "relay_cluster_held_bytes": self.held_bytes,
            "relay_cluster_link_losses_total": stats.link_losses,
            "relay_cluster_failed_attempts_total": stats.failed_attempts,
            "relay_cluster_published_envelopes_total": stats.published_envelopes,
            "relay_cluster_published_frames_total": stats.published_frames,
            "relay_cluster_published_bytes_total": stats.published_bytes,
            "relay_cluster_received_envelopes_total": stats.received_envelopes,
            "relay_cluster_received_frames_total": stats.received_frames,
            "relay_cluster_dropped_frames_total": stats.dropped_frames,
            "relay_cluster_unconfirmed_frames_total": stats.unconfirmed_frames,
            "relay_cluster_malformed_envelopes_total": stats.malformed_envelopes,
        }
        return [(name, *METRICS[name], value) for name, value in values.items()]

    # Lifecycle

    def start(self, node: IClusterNode) -> None:
        self._node = node
        self.link_down_since = self.reactor.seconds()
        log.info(
            "Cluster node {node} connecting to Redis at {address}",
            node=self.node_id,
            address=str(self.address),
        )
        self._command.start()
        self._subscriber.start()
        for interval, call in ((self.membership_ttl / 3, self._refresh), (PING_INTERVAL, self._heartbeat)):
            loop = task.LoopingCall(call)
            loop.clock = self.reactor
            loop.start(interval, now=False)
            self._loops.append(loop)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        self._stopping = True
        for loop in self._loops:
            loop.stop()
        self._loops = []
        command = self._command.protocol
        if command is not None:
            withdrawn = defer.gatherResults(
                [
                    call(command, "DEL", self._node_key),
                    call(command, "SREM", self._nodes_key, self.node_id),
                ],
                consumeErrors=True,
            )
            withdrawn.addErrback(_ignore)
            withdrawn.addTimeout(WITHDRAW_TIMEOUT, self.reactor)
            withdrawn.addErrback(_ignore)
            yield withdrawn
            if self._command.protocol is command:
                # A TLS transport closes only once its producer is gone.
                command.transport.unregisterProducer()
        yield defer.gatherResults([self._command.stop(), self._subscriber.stop()], consumeErrors=True)
        self.link_up = False
        log.info("Cluster node {node} left Redis. Link: {stats}", node=self.node_id, stats=self.stats)

    # Membership

    def joined(self, room: str, new: bool) -> defer.Deferred[int] | int:
        count = self._local.get(room, 0)
        if new:
            count += 1
            self._local[room] = count
        command, subscriber = self._command.protocol, self._subscriber.protocol
        if command is None or subscriber is None:
            return count  # this node's members: the others cannot be asked
        waits = [self._set_share(command, room, count, counted=True)]
        if new and count == 1:
            self._subscribe(subscriber, room)
        if room in self._subscribing:
            waiter: defer.Deferred[None] = defer.Deferred()
            self._subscribing[room].append(waiter)
            waits.append(waiter)
        counted = defer.gatherResults(waits, consumeErrors=True)
        return counted.addCallbacks(lambda results: int(results[0]), lambda failure: self._local.get(room, 0))

    def left(self, room: str) -> None:
        count = self._local.get(room, 0) - 1
        if count < 0:
            return
        if count:
            self._local[room] = count
        else:
            del self._local[room]
            channel = self._channel(room)
            self._channels.pop(channel, None)
            subscriber = self._subscriber.protocol
            if subscriber is not None:
                call(subscriber, "UNSUBSCRIBE", channel).addErrback(_ignore)
        command = self._command.protocol
        if command is not None:
            self._set_share(command, room, count, counted=False).addErrback(_ignore)

    def _set_share(self, command: Any, room: str, count: int, counted: bool) -> defer.Deferred[Any]:
        return call(
            command,
            "EVAL",
            SHARE_SCRIPT,
            2,
            self._node_key,
            self._nodes_key,
            room,
            count,
            self._ttl_ms,
            self.node_id,
            self._node_key_prefix,
            "1" if counted else "0",
        )

    def _subscribe(self, subscriber: Any, room: str) -> None:
        channel = self._channel(room)
        self._channels[channel] = room
        waiters = self._subscribing.setdefault(room, [])
        # One channel per SUBSCRIBE: txredisapi matches one reply to each command.
        call(subscriber, "SUBSCRIBE", channel).addBoth(self._subscribed, room, waiters)

    def _subscribed(self, result: Any, room: str, waiters: list[defer.Deferred[None]]) -> None:
        if self._subscribing.get(room) is waiters:
            del self._subscribing[room]
        for waiter in waiters:
            waiter.callback(None)

    def _channel(self, room: str) -> bytes:
        return self._channel_prefix + room.encode()

    def _refresh(self) -> None:
        """Keep this node's share alive for another TTL."""
        command = self._command.protocol
        if command is not None and self._local:
            call(command, "PEXPIRE", self._node_key, self._ttl_ms).addErrback(_ignore)
            call(command, "SADD", self._nodes_key, self.node_id).addErrback(_ignore)
            for _, on_refresh in self._link_hooks:
                on_refresh()

    def _heartbeat(self) -> None:
        self._command.heartbeat()
        self._subscriber.heartbeat()

    # Broadcasts out

    def forward(self, room: str, frame: bytes, origin: str | None, batch: Any) -> None:
        pending = self._pending
        if pending:
            last = pending[-1]
            if last[0] == room and last[1] == origin:
                last[2].append(frame)
                return
        elif batch is not None:
            batch.mark_dirty(self)  # flushed with the members' outboxes
        pending.append((room, origin, [frame]))
        if batch is None:
            self.flush()

    def flush(self) -> None:
        """Publish what was forwarded since the last flush: one envelope per
        run of broadcasts to one room from one connection."""
        pending, self._pending = self._pending, []
        head = self._head
        for room, origin, frames in pending:
            self._publish(self._channel(room), head + origin_field(origin) + b"".join(frames), len(frames))

    def _publish(self, channel: bytes, payload: bytes, frames: int) -> None:
        size = len(payload)
        command = self._command.protocol
        if command is not None and self.writable and not self._queue:
            self._send(command, channel, payload, frames)
            return
        if self.held_bytes + size > self.queue_limit:
            self.stats.dropped_frames += frames
            self.stats.dropped_bytes += size
            if not self._dropping:
                self._dropping = True
                log.warn(
                    "Redis queue full ({limit} bytes held): broadcasts to other nodes are dropped and counted",
                    limit=self.queue_limit,
                )
            return
        self.held_bytes += size
        self._queue.append((channel, payload, frames))

    def drain(self) -> None:
        """Send held envelopes, in order, while the command connection takes them."""
        queue = self._queue
        while queue and self.writable:
            command = self._command.protocol
            if command is None:
                return
            channel, payload, frames = queue.popleft()
            self.held_bytes -= len(payload)
            self._send(command, channel, payload, frames)
        if self._dropping and self.held_bytes < self.queue_limit // 2:
            self._dropping = False

    def _send(self, command: Any, channel: bytes, payload: bytes, frames: int) -> None:
        call(command, "PUBLISH", channel, payload).addBoth(self._confirmed, len(payload), frames)

    def _confirmed(self, result: Any, size: int, frames: int) -> None:
        stats = self.stats
        if isinstance(result, Failure):
            stats.unconfirmed_frames += frames
            return
        stats.published_envelopes += 1
        stats.published_frames += frames
        stats.published_bytes += size

    # Broadcasts in

    def received(self, channel: bytes, payload: bytes) -> None:
        """An envelope came in on ``channel``: its frames go to the room's local members."""
        room = self._channels.get(channel)
        if room is None or payload.startswith(self._head):
            if room is None and not payload.startswith(self._head):
                self._channel_received(channel, payload)
            return  # unsubscribed meanwhile, or our own: delivered locally already
        try:
            _node, _origin, frames = parse_envelope(payload)
        except EnvelopeError as error:
            if self._extension_received(room, payload):
                return
            self.stats.malformed_envelopes += 1
            if self.stats.malformed_envelopes == 1 or self.stats.malformed_envelopes % 1000 == 0:
                log.warn(
                    "Dropped a malformed envelope from Redis on {room}: {error} ({count} so far)",
                    room=room,
                    error=str(error),
                    count=self.stats.malformed_envelopes,
                )
            return
        self.stats.received_envelopes += 1
        self.stats.received_frames += len(frames)
        self._node.deliver_remote(room, frames)

    def _extension_received(self, room: str, payload: bytes) -> bool:
        """Hand an envelope of another version to its extension; False if none takes it."""
        handler = self._envelope_handlers.get(payload[0]) if payload else None
        if handler is None:
            return False
        try:
            handler(room, payload)
        except EnvelopeError:
            return False
        self.stats.received_envelopes += 1
        return True

    # Extensions (IRedisBackplane)

    def command_connection(self) -> Any:
        return self._command.protocol

    def add_envelope_handler(self, version: int, handler: Callable[[str, bytes], None]) -> None:
        self._envelope_handlers[version] = handler

    def batch(self) -> Any:
        return self._node.batch if self._node is not None else None

    def flush_node(self) -> None:
        if self._node is not None:
            self._node.flush()

    # The link

    def _command_usable(self, command: Any) -> None:
        """Re-register this node's whole share, then send what was held."""
        args: list[Any] = [self._ttl_ms, self.node_id]
        for room, count in self._local.items():
            args += (room, count)
        call(command, "EVAL", REGISTER_SCRIPT, 2, self._node_key, self._nodes_key, *args).addErrback(_ignore)
        self.writable = True
        command.transport.registerProducer(_WriteWindow(self), True)
        self.drain()
        self._link_changed()
        for on_usable, _ in self._link_hooks:
            on_usable()

    def _subscriber_usable(self, subscriber: Any) -> None:
        """Subscribe again to every room this node serves."""
        self._channels = {}
        for room in self._local:
            self._subscribe(subscriber, room)
        for channel in self._extension_channels:
            call(subscriber, "SUBSCRIBE", channel).addErrback(_ignore)
        self._link_changed()

    def _connection_lost(self, why: str) -> None:
        # Joins waiting for a SUBSCRIBE are answered by its failure.
        self._link_changed()

    def attempt_failed(self, connection: str, why: str) -> None:
        """A connection attempt failed: counted; said once per outage."""
        self.stats.failed_attempts += 1
        if not self._outage_reported and not self._stopping:
            self._outage_reported = True
            log.warn(
                "Redis unreachable ({connection} connection: {why}); local delivery only until it is. Retrying",
                connection=connection,
                why=why or "connection failed",
            )

    def refused(self, connection: str, why: str) -> None:
        """Redis refused AUTH or SELECT: said once per reason until the link is up."""
        if why in self._refusals:
            return
        self._refusals.add(why)
        log.error("Redis refused the {connection} connection: {why}", connection=connection, why=why)

    def _link_changed(self) -> None:
        up = self._command.protocol is not None and self._subscriber.protocol is not None
        if up == self.link_up or self._stopping:
            return
        self.link_up = up
        now = self.reactor.seconds()
        if up:
            self._refusals.clear()
            self._outage_reported = False
            down_for = now - self.link_down_since if self.link_down_since is not None else 0.0
            self.link_down_since = None
            log.info(
                "Redis link up (after {seconds:.2f} s): {rooms} rooms subscribed, {held} bytes of held broadcasts sent",
                seconds=down_for,
                rooms=len(self._channels),
                held=self.held_bytes,
            )
            return
        self.link_down_since = now
        self._outage_reported = True  # said here: not again by each retry
        self.stats.link_losses += 1
        log.warn(
            "Redis link down ({why}); local delivery goes on, broadcasts to other nodes are held"
            " up to {limit} bytes; reconnecting",
            why=self._command.last_error or self._subscriber.last_error or "connection lost",
            limit=self.queue_limit,
        )

    # IBackplaneChannels: Redis for the presence and direct extensions

    def command(self, *args: Any) -> defer.Deferred[Any]:
        command = self._command.protocol
        if command is None:
            return defer.fail(ConnectionError("the Redis link is down"))
        return call(command, *args)

    def publish(self, channel: bytes, payload: bytes) -> defer.Deferred[int]:
        command = self._command.protocol
        if command is None:
            return defer.succeed(0)
        self.flush()  # what was broadcast before goes first
        published = call(command, "PUBLISH", channel, self._head + payload)
        return published.addCallbacks(int, lambda failure: 0)

    def subscribe(self, channel: bytes, handler: Callable[[bytes], None]) -> None:
        self._extension_channels[channel] = handler
        subscriber = self._subscriber.protocol
        if subscriber is not None:
            call(subscriber, "SUBSCRIBE", channel).addErrback(_ignore)

    def unsubscribe(self, channel: bytes) -> None:
        if self._extension_channels.pop(channel, None) is None:
            return
        subscriber = self._subscriber.protocol
        if subscriber is not None:
            call(subscriber, "UNSUBSCRIBE", channel).addErrback(_ignore)

    def add_link_hook(self, on_usable: Callable[[], None], on_refresh: Callable[[], None]) -> None:
        self._link_hooks.append((on_usable, on_refresh))

    def _channel_received(self, channel: bytes, payload: bytes) -> None:
        """A payload on an extension's own channel (presence events, direct messages)."""
        handler = self._extension_channels.get(channel)
        if handler is None or len(payload) < 2 or payload[0] != ENVELOPE_VERSION:
            return
        handler(payload[2 + payload[1] :])
