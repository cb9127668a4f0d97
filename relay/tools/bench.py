"""relay-bench: a fan-out load generator for any Relay v1 server.

It opens subscriber and publisher connections over Twisted client endpoints,
joins every subscriber to its room before the first publish, then publishes
for a warm-up and a measured window and reports what the server sustained::

    relay-bench --subscribers 100 --publishers 1 --rooms 1 --duration 10

At ``--rate 0`` (the default) each publisher keeps at most ``--window``
messages ahead of its room's tracker (the subscriber that joins it last), and the
tracker is kept within a window of the room's slowest subscriber, so the
figure is a rate the server sustains rather than a queue filling up.

Counting must cost far less than producing: subscribers count deliveries
with ``bytes.count`` of the frame header (JSON payloads can never contain the
raw control bytes of a header), or by walking length prefixes for binary
frames.  The tracker walks length prefixes too, and reads the send time each
publisher writes at the start of the content, in place, to sample latency.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol

from relay.compression import COMPRESSION, compress_frame
from relay.rlimits import raise_open_file_limit
from relay.tools.bench_ws import client_endpoint
from relay.tools.bench_workers import (
    DONE,
    EXIT,
    JOIN_TIMEOUT,
    LATE_SECONDS,
    PUBLISHING,
    READY,
    STATUS_FIELDS,
    STOPPED,
    PublisherSpec,
    WorkerSpec,
    run_worker,
    socket_address,
)
from relay.wire import (
    HEADER,
    HEADER_SIZE,
    LENGTH_SIZE,
    MIN_LENGTH,
    VERSION,
    Flags,
    MessageType,
    encode_json,
)

DEFAULT_ENDPOINT = "tcp:host=127.0.0.1:port=4000"
ROOM_PREFIX = "bench-"
# At full speed a publisher may be this far ahead of its room's tracker, in
# messages and in bytes, whichever is less: enough for the server to read
# big batches, little enough to stay far below its slow-consumer limit.
DEFAULT_WINDOW = 1000
WINDOW_BYTES = 1 << 20
MIN_WINDOW = 8
# How often the slowest subscriber of each room is looked up (and, at a fixed
# rate, how often publishers catch up with their schedule).
PUMP_INTERVAL = 0.002
PROGRESS_INTERVAL = 1.0
# Connections opened at once: fewer than Twisted's default listen backlog
# (50), which a Unix socket enforces by refusing the connection.
CONNECT_CONCURRENCY = 32
DEFAULT_DRAIN = 5.0
# At full speed the tracker parses every Nth delivery for latency.
SAMPLE_EVERY = 16
# Bytes read at once: just under glibc's 128 KiB mmap threshold, as the
# server's default --read-size.
READ_SIZE = 124 * 1024
# The bytes of a delivery's payload the tracker reads for its stamp: enough
# for the room, the sender and the stamp, however they are laid out.
SAMPLE_HEAD = 1024
STAMP_FORMAT = b"%017.6f"
STAMP_SIZE = len(STAMP_FORMAT % 0.0)
PAD_BYTE = b"x"
_LENGTH = struct.Struct("!I")
_U16 = struct.Struct("!H")
# Version, MESSAGE, JSON and the opening of the JSON object: JSON text never
# holds raw control bytes, so this only occurs at the start of a delivery.
JSON_DELIVERY_MARKER = bytes([VERSION, MessageType.MESSAGE, Flags.JSON]) + b'{"'
CONTENT_KEY = b'"content":"'
_BINARY = int(Flags.BINARY)  # IntFlag arithmetic is slow
_COMPRESSED = int(Flags.COMPRESSED)
PERCENTILES = (50, 90, 99)
MB = 1_000_000


class BenchError(Exception):
    """The run could not be carried out (the server refused or vanished)."""


@dataclass
class BenchConfig:
    """What to run; the command-line options, one for one."""

    endpoint: str = DEFAULT_ENDPOINT
    subscribers: int = 100
    publishers: int = 1
    rooms: int = 1
    size: int = 64
    rate: float = 0.0
    duration: float = 10.0
    warmup: float = 2.0
    window: int = 0  # 0: DEFAULT_WINDOW, or fewer for large messages
    drain: float = DEFAULT_DRAIN
    binary: bool = False
    # Processes whose CPU and memory are the server's (nodes, Redis): summed.
    server_pids: tuple[int, ...] = ()
    # Publishers connect here instead (another node of a cluster).
    publisher_endpoint: str | None = None
    progress: bool = True
    # The server's --metrics URL (ending in /metrics): its own counts of the run.
    metrics_url: str | None = None
    # Sent in every HELLO (which then names no user: the token does); never reported.
    token: str | None = field(default=None, repr=False)
    # Every connection enables the compression extension; publishers compress.
    compress: bool = False
    # At a fixed rate: "even" (each message its own write, on schedule, from
    # publisher processes) or "burst" (what is due every tick, in one write).
    # "" picks even when there is a rate.
    spacing: str = ""
    # Rooms each connection joins (many small rooms on few connections).
    rooms_per_connection: int = 1
    # Publisher processes for --spacing even.
    processes: int = 1

    @property
    def even(self) -> bool:
        """Whether publishers send each message alone, on an even schedule.

        The default at a fixed rate, except over WebSocket, whose publishers
        stay in the bench's own process (``--spacing burst``).
        """
        if not self.rate or self.spacing == "burst":
            return False
        publishers = self.publisher_endpoint or self.endpoint
        return self.spacing == "even" or not publishers.startswith(("ws://", "wss://"))


# Frame helpers: only what a load generator needs, kept cheap.


def split_frames(buffer: bytearray) -> list[tuple[int, int, bytes]]:
    """Remove every complete frame from ``buffer``; return (type, flags, payload)."""
    frames = []
    offset = 0
    end_of_data = len(buffer)
    while end_of_data - offset >= HEADER_SIZE:
        length, _version, type_, flags = HEADER.unpack_from(buffer, offset)
        end = offset + LENGTH_SIZE + length
        if end > end_of_data:
            break
        frames.append((type_, flags, bytes(buffer[offset + HEADER_SIZE : end])))
        offset = end
    del buffer[:offset]
    return frames


def stamp(now: float) -> bytes:
    """The send time as it is written at the start of a message's content."""
    return STAMP_FORMAT % now


