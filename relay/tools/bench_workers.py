"""Publisher processes for relay-bench's ``--spacing even``.

Chat-like traffic is many messages, each its own write, evenly spaced.  A
Twisted reactor cannot produce that faithfully: its timers wake at
millisecond granularity and its transports coalesce every write made in one
turn into one ``send()``.  So the publishers run in worker processes, each a
plain loop over blocking sockets that sleeps until the next message is due
and sends it alone, with ``TCP_NODELAY`` so the kernel does not merge them
either.  The parent (the reactor, the subscribers, the report) and the
workers share a few counters in shared memory: the messages each publisher
sent to each of its rooms, and how late the workers were.

A worker interleaves its publishers' schedules: with P publishers of K rooms
each at ``rate`` messages/s per room, message n goes to publisher n % P,
room (n // P) % K, at ``start + n / (P * K * rate)``.  A worker that falls
behind sends what is due at once, one write each, and counts the lateness.
"""

from __future__ import annotations

import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

from relay.wire import MessageType, encode_json

# Phases the parent sets in the control block.
WAITING, PUBLISHING, STOPPED, EXIT = 0.0, 1.0, 2.0, 3.0
# Per worker status slots: its phase (JOINING, READY, DONE), late sends (> LATE_SECONDS),
# worst lag (us).
STATUS_FIELDS = 3
JOINING, READY, DONE = 0, 1, 2
LATE_SECONDS = 0.001
# The longest a worker sleeps before looking whether it should stop.
STOP_CHECK_SECONDS = 0.05
# How long a worker waits for its joins to be acknowledged.
JOIN_TIMEOUT = 60.0


@dataclass
class PublisherSpec:
    """One publisher connection of a worker: its name, rooms and counter slots."""

    name: str
    rooms: list[str]
    first_slot: int  # counts[first_slot + k] is what it sent to rooms[k]


@dataclass
class WorkerSpec:
    """What one worker process publishes, and where."""

    index: int
    address: tuple[int, Any]  # (socket family, address)
    publishers: list[PublisherSpec]
    rate: float  # messages/s per publisher per room
    size: int
    binary: bool
    token: str | None


def socket_address(description: str) -> tuple[int, Any]:
    """The socket family and address of a ``tcp:`` or ``unix:`` endpoint description.

    Only these two: the workers publish over plain sockets.
    """
    kind, _, rest = description.partition(":")
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in rest.split(":") if rest else []:
        key, equals, value = part.partition("=")
        if equals:
            named[key] = value
        else:
            positional.append(part)
    try:
        if kind == "tcp":
            host = named.get("host") or positional[0]
            port = int(named.get("port") or positional[1 if "host" not in named else 0])
            return socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port)
        if kind == "unix":
            return socket.AF_UNIX, named.get("path") or positional[0]
    except (IndexError, ValueError):
        pass
    raise ValueError(
        "--spacing even publishes over plain sockets and needs a tcp: or unix: endpoint"
        f" with its address, not {description!r} (use --spacing burst)"
    )


def _frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Remove the complete frames from ``buffer``: (type, payload) each."""
    frames = []
    while len(buffer) >= 7:
        length = int.from_bytes(buffer[:4], "big")
        if len(buffer) < 4 + length:
            break
        frames.append((buffer[5], bytes(buffer[7 : 4 + length])))
        del buffer[: 4 + length]
    return frames


def _join(spec: WorkerSpec, publisher: PublisherSpec) -> socket.socket:
    """A connected socket that said HELLO and joined every room of ``publisher``."""
    family, address = spec.address
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(JOIN_TIMEOUT)
    sock.connect(address)
    if family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hello: dict[str, Any] = {"clientVersion": "relay-bench"}
    if spec.token is None:
        hello["userId"] = publisher.name
    else:
        hello["token"] = spec.token
    requests = [encode_json(MessageType.HELLO, hello)]
    requests += [
        encode_json(MessageType.JOIN_ROOM, {"room": room, "id": k}) for k, room in enumerate(publisher.rooms)
    ]
    sock.sendall(b"".join(requests))
    buffer = bytearray()
    joined = 0
    while joined < len(publisher.rooms):
        data = sock.recv(65536)
        if not data:
            raise RuntimeError(f"{publisher.name} lost its connection while joining")
        buffer += data
        for type_, payload in _frames(buffer):
            if type_ == MessageType.ERROR:
                raise RuntimeError(f"{publisher.name} got an ERROR: {payload[:200]!r}")
            if type_ == MessageType.JOIN_ROOM:
                joined += 1
    sock.settimeout(None)
    return sock


def run_worker(spec: WorkerSpec, counts: Any, status: Any, control: Any) -> None:
    """Process entry point: join, wait for the start, publish on schedule, stop."""
    try:
        _run(spec, counts, status, control)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        raise SystemExit(1) from None


def _run(spec: WorkerSpec, counts: Any, status: Any, control: Any) -> None:
    from relay.tools.bench import binary_message, json_message, stamp

    make = binary_message if spec.binary else json_message
    sockets = [_join(spec, publisher) for publisher in spec.publishers]
    # One (sendall, before, after, slot) per publisher and room, in schedule order.
    slots = []
    rooms_each = len(spec.publishers[0].rooms)
    for k in range(rooms_each):
        for sock, publisher in zip(sockets, spec.publishers):
            before, after = make(publisher.rooms[k], spec.size)
            slots.append((sock.sendall, before, after, publisher.first_slot + k))
    base = spec.index * STATUS_FIELDS
    status[base] = READY
    while control[0] == WAITING:
        time.sleep(0.001)
    interval = 1.0 / (spec.rate * len(slots))
    start = control[1]
    clock = time.monotonic
    sleep = time.sleep
    late = 0
    worst = 0.0
    n = 0
    count = len(slots)
    while control[0] == PUBLISHING:
        due = start + n * interval
        now = clock()
        if due - now > STOP_CHECK_SECONDS:  # a long wait: look at the phase meanwhile
            sleep(STOP_CHECK_SECONDS)
            continue
        if due > now:
            sleep(due - now)
            now = clock()
        elif now - due > LATE_SECONDS:
            late += 1
            worst = max(worst, now - due)
        sendall, before, after, slot = slots[n % count]
        sendall(before + stamp(now) + after)  # one send() unless the socket is full
        counts[slot] += 1
        n += 1
        if not n & 255:
            status[base + 1] = late
            status[base + 2] = int(worst * 1e6)
    status[base + 1] = late
    status[base + 2] = int(worst * 1e6)
    status[base] = DONE  # every count is final
    while control[0] != EXIT:
        sleep(0.01)
    for sock in sockets:
        sock.close()
