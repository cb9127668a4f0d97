"""The cluster backplane: what a node's room registry tells the other nodes.

A Relay node keeps its rooms in a ``RoomRegistry``.  When it is one node of
a cluster, the registry also talks to a backplane (``IBackplane``):

- a local member joined room R (and how many members R has cluster-wide);
- a local member left room R;
- forward this encoded delivery to the other nodes serving R;

and the backplane hands deliveries from other nodes back to the node
(``IClusterNode.deliver_remote``) as the same encoded bytes, for the node's
own members.  ``LocalBackplane`` is the default: no other node, nothing to
tell.  ``relay.server.redis_backplane.RedisBackplane`` is the Redis one.

This module also holds the cluster's command-line options and the parsing
of a Redis address, so that ``twistd relay`` without ``--redis`` never
imports a Redis client.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

DEFAULT_CLUSTER_NAME = "relay"
DEFAULT_REDIS_PORT = 6379
# Bytes of broadcasts a node holds for Redis while the link is down or slow:
# what all its publishers may produce between two writes to Redis at full
# speed (several reads of 124 KiB, each delivery larger than its message).
DEFAULT_REDIS_QUEUE = 16 * 1024 * 1024
# Seconds a node's share of membership lives in Redis unless refreshed.
DEFAULT_MEMBERSHIP_TTL = 15
CLUSTER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Read when the --redis URL carries no password, so it need not be on the
# command line (where `ps` shows it).
PASSWORD_VARIABLE = "RELAY_REDIS_PASSWORD"
_TLS_KEYS = ("trustRoots", "certificate", "privateKey")


class IClusterNode(Interface):
    """What a backplane needs of the node it serves (the ``RelayFactory``)."""

    def deliver_remote(room: str, frames: list[bytes]) -> None:
        """Hand encoded deliveries from another node to the local members of ``room``."""

    def flush() -> None:
        """Write what the deliveries handed over since the last flush queued."""


class IBackplane(Interface):
    """The link between one node's room registry and the other nodes."""

    node_id = Attribute("This node's id in the cluster (a short string, unique per process start).")
    clustered = Attribute("True if other nodes may exist: broadcasts must be forwarded.")
    link_up = Attribute("True while the node can reach the other nodes.")
    stats = Attribute("Counters of what crossed the link (a BackplaneStats).")

    def start(node: IClusterNode) -> None:
        """Begin serving ``node``: connect, and deliver other nodes' broadcasts to it."""

    def stop() -> defer.Deferred[None]:
        """Withdraw this node from the cluster and disconnect."""

    def joined(room: str, new: bool) -> defer.Deferred[int] | int | None:
        """A local member is joining ``room`` (``new``: it was not in it before).

        Returns None when there is no cluster: the local count is the
        count.  An int when the count is known at once (the link is down:
        this node's members).  Otherwise a Deferred, not yet fired, that
        fires, never with an error, with the room's member count across
        the cluster (this member included) once the node receives the
        room's broadcasts from the other nodes.
        """

    def left(room: str) -> None:
        """A local member left ``room`` (or was going to join it and is gone)."""

    def forward(room: str, frame: bytes, origin: str | None, batch: Any) -> None:
        """Send an encoded delivery to ``room``'s members on the other nodes.

        ``origin`` is the publishing connection's id.  With a ``batch``
        (``relay.server.fanout.Batch``), what is forwarded until its flush
        may travel together; without one it is sent at once.
        """

    def health() -> tuple[bool, str]:
        """``(ok, detail)`` for a health check: not ok while the link is down."""

    def metric_values() -> list[tuple[str, str, str, float]]:
        """``(name, kind, help, value)`` of each metric the backplane keeps,
        ``kind`` being ``"gauge"`` or ``"counter"``; read at scrape time."""


class IRedisBackplane(IBackplane):
    """A backplane on Redis that extensions may keep state in
    (``relay.server.redis_history``): its command connection, its key
    prefix, and envelopes of their own on the rooms' channels."""

    cluster_name = Attribute("The prefix of the cluster's Redis keys and channels.")

    def command_connection() -> Any:
        """The usable command connection (txredisapi), or None while Redis is away."""

    def add_envelope_handler(version: int, handler: Any) -> None:
        """Hand envelopes whose first byte is ``version`` (2-255) published on
        a room's channel to ``handler(room, payload)``; the handler raises
        ``EnvelopeError`` for a malformed one.  This node's own are handed
        over too."""

    def batch() -> Any:
        """The node's current ``Batch``: what handlers deliver is flushed after each read."""
