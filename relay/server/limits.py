"""Limits and abuse resistance: rate buckets, per-address counts, strikes, outbound budget.

Everything a misbehaving client can exhaust is bounded here or by a hook that
calls in here (``docs/security.md`` lists them all):

- ``TokenBucket``: publishes, published bytes and joins per connection, on
  the reactor's clock (a GCRA: one stored time, no timer).
- ``Strikes``: rate-limit refusals in a sliding window; too many close the
  connection.
- ``ConnectionLimits``: one connection's buckets, strikes, and which limits it
  has already been logged for (a limit is logged once per connection, then
  counted).
- ``ServerLimits``: what connections share: connections per address (IPv6
  grouped by /64), the server-wide budget of queued outbound bytes, and the
  counters of every limit hit.

Nothing here touches the fan-out path unless a rate option is set.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import re
from typing import TYPE_CHECKING, Any, Callable

from twisted.logger import Logger

from relay.wire import ErrorCode, MessageType, encode_json

if TYPE_CHECKING:
    from relay.server.protocol import RelayProtocol

log = Logger()

# Strikes are counted over this many seconds.
STRIKE_WINDOW_SECONDS = 10.0
# What an echoed client value (a room name, say) is cut to, in characters.
MAX_ECHO = 64
# Descriptors kept free beyond the connections: listeners, log files, the
# metrics listener, Redis, and connections accepted only to be refused.
FILE_HEADROOM = 128
# The --max-connections default when the file limit allows more.
MAX_CONNECTIONS_CEILING = 50_000

_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(s|sec|second|m|min|minute))?\s*$", re.IGNORECASE)


# Option values


def parse_size(value: str) -> int:
    """A byte count: ``65536``, ``64KiB``, ``1MiB``, ``1G`` (binary units)."""
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size such as 65536, 64KiB or 1MiB")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _SIZE_UNITS[unit]


parse_size.coerceDoc = "A byte count; KiB, MiB and GiB suffixes are allowed."  # type: ignore[attr-defined]


def parse_positive_size(value: str) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"{value} is not a positive size")
    return size


parse_positive_size.coerceDoc = parse_size.coerceDoc  # type: ignore[attr-defined]


def parse_rate(value: str) -> float:
    """Events per second: ``100/s``, ``100`` or ``600/min``; ``0`` means off."""
    match = _RATE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a rate such as 100/s or 600/min")
    rate = float(match.group(1))
    if (match.group(2) or "s").lower().startswith("m"):
        rate /= 60.0
    return rate


parse_rate.coerceDoc = "N/s or N/min; 0 turns it off."  # type: ignore[attr-defined]


def positive_int(value: str) -> int:
    """An option's value as a positive integer (usage.Options coerce)."""
    number = int(value)
    if number <= 0:
        raise ValueError(f"{value} is not a positive integer")
    return number


positive_int.coerceDoc = "Must be a positive integer."  # type: ignore[attr-defined]


def non_negative_seconds(value: str) -> float:
    """An option's value as a finite number of seconds, 0 or more (usage.Options coerce)."""
    seconds = float(value)
    if not 0 <= seconds < math.inf:
        raise ValueError(f"{value} is not a number of seconds")
    return seconds


non_negative_seconds.coerceDoc = "Seconds, 0 or more."  # type: ignore[attr-defined]


OPTIONS = [
    ["rate-limit", None, None, "Publishes per second per connection (N/s); past it RATE_LIMITED [default: off]", parse_rate],
    ["rate-burst", None, None, "Publishes a connection may send at once under --rate-limit [default: one second's worth]", positive_int],
    ["byte-rate", None, None, "Published bytes per second per connection (KiB, MiB suffixes) [default: off]", parse_size],
    ["join-rate", None, 20.0, "Room joins per second per connection, after a burst of --max-rooms plus one second's worth (N/s; 0 turns it off).", parse_rate],
    ["rate-strikes", None, 50, "RATE_LIMITED refusals within 10 s that close the connection.", positive_int],
    ["max-connections-per-ip", None, None, "Connections from one IPv4 address or IPv6 /64 [default: off]", positive_int],
    ["hello-timeout", None, 10.0, "Seconds a new connection has to send its first complete frame (with authentication: its HELLO with a token); 0 for no deadline.", non_negative_seconds],
    ["max-pending-total", None, 1024**3, "Bytes queued for all paused clients together; past it the largest queues are cut off (KiB, MiB, GiB suffixes).", parse_positive_size],
    ["send-buffer", None, 256 * 1024, "Kernel send buffer of each client socket, in bytes (0 leaves the kernel's autotuning).", parse_size],
]