def read_stamp(data: bytes | bytearray, offset: int) -> float | None:
    try:
        return float(data[offset : offset + STAMP_SIZE])
    except ValueError:
        return None


def json_message(room: str, size: int) -> tuple[bytes, bytes]:
    """Wire bytes of a JSON MESSAGE, split around the send stamp.

    The content is a string of exactly ``size`` characters (at least the stamp).
    """
    pad = PAD_BYTE * max(0, size - STAMP_SIZE)
    body = json.dumps({"room": room, "content": ""}, separators=(",", ":")).encode()
    before, after = body.rsplit(b'""', 1)
    before += b'"'
    after = pad + b'"' + after
    length = MIN_LENGTH + len(before) + STAMP_SIZE + len(after)
    header = HEADER.pack(length, VERSION, MessageType.MESSAGE, Flags.JSON)
    return header + before, after


def binary_message(room: str, size: int) -> tuple[bytes, bytes]:
    """Wire bytes of a binary MESSAGE, split around the send stamp."""
    room_bytes = room.encode()
    pad = PAD_BYTE * max(0, size - STAMP_SIZE)
    payload_size = _U16.size + len(room_bytes) + STAMP_SIZE + len(pad)
    header = HEADER.pack(MIN_LENGTH + payload_size, VERSION, MessageType.MESSAGE, Flags.BINARY)
    return header + _U16.pack(len(room_bytes)) + room_bytes, pad


def delivery_stamp(flags: int, payload: bytes) -> float | None:
    """The send time carried by a delivered MESSAGE, or None."""
    if flags & _COMPRESSED:  # the head of the stream inflates on its own
        payload = zlib.decompressobj().decompress(payload, SAMPLE_HEAD)
    if flags & _BINARY:
        offset = 0
        for _ in range(2):  # room, then sender
            if len(payload) < offset + _U16.size:
                return None
            (size,) = _U16.unpack_from(payload, offset)
            offset += _U16.size + size
        return read_stamp(payload, offset)
    at = payload.find(CONTENT_KEY)
    if at < 0:
        return None
    return read_stamp(payload, at + len(CONTENT_KEY))


# Connections


class BenchConnection(Protocol):
    """HELLO, JOIN_ROOM, then whatever the subclass does with deliveries.

    ``ready`` fires once the join is acknowledged; ``count`` is the number of
    deliveries received since.  With a ``token`` the HELLO carries it and
    leaves the user id to it.
    """

    token: str | None = None
    compress = False

    def __init__(self, name: str, room: str, on_lost: Callable[[BenchConnection], None]) -> None:
        self.name = name
        self.room = room
        # Every room it joins (``room`` first); deliveries are counted over all.
        self.rooms = [room]
        self.count = 0
        self.ready: defer.Deferred[BenchConnection] = defer.Deferred()
        self.joined = False
        self.connected_ = False
        self._acks = 0
        self._handshake = bytearray()
        self._on_lost = on_lost

    def connectionMade(self) -> None:
        self.connected_ = True
        if hasattr(self.transport, "bufferSize"):
            # Fewer, larger reads: counting must cost far less than serving.
            self.transport.bufferSize = READ_SIZE
        if ITCPTransport.providedBy(self.transport):
            # A publisher's small writes must not wait for the server's
            # delayed ACK (Nagle's algorithm), as the server's do not.
            self.transport.setTcpNoDelay(True)
        hello: dict[str, Any] = {"clientVersion": "relay-bench"}
        if self.token is None:
            hello["userId"] = self.name
        else:
            hello["token"] = self.token
        if self.compress:
            hello["features"] = [COMPRESSION]
        self.transport.write(
            encode_json(MessageType.HELLO, hello)
            + b"".join(
                encode_json(MessageType.JOIN_ROOM, {"room": room, "id": k + 1})
                for k, room in enumerate(self.rooms)
            )
        )

    def dataReceived(self, data: bytes) -> None:
        if self.joined:
            self.deliveries(data)
            return
        self._handshake += data
        for type_, _flags, payload in split_frames(self._handshake):
            if type_ == MessageType.ERROR:
                self._fail(f"{self.name} got an ERROR: {payload!r}")
                return
            if type_ == MessageType.JOIN_ROOM:
                self._acks += 1
                self.joined = self._acks == len(self.rooms)
        if self.joined:
            rest, self._handshake = bytes(self._handshake), bytearray()
            self.ready.callback(self)
            if rest:
                self.deliveries(rest)

    def _fail(self, why: str) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(why))
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.connected_ = False
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"{self.name} lost its connection while joining"))
        self._on_lost(self)

    def deliveries(self, data: bytes) -> None:
        raise NotImplementedError