class IBackplaneChannels(Interface):
    """What the presence and direct extensions use of a clustered backplane:
    its Redis connections, for keys and channels of their own.

    Only ``RedisBackplane`` provides it; ``relay.server.redis_presence``
    is its one user.  Payloads published here start with the node's
    envelope head, so each node ignores its own.
    """

    key_prefix = Attribute("The cluster's prefix of keys and channels, e.g. ``relay:``.")
    node_key_prefix = Attribute("Prefix of the per-node membership hashes: a node is alive while its key exists.")
    membership_ttl = Attribute("Seconds a node's keys live unless refreshed.")

    def command(*args: Any) -> defer.Deferred[Any]:
        """Run one Redis command on the command connection, after what was
        sent before; fails while the connection is down."""

    def publish(channel: bytes, payload: bytes) -> defer.Deferred[int]:
        """Publish ``payload`` (after this node's pending broadcasts); fires
        with the number of nodes subscribed, this one included, or 0 while
        the link is down.  Never fails."""

    def subscribe(channel: bytes, handler: Any) -> None:
        """Call ``handler(payload)`` with what other nodes publish on ``channel``
        (subscribed again whenever the link comes back)."""

    def unsubscribe(channel: bytes) -> None:
        """Stop receiving ``channel``."""

    def add_link_hook(on_usable: Any, on_refresh: Any) -> None:
        """``on_usable()`` runs each time the command connection becomes
        usable (to write this node's state again), ``on_refresh()`` each
        time the node refreshes its membership share (every third of the TTL)."""


@dataclass
class BackplaneStats:
    """What crossed a backplane's link, for logs, metrics and health checks."""

    link_losses: int = 0
    # Connection attempts that failed (counted, not logged one by one).
    failed_attempts: int = 0
    published_envelopes: int = 0
    published_frames: int = 0
    published_bytes: int = 0
    received_envelopes: int = 0
    received_frames: int = 0
    # Frames given up on: the queue was full (dropped), or they were written
    # to a connection that failed before Redis confirmed them (unconfirmed).
    dropped_frames: int = 0
    dropped_bytes: int = 0
    unconfirmed_frames: int = 0
    malformed_envelopes: int = 0


@implementer(IBackplane)
class LocalBackplane:
    """The embedded default: one node, no one to tell."""

    node_id = "local"
    clustered = False
    link_up = True

    def __init__(self) -> None:
        self.stats = BackplaneStats()

    def start(self, node: IClusterNode) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def joined(self, room: str, new: bool) -> None:
        return None

    def left(self, room: str) -> None:
        pass

    def forward(self, room: str, frame: bytes, origin: str | None, batch: Any) -> None:
        pass

    def health(self) -> tuple[bool, str]:
        return True, "one node"

    def metric_values(self) -> list[tuple[str, str, str, float]]:
        return []


# What each metric of a cluster node means: name -> (kind, help).
METRICS = {
    "relay_cluster_link_up": ("gauge", "1 while the node reaches Redis (both connections), else 0."),
    "relay_cluster_subscribed_rooms": ("gauge", "Rooms whose Redis channel this node subscribes to."),
    "relay_cluster_held_bytes": ("gauge", "Envelope bytes waiting for the Redis command connection."),
    "relay_cluster_link_losses_total": ("counter", "Times the Redis link went down."),
    "relay_cluster_failed_attempts_total": ("counter", "Redis connection attempts that failed."),
    "relay_cluster_published_envelopes_total": ("counter", "Envelopes published to Redis and confirmed."),
    "relay_cluster_published_frames_total": ("counter", "Deliveries sent to other nodes, confirmed by Redis."),
    "relay_cluster_published_bytes_total": ("counter", "Envelope bytes published to Redis and confirmed."),
    "relay_cluster_received_envelopes_total": ("counter", "Envelopes from other nodes handed to local members."),
    "relay_cluster_received_frames_total": ("counter", "Deliveries from other nodes handed to local members."),
    "relay_cluster_dropped_frames_total": ("counter", "Deliveries for other nodes dropped: the Redis queue was full."),
    "relay_cluster_unconfirmed_frames_total": ("counter", "Deliveries written to a Redis connection that failed before confirming them."),
    "relay_cluster_malformed_envelopes_total": ("counter", "Envelopes from Redis that were not laid out as expected."),
}