def config_fields(options: Any) -> dict[str, Any]:
    """The RelayConfig fields of this module's options, from parsed options."""
    return {
        "hello_timeout": options["hello-timeout"],
        "rate_limit": options["rate-limit"] or None,
        "rate_burst": options["rate-burst"],
        "byte_rate": options["byte-rate"] or None,
        "join_rate": options["join-rate"] or None,
        "rate_strikes": options["rate-strikes"],
        "max_connections_per_ip": options["max-connections-per-ip"],
        "max_pending_total": options["max-pending-total"],
        "send_buffer": options["send-buffer"],
    }


def default_max_connections(open_files: int | None) -> int:
    """Connections the server can hold with ``open_files`` descriptors.

    Leaves ``FILE_HEADROOM`` free, so that a connection over the limit can
    still be accepted and told ``TOO_MANY_CONNECTIONS`` instead of being
    left in the kernel's queue or reset.
    """
    if open_files is None or open_files <= 0:
        return MAX_CONNECTIONS_CEILING
    return max(1, min(MAX_CONNECTIONS_CEILING, open_files - FILE_HEADROOM))


# Echoed values


def clip(value: str, limit: int = MAX_ECHO) -> str:
    """``repr(value)``, cut to ``limit`` characters of the value.

    For every client value echoed in an ERROR or a log line: the value may
    be as long as a frame.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def address_group(peer: Any) -> str | None:
    """The key connections from ``peer`` are counted under, or None if exempt.

    IPv4 addresses count one by one (an IPv4-mapped IPv6 address as its IPv4
    address); IPv6 addresses by their /64, the smallest block one subscriber
    is usually given.  Unix sockets and unknown peers are exempt.
    """
    host = getattr(peer, "host", None)
    if not isinstance(host, str) or getattr(peer, "type", "TCP") not in ("TCP", "UDP"):
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


# Rate limiting

# Below a microsecond, a wait is the rounding of a float clock, not a wait.
_CLOCK_SLACK = 1e-6


class TokenBucket:
    """A token bucket of ``burst`` tokens refilled at ``rate`` per second.

    Kept as a GCRA: ``tat`` is the time at which the bucket will be full
    again, so a check is a comparison and an addition, with no timer.  It
    starts full.  A take succeeds while at least one token is left and may
    then go into debt (a message larger than the byte bucket still passes,
    once, when the bucket is full), so the long-run rate is exact.
    """

    __slots__ = ("interval", "tolerance", "tat")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.interval = 1.0 / rate
        # How far ahead of now ``tat`` may be while a token is left.
        self.tolerance = (max(burst, 1.0) - 1.0) * self.interval
        self.tat = now

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; 0.0 if that was allowed, else seconds to wait."""
        tat = self.tat
        if tat < now:
            tat = now
        wait = tat - now - self.tolerance
        if wait > _CLOCK_SLACK:
            return wait
        self.tat = tat + cost * self.interval
        return 0.0


class Strikes:
    """Refusals within a sliding window: ``add`` says when there were too many."""

    __slots__ = ("_limit", "_window", "_times")

    def __init__(self, limit: int, window: float = STRIKE_WINDOW_SECONDS) -> None:
        self._limit = limit
        self._window = window
        self._times: collections.deque[float] = collections.deque(maxlen=limit)

    def add(self, now: float) -> bool:
        """Record a strike at ``now``; True once ``limit`` fall within the window."""
        times = self._times
        times.append(now)
        return len(times) == self._limit and now - times[0] <= self._window


def rate_limited_error(message: str, wait: float, request_id: Any = None, fatal: bool = False) -> bytes:
    """The RATE_LIMITED ERROR frame, with ``retryAfter`` in whole milliseconds."""
    body: dict[str, Any] = {
        "code": ErrorCode.RATE_LIMITED.value,
        "message": message,
        "fatal": fatal,
        "retryAfter": max(1, math.ceil(wait * 1000)),
    }
    if request_id is not None:
        body["id"] = request_id
    return encode_json(MessageType.ERROR, body)