class MarkerCounter(BenchConnection):
    """Counts JSON deliveries by their header bytes, without parsing them."""

    _TAIL = len(JSON_DELIVERY_MARKER) - 1

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._tail = b""

    def deliveries(self, data: bytes) -> None:
        marker = JSON_DELIVERY_MARKER
        # A marker split between two reads shows up only in their seam.
        seam = self._tail + data[: self._TAIL]
        self.count += data.count(marker) + seam.count(marker)
        if len(data) >= self._TAIL:
            self._tail = data[-self._TAIL :]
        else:  # a read shorter than the marker: the seam goes further back
            self._tail = (self._tail + data)[-self._TAIL :]


class LengthWalker(BenchConnection):
    """Counts frames by hopping from length prefix to length prefix.

    For binary deliveries, whose payload may hold any byte: cheap when
    frames are large.
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._skip = 0  # bytes of the current frame still to come
        self._partial = b""  # the first bytes of a length prefix

    def deliveries(self, data: bytes) -> None:
        if self._partial:
            data = self._partial + data
            self._partial = b""
        position = self._skip
        end = len(data)
        unpack = _LENGTH.unpack_from
        count = 0
        while position + LENGTH_SIZE <= end:
            position += LENGTH_SIZE + unpack(data, position)[0]
            count += 1
        self.count += count
        if position > end:
            self._skip = position - end
        else:
            self._skip = 0
            self._partial = data[position:]


class Tracker(LengthWalker):
    """Counts frames by their length prefixes and samples latency.

    Every ``sample_every``-th delivery has its send stamp read in place,
    without copying the frame.  ``on_progress`` is called after each read,
    so publishers can top up at once instead of at the next tick.
    """

    def __init__(
        self,
        *args: Any,
        sample_every: int,
        clock: Callable[[], float],
        on_progress: Callable[[], None],
    ) -> None:
        super().__init__(*args)
        self.sample_every = sample_every
        self.sampling = False
        self.latencies: list[float] = []
        self._clock = clock
        self._on_progress = on_progress

    def deliveries(self, data: bytes) -> None:
        if self._partial:
            data = self._partial + data
            self._partial = b""
        position = self._skip
        end = len(data)
        unpack = HEADER.unpack_from
        count = self.count
        every = self.sample_every
        now = self._clock() if self.sampling else None
        while position + HEADER_SIZE <= end:
            length, _version, _type, flags = unpack(data, position)
            if now is not None and count % every == 0:
                self._sample(now, flags, data, position + HEADER_SIZE, position + LENGTH_SIZE + length)
            position += LENGTH_SIZE + length
            count += 1
        self.count = count
        if position > end:
            self._skip = position - end
        else:
            self._skip = 0
            self._partial = data[position:]
        self._on_progress()

    def _sample(self, now: float, flags: int, data: bytes, start: int, stop: int) -> None:
        # Only when the head of the payload is in this read: a stamp cut in
        # two would read as a wrong time.
        stop = min(stop, start + SAMPLE_HEAD)
        if stop > len(data):
            return
        sent = delivery_stamp(flags, data[start:stop])
        if sent is not None:
            self.latencies.append(now - sent)


class Publisher(BenchConnection):
    """Publishes stamped messages to its room; ignores what it receives."""

    def __init__(self, *args: Any, size: int, binary: bool, clock: Callable[[], float]) -> None:
        super().__init__(*args)
        make = binary_message if binary else json_message
        self._before, self._after = make(self.room, size)
        self._clock = clock
        self.published = 0

    def deliveries(self, data: bytes) -> None:
        self.count += 1  # reads, not frames: other publishers' messages

    def publish(self, count: int) -> None:
        """Write ``count`` messages at once, each stamped with the time now."""
        if count <= 0 or not self.connected_:
            return
        message = self._before + stamp(self._clock()) + self._after
        if self.compress:
            message = compress_frame(message)
        # A sequence of whole frames: over WebSocket, each its own message.
        self.transport.writeSequence([message] * count)
        self.published += count


@dataclass
class RoomPlan:
    """The connections of one room and how far its slowest subscriber got."""

    name: str
    subscribers: list[BenchConnection] = field(default_factory=list)
    publishers: list[Publisher] = field(default_factory=list)
    tracker: Tracker | None = None
    slowest: int = 0  # deliveries to the slowest subscriber, at the last tick

    @property
    def published(self) -> int:
        return sum(p.published for p in self.publishers)

    def update_slowest(self) -> None:
        if self.subscribers:
            self.slowest = min(s.count for s in self.subscribers)
        else:
            self.slowest = self.published

    def floor(self, window: int) -> int:
        """How far deliveries have got, for flow control.

        The tracker's count, fresh after each of its reads; but never more
        than a window ahead of the slowest subscriber, so what is in flight
        to any subscriber stays under two windows.
        """
        if self.tracker is None:
            return self.published
        return min(self.tracker.count, self.slowest + window)

    def received(self) -> int:
        """Deliveries to its subscribers (to all their rooms, when they joined several)."""
        return sum(s.count for s in self.subscribers)

    def expected(self) -> int:
        return self.published * len(self.subscribers)


class SharedCount:
    """What a publisher process sent to one room, read from shared memory."""

    __slots__ = ("_counts", "_slot")

    def __init__(self, counts: Any, slot: int) -> None:
        self._counts = counts
        self._slot = slot

    @property
    def published(self) -> int:
        return self._counts[self._slot]


# Resource usage


def cpu_seconds() -> float:
    """CPU time (user + system) used by this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time used by process ``pid`` so far, from /proc; None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # Fields 14 and 15 of proc(5) (utime, stime); the split dropped the first two.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid: int) -> int | None:
    """Resident set size of process ``pid``; None if unknown."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Snapshot:
    at: float
    published: int
    received: int
    cpu: float
    server_cpu: float | None

    server_cpus: tuple[float | None, ...] = ()

    @classmethod
    def take(cls, bench: Bench) -> Snapshot:
        cpus = tuple(process_cpu_seconds(pid) for pid in bench.config.server_pids)
        known = bool(cpus) and None not in cpus
        return cls(
            at=bench.clock(),
            published=sum(r.published for r in bench.rooms),
            received=bench.received(),
            cpu=cpu_seconds(),
            server_cpu=sum(cpus) if known else None,
            server_cpus=cpus,
        )


# The server's view of a run, from its /metrics: report key -> (metric, labels).
SERVER_COUNTERS = {
    "messages_published": ("relay_messages_published_total", {}),
    "deliveries": ("relay_frames_sent_total", {"type": "MESSAGE"}),
    "frames_out": ("relay_frames_sent_total", {}),
    "bytes_out": ("relay_bytes_sent_total", {}),
    "slow_consumers": ("relay_slow_consumers_total", {}),
}


def server_counts(text: str) -> dict[str, float]:
    """The counters of SERVER_COUNTERS in a Prometheus text scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = dict.fromkeys(SERVER_COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for key, (name, labels) in SERVER_COUNTERS.items():
                if sample.name == name and labels.items() <= sample.labels.items():
                    counts[key] += sample.value
    return counts


def _difference(after: dict[str, float] | None, before: dict[str, float] | None) -> dict[str, int] | None:
    if after is None or before is None:
        return None
    return {key: round(after[key] - before[key]) for key in after}


class ResponseBody(Protocol):
    """Collects an HTTP response body (``done`` fires with it); unlike
    ``readBody``, it does not warn about Twisted's own response proxy."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        from twisted.web.client import ResponseDone

        if reason is None or reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


async def fetch_text(reactor: Any, url: str) -> str:
    """GET ``url``; its body as text (the status must be 200)."""
    from twisted.web.client import Agent

    response = await Agent(reactor).request(b"GET", url.encode("ascii"))
    body = ResponseBody()
    response.deliverBody(body)
    text = await body.done
    if response.code != 200:
        raise BenchError(f"{url} answered HTTP {response.code}")
    return text.decode("utf-8")


def servers_rss_bytes(pids: tuple[int, ...]) -> int | None:
    """The summed RSS of ``pids``; None if any is unknown or there are none."""
    sizes = [process_rss_bytes(pid) for pid in pids]
    return sum(sizes) if sizes and None not in sizes else None


def percentile(ordered: list[float], percent: float) -> float | None:
    """The ``percent`` percentile of sorted values; None without any."""
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, round(percent / 100 * len(ordered)) - 1))
    return ordered[index]


# The run


class Bench:
    """One benchmark run against a server; ``run()`` fires with the report."""

    def __init__(self, config: BenchConfig, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.clock = time.monotonic
        self.rooms = [RoomPlan(f"{ROOM_PREFIX}{index}") for index in range(config.rooms)]
        self.window = config.window or max(
            MIN_WINDOW, min(DEFAULT_WINDOW, WINDOW_BYTES // max(1, config.size))
        )
        self.lost_connections = 0
        self.measuring = False
        self.publishing = False
        self.subscribers: list[BenchConnection] = []
        # --spacing even: the publisher processes and what they share with us.
        self._workers: list[Any] = []
        self._worker_specs: list[WorkerSpec] = []
        self._counts: Any = None
        self._status: Any = None
        self._control: Any = None
        self._pump_loop: task.LoopingCall | None = None
        self._progress_loop: task.LoopingCall | None = None
        self._last_progress: Snapshot | None = None

    # Connecting

    def _lost(self, connection: BenchConnection) -> None:
        if connection.joined:
            self.lost_connections += 1

    def received(self) -> int:
        """Deliveries counted by all subscribers so far."""
        return sum(s.count for s in self.subscribers)

    def _rooms_of(self, index: int) -> list[RoomPlan]:
        """The rooms of connection ``index`` (of its kind): consecutive, round robin."""
        each = self.config.rooms_per_connection
        return [self.rooms[(index * each + k) % len(self.rooms)] for k in range(each)]

    def _plan(self) -> list[BenchConnection]:
        config = self.config
        sample_every = 1 if config.rate else SAMPLE_EVERY
        connections: list[BenchConnection] = []
        # Compressed deliveries have no marker to count: walk their lengths.
        counter = LengthWalker if config.binary or config.compress else MarkerCounter
        for index in range(config.subscribers):
            rooms = self._rooms_of(index)
            room = rooms[0]
            name = f"bench-sub-{index}"
            if any(r.tracker is None for r in rooms):
                subscriber = Tracker(
                    name,
                    room.name,
                    self._lost,
                    sample_every=sample_every,
                    clock=self.clock,
                    on_progress=self._top_up_callback(room),
                )
                for r in rooms:
                    if r.tracker is None:
                        r.tracker = subscriber
            else:
                subscriber = counter(name, room.name, self._lost)
            subscriber.rooms = [r.name for r in rooms]
            for r in rooms:
                r.subscribers.append(subscriber)
            self.subscribers.append(subscriber)
            connections.append(subscriber)
        if config.even:
            self._plan_workers()
            for connection in connections:
                connection.token = config.token
            return connections
        for index in range(config.publishers):
            room = self.rooms[index % config.rooms]
            publisher = Publisher(
                f"bench-pub-{index}",
                room.name,
                self._lost,
                size=config.size,
                binary=config.binary,
                clock=self.clock,
            )
            room.publishers.append(publisher)
            connections.append(publisher)
        for connection in connections:
            connection.token = config.token
            connection.compress = config.compress
        return connections

    async def _connect_all(self, connections: list[BenchConnection]) -> None:
        endpoint = client_endpoint(self.reactor, self.config.endpoint)
        publisher_endpoint = endpoint
        if self.config.publisher_endpoint:
            publisher_endpoint = client_endpoint(self.reactor, self.config.publisher_endpoint)
        semaphore = defer.DeferredSemaphore(CONNECT_CONCURRENCY)

        async def connect(connection: BenchConnection) -> None:
            await connectProtocol(publisher_endpoint if isinstance(connection, Publisher) else endpoint, connection)
            await connection.ready

        def connect_one(connection: BenchConnection) -> defer.Deferred[None]:
            return defer.ensureDeferred(connect(connection))

        # Trackers join last: a server that writes to a room's members in
        # join order reaches them last, so the latency they sample is that of
        # each broadcast's slowest delivery, not its fastest.
        trackers = [c for c in connections if isinstance(c, Tracker)]
        others = [c for c in connections if not isinstance(c, Tracker)]
        for group in (others, trackers):
            try:
                await defer.gatherResults([semaphore.run(connect_one, c) for c in group], consumeErrors=True)
            except defer.FirstError as error:
                raise BenchError(
                    f"connection {connections.index(group[error.index])} of {len(connections)} failed:"
                    f" {error.subFailure.getErrorMessage()}"
                ) from None

    def _plan_workers(self) -> None:
        """Deal the publishers over the publisher processes (--spacing even)."""
        config = self.config
        try:
            address = socket_address(config.publisher_endpoint or config.endpoint)
        except ValueError as error:
            raise BenchError(str(error)) from None
        each = config.rooms_per_connection
        context = multiprocessing.get_context("spawn")
        self._counts = context.RawArray("q", max(1, config.publishers * each))
        processes = max(1, min(config.processes, config.publishers))
        self._status = context.RawArray("q", processes * STATUS_FIELDS)
        self._control = context.RawArray("d", 2)
        specs = [
            WorkerSpec(n, address, [], config.rate, config.size, config.binary, config.token)
            for n in range(processes)
        ]
        for index in range(config.publishers):
            rooms = self._rooms_of(index)
            slot = index * each
            for k, room in enumerate(rooms):
                room.publishers.append(SharedCount(self._counts, slot + k))  # type: ignore[arg-type]
            specs[index % processes].publishers.append(
                PublisherSpec(f"bench-pub-{index}", [r.name for r in rooms], slot)
            )
        self._worker_specs = [spec for spec in specs if spec.publishers]

    async def _start_workers(self) -> None:
        """Start the publisher processes; return once all their joins are acknowledged."""
        context = multiprocessing.get_context("spawn")
        for spec in self._worker_specs:
            process = context.Process(
                target=run_worker, args=(spec, self._counts, self._status, self._control), daemon=True
            )
            process.start()
            self._workers.append(process)
        deadline = self.clock() + JOIN_TIMEOUT + 30
        await self._workers_reach(READY, deadline, "did not join in time")

    async def _workers_reach(self, phase: int, deadline: float, late: str) -> None:
        while not all(self._status[n * STATUS_FIELDS] >= phase for n in range(len(self._workers))):
            for process in self._workers:
                if process.exitcode is not None:
                    raise BenchError(f"a publisher process failed (exit code {process.exitcode})")
            if self.clock() > deadline:
                raise BenchError(f"the publisher processes {late}")
            await task.deferLater(self.reactor, 0.01, lambda: None)

    async def _stop_publishing(self) -> None:
        """Stop the publisher processes; return once their counts are final."""
        if not self._workers:
            return
        self._control[0] = STOPPED
        await self._workers_reach(DONE, self.clock() + 30, "did not stop")

    def _stop_workers(self, phase: float) -> None:
        if self._control is not None:
            self._control[0] = max(self._control[0], phase)
        if phase == EXIT:
            for process in self._workers:
                process.join(5)
                if process.is_alive():
                    process.kill()

    def _worker_lateness(self) -> dict[str, Any] | None:
        """How far the publisher processes fell behind their schedule."""
        if not self._workers:
            return None
        status = self._status
        fields = range(len(self._workers))
        return {
            "late_sends": sum(status[n * STATUS_FIELDS + 1] for n in fields),
            "late_over_ms": LATE_SECONDS * 1000,
            "worst_ms": round(max(status[n * STATUS_FIELDS + 2] for n in fields) / 1000, 3),
        }

    # Publishing

    def _pump(self) -> None:
        """Look up the slowest subscribers; top up publishers or keep to the rate."""
        config = self.config
        for room in self.rooms:
            room.update_slowest()
        if not self.publishing or config.even:
            return
        if config.rate:
            due = int((self.clock() - self._started) * config.rate)
            for room in self.rooms:
                for publisher in room.publishers:
                    publisher.publish(due - publisher.published)
            return
        for room in self.rooms:
            self._top_up(room)

    def _top_up_callback(self, room: RoomPlan) -> Callable[[], None]:
        def top_up() -> None:
            if self.publishing and not self.config.rate:
                self._top_up(room)

        return top_up

    def _top_up(self, room: RoomPlan) -> None:
        """Let the room's publishers send until their window is full again."""
        publishers = room.publishers
        if not publishers:
            return
        window = self.window
        # The room's publishers share one window per publisher.
        free = window * len(publishers) - (room.published - room.floor(window))
        # Top up by at least a quarter window: fewer, larger writes.
        if free < window // 4:
            return
        share = max(1, free // len(publishers))
        for publisher in publishers:
            publisher.publish(share)

    def _progress(self) -> None:
        now = Snapshot.take(self)
        last, self._last_progress = self._last_progress, now
        if last is None or not self.config.progress:
            return
        elapsed = now.at - last.at
        delivered = (now.received - last.received) / elapsed
        published = (now.published - last.published) / elapsed
        payload = delivered * self.config.size / MB
        phase = "measuring" if self.measuring else "warming up" if self.publishing else "draining"
        sys.stderr.write(
            f"\r{phase:>10}: published {published:>10,.0f}/s  delivered {delivered:>12,.0f}/s"
            f"  {payload:>9,.1f} MB/s  in flight {self._in_flight():>7,}  "
        )
        sys.stderr.flush()

    def _in_flight(self) -> int:
        """Messages the slowest subscriber of the most lagging room still lacks."""
        return max(r.published - r.slowest for r in self.rooms)

    async def run(self) -> dict[str, Any]:
        config = self.config
        server_rss_before = servers_rss_bytes(config.server_pids)
        metrics_before = await self._server_counts()
        connections = self._plan()
        connect_started = self.clock()
        await self._connect_all(connections)
        connect_seconds = self.clock() - connect_started
        server_rss_connected = servers_rss_bytes(config.server_pids)

        self._progress_loop = task.LoopingCall(self._progress)
        self._progress_loop.clock = self.reactor
        self._progress_loop.start(PROGRESS_INTERVAL)
        self._pump_loop = task.LoopingCall(self._pump)
        self._pump_loop.clock = self.reactor
        interval = PUMP_INTERVAL
        if config.rate and 1 / config.rate > interval:
            interval = 1 / config.rate
        try:
            if config.even and self._worker_specs:
                await self._start_workers()
            self._started = self.clock()
            self.publishing = config.publishers > 0
            if self._control is not None:
                self._control[1] = self._started
                self._control[0] = PUBLISHING
            self._pump_loop.start(interval)
            await task.deferLater(self.reactor, config.warmup, lambda: None)
            for room in self.rooms:
                if room.tracker is not None:
                    room.tracker.sampling = True
            self.measuring = True
            start = Snapshot.take(self)
            await task.deferLater(self.reactor, config.duration, lambda: None)
            end = Snapshot.take(self)
            self.measuring = False
            for room in self.rooms:
                if room.tracker is not None:
                    room.tracker.sampling = False
            self.publishing = False
            await self._stop_publishing()
            drain_seconds = await self._drain()
            metrics_after = await self._server_counts()
        finally:
            self._stop_workers(EXIT)
            if self._pump_loop.running:
                self._pump_loop.stop()
            self._progress_loop.stop()
            if config.progress:
                sys.stderr.write("\n")
            for connection in connections:
                if connection.connected_:
                    connection.transport.loseConnection()
        return self._report(
            start,
            end,
            connect_seconds=connect_seconds,
            drain_seconds=drain_seconds,
            server_rss_before=server_rss_before,
            server_rss_connected=server_rss_connected,
            connections=len(connections),
            server_metrics=_difference(metrics_after, metrics_before),
        )

    async def _server_counts(self) -> dict[str, float] | None:
        """The server's own counters from --metrics-url, or None without it."""
        if self.config.metrics_url is None:
            return None
        try:
            text = await fetch_text(self.reactor, self.config.metrics_url)
        except Exception as error:
            raise BenchError(f"cannot read {self.config.metrics_url}: {error}") from None
        return server_counts(text)

    async def _drain(self) -> float:
        """Wait until every subscriber has every message, or the drain timeout."""
        started = self.clock()
        deadline = started + self.config.drain
        while self.clock() < deadline:
            if self.received() >= sum(r.expected() for r in self.rooms):
                break
            await task.deferLater(self.reactor, PUMP_INTERVAL * 10, lambda: None)
        return self.clock() - started

    def _report(self, start: Snapshot, end: Snapshot, **extra: Any) -> dict[str, Any]:
        config = self.config
        elapsed = end.at - start.at
        delivered = (end.received - start.received) / elapsed
        # A tracker of several rooms (--rooms-per-connection) is counted once.
        trackers = {id(r.tracker): r.tracker for r in self.rooms if r.tracker is not None}
        latencies = sorted(l for tracker in trackers.values() for l in tracker.latencies)
        expected = sum(r.expected() for r in self.rooms)
        received = self.received()
        settings = asdict(config)
        settings["token"] = "(given)" if config.token is not None else None
        settings["spacing"] = "even" if config.even else "burst" if config.rate else "window"
        report: dict[str, Any] = {
            "config": settings,
            "seconds": round(elapsed, 3),
            "published_per_second": round((end.published - start.published) / elapsed),
            "delivered_per_second": round(delivered),
            "payload_mb_per_second": round(delivered * config.size / MB, 1),
            "latency_ms": {
                **{f"p{p}": _milliseconds(percentile(latencies, p)) for p in PERCENTILES},
                "max": round(latencies[-1] * 1000, 3) if latencies else None,
                "samples": len(latencies),
            },
            "expected": expected,
            "received": received,
            "lost": max(0, expected - received),
            "duplicated": max(0, received - expected),
            "lost_connections": self.lost_connections,
            "bench_cpu_percent": round(100 * (end.cpu - start.cpu) / elapsed, 1),
            "server_cpu_percent": None,
            "connect_seconds": round(extra["connect_seconds"], 3),
            "drain_seconds": round(extra["drain_seconds"], 3),
            "connections": extra["connections"],
            "published_total": sum(r.published for r in self.rooms),
        }
        lateness = self._worker_lateness()
        if lateness is not None:
            report["publisher_lateness"] = lateness
        if extra["server_metrics"] is not None:
            report["server_metrics"] = extra["server_metrics"]
        if start.server_cpu is not None and end.server_cpu is not None:
            server_cpu = end.server_cpu - start.server_cpu
            report["server_cpu_percent"] = round(100 * server_cpu / elapsed, 1)
            if len(start.server_cpus) > 1:
                report["server_cpu_percent_by_pid"] = {
                    str(pid): round(100 * (after - before) / elapsed, 1)
                    for pid, before, after in zip(config.server_pids, start.server_cpus, end.server_cpus)
                }
            # On a shared machine the server may not get a whole core; what
            # it delivers per CPU-second it did get is the steadier figure.
            if server_cpu > 0:
                report["delivered_per_server_cpu_second"] = round(
                    (end.received - start.received) / server_cpu
                )
            if end.received > start.received:
                report["server_us_per_delivery"] = round(
                    server_cpu / (end.received - start.received) * 1e6, 3
                )
        before, connected = extra["server_rss_before"], extra["server_rss_connected"]
        if before is not None and connected is not None and extra["connections"]:
            report["server_rss_mb"] = round(connected / MB, 1)
            report["server_rss_per_connection_kib"] = round(
                (connected - before) / extra["connections"] / 1024, 2
            )
        return report


def _milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 connection``, ``2 connections``; ``nouns`` when it is not noun + s."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {nouns or noun + 's'}"


def format_report(report: dict[str, Any]) -> str:
    """The report as a few human-readable lines (no figure that was not measured)."""
    latency = report["latency_ms"]
    if latency["samples"]:
        latency_line = (
            f"latency     p50 {latency['p50']} ms  p90 {latency['p90']} ms  p99 {latency['p99']} ms"
            f"  max {latency['max']} ms  ({plural(latency['samples'], 'sample')})"
        )
    else:
        latency_line = "latency     no samples (nothing was delivered to a tracker while measuring)"
    cpu_line = f"cpu         bench {report['bench_cpu_percent']}%"
    if report["server_cpu_percent"] is not None:
        cpu_line += f"  server {report['server_cpu_percent']}%"
    lines = [
        f"published   {report['published_per_second']:>14,} msgs/s",
        f"delivered   {report['delivered_per_second']:>14,} msgs/s"
        f"   ({report['payload_mb_per_second']:,} MB/s of payload)",
        latency_line,
        f"lost        {report['lost']:,} of {plural(report['expected'], 'delivery', 'deliveries')} to subscribers"
        f" over the whole run  ({plural(report['lost_connections'], 'connection')} lost)",
        cpu_line,
    ]
    if "server_cpu_percent_by_pid" in report:
        lines[-1] += "  (" + ", ".join(
            f"pid {pid} {percent}%" for pid, percent in report["server_cpu_percent_by_pid"].items()
        ) + ")"
    if "delivered_per_server_cpu_second" in report:
        lines.append(
            f"efficiency  {report['delivered_per_server_cpu_second']:,} deliveries"
            f" per server CPU-second ({report['server_us_per_delivery']} us of server CPU each)"
        )
    lateness = report.get("publisher_lateness")
    if lateness is not None:
        lines.append(
            f"schedule    {plural(lateness['late_sends'], 'send')} more than {lateness['late_over_ms']:g} ms"
            f" late, worst {lateness['worst_ms']} ms   (even spacing, whole run)"
        )
    if "server_rss_per_connection_kib" in report:
        lines.append(
            f"memory      server RSS {report['server_rss_mb']} MB,"
            f" {report['server_rss_per_connection_kib']} KiB per connection"
        )
    server = report.get("server_metrics")
    if server is not None:
        lines.append(
            f"server      published {server['messages_published']:,}  deliveries {server['deliveries']:,}"
            f"  frames out {server['frames_out']:,}  bytes out {server['bytes_out'] / MB:,.1f} MB"
            f"  slow consumers {server['slow_consumers']:,}   (its /metrics, whole run)"
        )
        lines.append(
            f"bench       published {report['published_total']:,}  received {report['received']:,}"
            "   (the same run, as the bench counted it)"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, bool]:
    """The run described by the command line, and whether to print JSON."""
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(
        prog="relay-bench",
        description="Measure fan-out throughput and latency of a Relay v1 server.",
    )
    add = parser.add_argument
    add("--endpoint", default=defaults.endpoint, help="Twisted client endpoint of the server, or a ws:// or wss:// URL [%(default)s].")
    add("--subscribers", type=_count, default=defaults.subscribers, help="Subscriber connections [%(default)s].")
    add("--publishers", type=_count, default=defaults.publishers, help="Publisher connections [%(default)s].")
    add("--rooms", type=_positive_int, default=defaults.rooms, help="Rooms; connections are dealt out round robin [%(default)s].")
    add("--size", type=_count, default=defaults.size, help="Content bytes per message [%(default)s].")
    add("--rate", type=_seconds, default=defaults.rate, help="Messages/s per publisher; 0 is as fast as the server sustains [%(default)s].")
    add("--duration", type=_positive_seconds, default=defaults.duration, help="Seconds measured [%(default)s].")
    add("--warmup", type=_seconds, default=defaults.warmup, help="Seconds of publishing before measuring [%(default)s].")
    add("--window", type=_count, default=defaults.window, help="At full speed, messages a publisher may be ahead of its room's tracker; 0 picks one from --size [%(default)s].")
    add("--drain", type=_seconds, default=defaults.drain, help="Seconds to wait for the last deliveries before counting losses [%(default)s].")
    add("--binary", action="store_true", help="Publish binary MESSAGEs instead of JSON.")
    add("--compress", action="store_true", help="Enable the compression extension on every connection; publishers send compressed frames.")
    add("--spacing", choices=("even", "burst"), default=None, help="At a fixed --rate: each message its own write on an even schedule, from publisher processes (even, the default but over WebSocket), or what is due every 2 ms in one write (burst).")
    add("--rooms-per-connection", type=_positive_int, default=defaults.rooms_per_connection, help="Rooms each subscriber and publisher joins, consecutive round robin; above 1 it needs --spacing even [%(default)s].")
    add("--processes", type=_positive_int, default=defaults.processes, help="Publisher processes for --spacing even [%(default)s].")
    add("--server-pid", type=_positive_int, action="append", default=[], help="Report this process's CPU and memory as the server's; repeat for a cluster's nodes and Redis (summed).")
    add("--metrics-url", default=None, help="The server's metrics URL (e.g. http://127.0.0.1:9100/metrics): report its own counts of the run.")
    add("--publisher-endpoint", default=None, help="Connect the publishers here instead of --endpoint (another node of a cluster).")
    add("--json", action="store_true", help="Print the report as one JSON object.")
    add("--quiet", action="store_true", help="No live progress line on stderr.")
    credentials = parser.add_mutually_exclusive_group()
    credentials.add_argument("--token", help="Token every connection sends in HELLO (for a server that requires one).")
    credentials.add_argument("--token-file", help="Read the --token from this file.")
    args = parser.parse_args(argv)
    if args.metrics_url is not None and not args.metrics_url.startswith(("http://", "https://")):
        parser.error(f"argument --metrics-url: not an http:// or https:// URL: {args.metrics_url!r}")
    if args.spacing is not None and not args.rate:
        parser.error("argument --spacing: only with a --rate")
    if args.rooms_per_connection > 1 and (not args.rate or args.spacing == "burst"):
        parser.error("argument --rooms-per-connection: above 1 only with a --rate and --spacing even")
    if args.rooms_per_connection > args.rooms:
        parser.error("argument --rooms-per-connection: more than --rooms")
    token = args.token
    if args.token_file is not None:
        try:
            with open(args.token_file, encoding="utf-8") as file:
                token = file.read().strip()
        except OSError as problem:
            parser.error(f"--token-file: {problem.strerror}: {args.token_file}")
    config = BenchConfig(
        endpoint=args.endpoint,
        subscribers=args.subscribers,
        publishers=args.publishers,
        rooms=args.rooms,
        size=args.size,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        window=args.window,
        drain=args.drain,
        binary=args.binary,
        server_pids=tuple(args.server_pid),
        publisher_endpoint=args.publisher_endpoint,
        progress=not args.quiet,
        metrics_url=args.metrics_url,
        token=token,
        compress=args.compress,
        spacing=args.spacing or "",
        rooms_per_connection=args.rooms_per_connection,
        processes=args.processes,
    )
    return config, args.json


def _number(kind: Callable[[str], Any], test: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: argparse names the argument in the error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not test(value) or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}")
        return value

    return parse


_count = _number(int, lambda v: v >= 0, "a whole number of 0 or more")
_positive_int = _number(int, lambda v: v >= 1, "a whole number of 1 or more")
_seconds = _number(float, lambda v: 0 <= v < float("inf"), "a number of 0 or more")
_positive_seconds = _number(float, lambda v: 0 < v < float("inf"), "a number greater than 0")


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``relay-bench``."""
    config, as_json = parse_args(argv)
    raise_open_file_limit()

    async def run(reactor: Any) -> None:
        try:
            report = await Bench(config, reactor).run()
        except BenchError as error:
            sys.stderr.write(f"relay-bench: {error}\n")
            raise SystemExit(1) from None
        print(json.dumps(report) if as_json else format_report(report))

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
