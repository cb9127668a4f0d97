"""What the kernel charges for one unbatched delivery on this machine today.

A relay that writes each delivery with its own ``send()`` can cost no less
than the ``send()`` itself.  This script does nothing but that: a parent
process (pin it where you pin the server) sends MESSAGES-per-second rounds
of one SIZE-byte ``send()`` to each of SUBSCRIBERS loopback TCP sockets, with
``TCP_NODELAY`` as the server sets it, evenly spaced; a child process pinned
to the other core reads them with epoll, as a subscriber process would.
It prints the parent's CPU per send, split into user and system time:

    taskset -c 0 python benchmarks/send_floor.py --subscribers 100 --rate 750

On loopback the receiving side's TCP work runs inside the sender's
``send()``, so this is the per-delivery floor of a relay on this host,
Relay's and redis-server's alike (compare ``server_us_per_delivery`` in
relay-bench's report, measured in the same sitting).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import time


def receive(port: int, subscribers: int, seconds: float, core: int) -> None:
    """Child process: connect every subscriber and read until the time is up."""
    os.sched_setaffinity(0, {core})
    poller = select.epoll()
    sockets = {}
    for _ in range(subscribers):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        poller.register(sock.fileno(), select.EPOLLIN)
        sockets[sock.fileno()] = sock
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for fd, _ in poller.poll(0.2):
            try:
                sockets[fd].recv(1 << 16)
            except BlockingIOError:
                pass
    os._exit(0)


def cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rate", type=float, default=750, help="rounds per second, one send per subscriber each")
    parser.add_argument("--size", type=int, default=64, help="bytes per send")
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--receiver-core", type=int, default=1)
    args = parser.parse_args()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    child = os.fork()
    if child == 0:
        receive(port, args.subscribers, args.duration + 3, args.receiver_core)
    accepted = []
    for _ in range(args.subscribers):
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        accepted.append(sock.send)
    message = b"x" * args.size
    time.sleep(0.5)

    user, system = cpu()
    started = due = time.monotonic()
    rounds = 0
    while due < started + args.duration:
        due += 1 / args.rate
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        for send in accepted:
            send(message)
        rounds += 1
    elapsed = time.monotonic() - started
    user_after, system_after = cpu()
    os.waitpid(child, 0)
    sends = rounds * args.subscribers
    print(
        json.dumps(
            {
                "sends_per_second": round(sends / elapsed),
                "cpu_percent": round(100 * (user_after - user + system_after - system) / elapsed, 1),
                "us_per_send": round((user_after - user + system_after - system) / sends * 1e6, 2),
                "user_us_per_send": round((user_after - user) / sends * 1e6, 2),
                "system_us_per_send": round((system_after - system) / sends * 1e6, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