class ConnectionLimits:
    """One connection's rate buckets, strikes, already-logged limits and hello deadline."""

    __slots__ = ("publishes", "bytes", "joins", "strikes", "_logged", "suppressed", "hello_pending")

    def __init__(self, config: Any, now: float) -> None:
        self.publishes = self.bytes = self.joins = None
        if config.rate_limit:
            burst = config.rate_burst or max(1.0, config.rate_limit)
            self.publishes = TokenBucket(config.rate_limit, burst, now)
        if config.byte_rate:
            self.bytes = TokenBucket(config.byte_rate, config.byte_rate, now)
        if config.join_rate:
            # A client may (re)join all the rooms it may be in at once, as a
            # reconnecting client does, plus a second's worth.
            self.joins = TokenBucket(config.join_rate, config.max_rooms + config.join_rate, now)
        self.strikes = Strikes(config.rate_strikes)
        self._logged: set[str] = set()
        # Limit hits not logged, because one of the same kind already was.
        self.suppressed = 0
        # The hello deadline holds until the first complete frame (the HELLO,
        # with authentication).
        self.hello_pending = True

    @property
    def limits_publishes(self) -> bool:
        """Whether publishes go through a bucket at all."""
        return self.publishes is not None or self.bytes is not None

    def publish_wait(self, now: float, size: int) -> float:
        """0.0 if a publish of ``size`` payload bytes may go now, else seconds to wait."""
        bucket = self.publishes
        if bucket is not None:
            wait = bucket.take(now)
            if wait:
                return wait
        bucket = self.bytes
        if bucket is not None:
            wait = bucket.take(now, size)
            if wait:
                if self.publishes is not None:
                    self.publishes.tat -= self.publishes.interval  # not sent: give it back
                return wait
        return 0.0

    def first_time(self, kind: str) -> bool:
        """True the first time a limit of ``kind`` is hit on this connection."""
        if kind in self._logged:
            self.suppressed += 1
            return False
        self._logged.add(kind)
        return True


# What connections share


class OutboundBudget:
    """Bytes queued for paused (DRAINING) connections, server-wide.

    Each paused connection reports what it holds; past ``limit`` the largest
    queues are cut off as slow consumers until the total is back under it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self._held: dict[RelayProtocol, int] = {}

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, connection: RelayProtocol, size: int) -> None:
        """``connection`` is paused holding ``size`` bytes."""
        self.total += size - self._held.get(connection, 0)
        self._held[connection] = size

    def grow(self, connection: RelayProtocol, size: int) -> None:
        """A paused ``connection`` queued ``size`` more bytes."""
        self._held[connection] += size
        self.total += size

    def release(self, connection: RelayProtocol) -> None:
        """``connection`` is no longer paused (resumed, cut off or closed)."""
        self.total -= self._held.pop(connection, 0)

    def largest(self) -> list[RelayProtocol]:
        """The paused connections to cut off to get back under the limit, largest first."""
        excess = self.total - self.limit
        chosen = []
        for connection, size in sorted(self._held.items(), key=lambda item: -item[1]):
            if excess < 0:
                break
            chosen.append(connection)
            excess -= size
        return chosen


class ServerLimits:
    """The limits connections share: per-address counts, the outbound budget, counters."""

    def __init__(self, config: Any, seconds: Callable[[], float]) -> None:
        self.config = config
        self.seconds = seconds
        self.outbound = OutboundBudget(config.max_pending_total)
        # Every limit hit and refusal, by kind, for the metrics and the summary.
        self.counters: collections.Counter[str] = collections.Counter()
        self._per_group: collections.Counter[str] = collections.Counter()
        self._groups: dict[RelayProtocol, str] = {}

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(self.config, self.seconds())

    def admit(self, connection: RelayProtocol, peer: Any) -> str | None:
        """Count a new connection from ``peer``; the refusal message if it is one too many."""
        limit = self.config.max_connections_per_ip
        if limit is None:
            return None
        group = address_group(peer)
        if group is None:
            return None
        if self._per_group[group] >= limit:
            self.counters["too_many_per_ip"] += 1
            return f"at most {limit} connections from one address"
        self._per_group[group] += 1
        self._groups[connection] = group
        return None

    def release(self, connection: RelayProtocol) -> None:
        """Forget a closed connection: its address count and its queued bytes."""
        self.outbound.release(connection)
        group = self._groups.pop(connection, None)
        if group is not None:
            self._per_group[group] -= 1
            if not self._per_group[group]:
                del self._per_group[group]

    def over_budget(self) -> None:
        """The outbound total passed its limit: cut off the largest queues."""
        outbound = self.outbound
        if outbound.total <= outbound.limit:
            return
        for connection in outbound.largest():
            self.counters["outbound_budget"] += 1
            connection.fail(
                ErrorCode.SLOW_CONSUMER,
                f"the server holds more than {outbound.limit} queued bytes and this queue is among the largest",
            )
