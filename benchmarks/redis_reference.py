"""The same traffic against redis-server: a yardstick measured in the same sitting.

Loopback TCP on a virtual machine costs very different amounts from one day
to the next (a 60-byte ``send()`` with ``TCP_NODELAY`` has been measured at
2 and at 8 µs of kernel time on the same machine type), so an absolute
figure says little about the server.  A C pub/sub server driven the same way
minutes before or after says how far from the machine's floor Relay is.

Redis channels stand for rooms; PUBLISH for a MESSAGE.  Pin redis-server as
you pin Relay, and this script as you pin relay-bench:

    taskset -c 0 redis-server --port 6500 --bind 127.0.0.1 --save '' --appendonly no &
    R=$!
    B="taskset -c 1 python benchmarks/redis_reference.py --port 6500 --server-pid $R"
    $B --subscribers 100 --rate 750      # chat: each message its own write, evenly spaced
    $B --subscribers 100 --rate 10000
    $B --subscribers 100 --rooms 10      # s3: 10 channels x (10 subscribers + 1 publisher), max rate
    $B --subscribers 2 --size 16384      # s4: payload MB/s

At a fixed ``--rate`` the publisher is a child process that sends each
PUBLISH alone on an exact schedule and puts its send time in the payload;
``--trackers`` subscribers of each channel, spread from the first to
subscribe to the last, take latency from every message they get (Redis
writes a PUBLISH to its subscribers in reverse order of subscription, so
no one position stands for all).  At full
speed the publishers pipeline PUBLISH commands, at most ``--window``
messages ahead of the slowest subscriber of their channel, so Redis's
output buffers stay small; throughput is counted from the bytes received,
every message being the same size.  One line of JSON is printed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import selectors
import socket
import time

from relay.tools.bench import percentile, process_cpu_seconds

STAMP = 20  # digits of time.monotonic_ns() at the start of each payload


def command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def delivery_size(channel: bytes, size: int) -> int:
    """Bytes of one pub/sub delivery of a ``size``-byte payload on ``channel``."""
    return len(command(b"message", channel, b"x" * size))


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def subscribe(port: int, channel: bytes) -> socket.socket:
    sock = connect(port)
    sock.sendall(command(b"SUBSCRIBE", channel))
    # *3 $9 subscribe $N channel :1
    confirmation = len(command(b"subscribe", channel)) - len(b"*2\r\n") + len(b"*3\r\n:1\r\n")
    received = b""
    while len(received) < confirmation:
        received += sock.recv(confirmation - len(received))
    sock.setblocking(False)
    return sock


def paced_publisher(port: int, channel: bytes, size: int, rate: float, start: float, end: float) -> None:
    """Child process: one PUBLISH per write, evenly spaced, stamped with its send time."""
    sock = connect(port)
    sock.setblocking(False)
    filler = b"x" * (size - STAMP)
    interval = 1 / rate
    due = start
    while due < end:
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)  # no spinning: the subscribers share this core
        stamp = b"%020d" % time.monotonic_ns()
        sock.send(command(b"PUBLISH", channel, stamp + filler))
        try:
            while sock.recv(1 << 16):  # the replies: subscriber counts
                pass
        except BlockingIOError:
            pass
        due += interval


def run(args: argparse.Namespace) -> dict[str, object]:
    channels = [b"room-%d" % n for n in range(args.rooms)]
    size = max(args.size, STAMP)
    message = delivery_size(channels[0], size)  # every channel name has the same length here
    per_room = args.subscribers // args.rooms
    selector = selectors.DefaultSelector()
    received: dict[socket.socket, int] = {}
    partial: dict[socket.socket, bytes] = {}
    room_of: dict[socket.socket, int] = {}
    trackers: set[socket.socket] = set()
    tracked = max(1, min(args.trackers, per_room))
    positions = {round(k * (per_room - 1) / max(1, tracked - 1)) for k in range(tracked)}
    for index, channel in enumerate(channels):
        for position in range(per_room):
            sock = subscribe(args.port, channel)
            received[sock] = 0
            partial[sock] = b""
            room_of[sock] = index
            selector.register(sock, selectors.EVENT_READ)
            if position in positions:
                trackers.add(sock)
    latencies: list[float] = []
    paced = args.rate is not None
    start = time.monotonic() + 0.5
    measure_from = start + args.warmup
    end = measure_from + args.duration
    children = []
    publishers: list[tuple[socket.socket, bytes, int]] = []
    if paced:
        for channel in channels:
            child = multiprocessing.Process(
                target=paced_publisher, args=(args.port, channel, size, args.rate, start, end)
            )
            child.start()
            children.append(child)
    else:
        for index, channel in enumerate(channels):
            sock = connect(args.port)
            sock.setblocking(False)
            publishers.append((sock, command(b"PUBLISH", channel, b"x" * size), index))
    published = [0] * len(channels)
    counted_at_start: int | None = None
    cpu_at_start: float | None = None
    sockets = list(received)
    while True:
        now = time.monotonic()
        if counted_at_start is None and now >= measure_from:
            counted_at_start = sum(received.values())
            cpu_at_start = process_cpu_seconds(args.server_pid) if args.server_pid else None
        if now >= end:
            break
        if not paced:
            slowest = [min(received[s] for s in sockets if room_of[s] == i) // message for i in range(len(channels))]
            for sock, publish, index in publishers:
                ahead = published[index] - slowest[index]
                if ahead < args.window:
                    count = min(args.window - ahead, 64)
                    try:
                        sock.send(publish * count)
                        published[index] += count
                    except BlockingIOError:
                        pass
                try:
                    while sock.recv(1 << 16):
                        pass
                except BlockingIOError:
                    pass
        for key, _ in selector.select(0.001 if not paced else 0.05):
            sock = key.fileobj
            try:
                data = sock.recv(1 << 18)
            except BlockingIOError:
                continue
            arrived = time.monotonic_ns()
            received[sock] += len(data)
            if paced and sock in trackers and now >= measure_from:
                data = partial[sock] + data
                whole = len(data) - len(data) % message
                for offset in range(0, whole, message):
                    stamp_at = offset + message - size - 2
                    sent = int(data[stamp_at : stamp_at + STAMP])
                    latencies.append((arrived - sent) / 1e6)
                partial[sock] = data[whole:]
    counted = sum(received.values()) - (counted_at_start or 0)
    cpu = process_cpu_seconds(args.server_pid) if args.server_pid else None
    for child in children:
        child.join()
    delivered = counted / message / args.duration
    report: dict[str, object] = {
        "delivered_per_second": round(delivered),
        "payload_mb_per_second": round(delivered * size / 1e6, 1),
    }
    if cpu is not None and cpu_at_start is not None:
        busy = cpu - cpu_at_start
        report["server_cpu_percent"] = round(100 * busy / args.duration, 1)
        if delivered:
            report["server_us_per_delivery"] = round(busy / (delivered * args.duration) * 1e6, 3)
    if latencies:
        latencies.sort()
        report["latency_ms"] = {
            "p50": round(percentile(latencies, 50), 3),
            "p99": round(percentile(latencies, 99), 3),
            "max": round(latencies[-1], 3),
            "samples": len(latencies),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=6379)
    parser.add_argument("--server-pid", type=int, default=None)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rooms", type=int, default=1, help="channels, one publisher each")
    parser.add_argument("--size", type=int, default=64, help="payload bytes per message")
    parser.add_argument("--rate", type=float, default=None, help="messages/s per publisher; full speed without")
    parser.add_argument("--trackers", type=int, default=10, help="subscribers per channel that take latency")
    parser.add_argument("--window", type=int, default=1000, help="at full speed, messages ahead of the slowest subscriber")
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--warmup", type=float, default=1)
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