@dataclass(frozen=True)
class RedisAddress:
    """Where the Redis of a cluster is, parsed from a ``--redis`` URL.

    Its ``repr`` and ``str`` never show the password.
    """

    scheme: str  # "redis", "rediss" (TLS) or "unix"
    host: str = "127.0.0.1"
    port: int = DEFAULT_REDIS_PORT
    path: str | None = None  # of a Unix socket
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # PEM files for rediss: CA bundle to trust, client certificate and key.
    trust_roots: str | None = None
    certificate: str | None = None
    private_key: str | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    def __str__(self) -> str:
        auth = ""
        if self.username or self.password:
            auth = f"{self.username or ''}{':***' if self.password else ''}@"
        if self.scheme == "unix":
            return f"unix://{auth}{self.path}?db={self.db}"
        return f"{self.scheme}://{auth}{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str, environ: dict[str, str] | None = None) -> RedisAddress:
    """A ``RedisAddress`` from ``redis://[[user]:password@]host[:port][/db]``.

    Also ``rediss://`` (TLS; query keys ``trustRoots``, ``certificate``,
    ``privateKey`` name PEM files) and ``unix:///path/to/redis.sock`` (query
    keys ``db`` and ``password``).  Without a password in the URL,
    ``RELAY_REDIS_PASSWORD`` is used if set.  Raises ValueError.
    """
    environ = os.environ if environ is None else environ
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"a Redis URL starts with redis://, rediss:// or unix://, not {scheme or url!r}")
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    unknown = set(query) - {"db", "password", *_TLS_KEYS}
    if unknown:
        raise ValueError(f"unknown Redis URL parameter(s): {', '.join(sorted(unknown))}")
    if scheme != "rediss" and set(query) & set(_TLS_KEYS):
        raise ValueError(f"{', '.join(_TLS_KEYS)} need a rediss:// URL")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else query.get("password")
    password = password or environ.get(PASSWORD_VARIABLE) or None
    db = _database(parts.path if scheme != "unix" else "", query.get("db"))
    if scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// Redis URL needs a socket path: unix:///path/to/redis.sock")
        return RedisAddress("unix", path=parts.path, db=db, username=username, password=password)
    try:
        port = parts.port or DEFAULT_REDIS_PORT
    except ValueError:
        raise ValueError(f"bad port in Redis URL {RedisAddress('redis', host='?', password=password)}") from None
    return RedisAddress(
        scheme,
        host=parts.hostname or "127.0.0.1",
        port=port,
        db=db,
        username=username,
        password=password,
        trust_roots=query.get("trustRoots"),
        certificate=query.get("certificate"),
        private_key=query.get("privateKey"),
    )


def _database(path: str, query_db: str | None) -> int:
    text = path.strip("/") or query_db or "0"
    if not text.isdigit():
        raise ValueError(f"the Redis database must be a number, not {text!r}")
    return int(text)


def _cluster_name(name: str) -> str:
    if not CLUSTER_NAME.fullmatch(name):
        raise ValueError(f"{name!r}: 1-64 letters, digits, '_', '.' or '-'")
    return name


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"{value} is not a positive integer")
    return number


def _not_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{value} is negative")
    return number


# twistd options of the cluster: [name, short, default, help, coerce].
OPTIONS: list[list[Any]] = [
    ["redis", None, None, "Redis URL of the cluster backplane: redis://[[user]:password@]host:port/db, rediss:// for TLS, unix:///path.sock; the password may come from RELAY_REDIS_PASSWORD. Off: one node, no Redis.", parse_redis_url],
    ["cluster-name", None, DEFAULT_CLUSTER_NAME, "Nodes with the same Redis and cluster name share their rooms.", _cluster_name],
    ["redis-queue", None, DEFAULT_REDIS_QUEUE, "Bytes of broadcasts held for Redis while its link is down or slow; past it they are dropped and counted.", _positive],
    ["membership-ttl", None, DEFAULT_MEMBERSHIP_TTL, "Seconds this node's share of room membership lives in Redis unless refreshed (every third of it).", _positive],
    ["workers", None, 0, "Run this many worker processes sharing the listeners, restarted if they die (needs --redis); 0 serves in this process.", _not_negative],
]
