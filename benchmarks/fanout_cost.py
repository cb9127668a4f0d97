"""The server's Python cost per published message, without sockets.

One publisher and MEMBERS subscribers are RelayProtocols on transports that
discard what they are written; the publisher's reads each carry PER_READ
messages, as a saturated relay-bench run does.  It prints the best time
per message over ITERATIONS rounds of 10 reads.

Wall-clock time on a shared machine is noisy; the instruction count is not.
Run it under callgrind twice, with 2 and 4 rounds, and the difference
divided by the messages of 2 rounds is the cost of one message:

    for n in 2 4; do
        PYTHONPATH=. valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
            python benchmarks/fanout_cost.py $n 2>&1 | grep Collected
    done
    # instructions per message = (second - first) / (2 * 10 * PER_READ)

Environment: MEMBERS (10), SIZE of the content (40), PER_READ (1000),
BINARY=1 for binary messages, COMPRESSING (0): how many of the members
enable the compression extension, CONTENT: a JSON file to publish as
the content instead of SIZE filler characters, HISTORY=N to keep N
deliveries per room (--history) and FEATURES=history for subscribers
that enable it, WEBSOCKET=1 for subscribers on WebSocket (through the
real HTTP upgrade and autobahn, on the same discarding stream).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from relay.server.factory import RelayConfig, RelayFactory
from relay.wire import Flags, MessageType, encode, encode_binary_message, encode_json, loads

MEMBERS = int(os.environ.get("MEMBERS", "10"))
SIZE = int(os.environ.get("SIZE", "40"))
PER_READ = int(os.environ.get("PER_READ", "1000"))
COMPRESSING = int(os.environ.get("COMPRESSING", "0"))
HISTORY = int(os.environ.get("HISTORY", "0"))
FEATURES = [name for name in os.environ.get("FEATURES", "").split(",") if name]


class DiscardingTransport(StringTransport):
    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: list[bytes]) -> None:
        pass


def joined(factory: RelayFactory, user: str, features: tuple[str, ...] = ()):
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    hello = {"userId": user, "features": list(features)} if features else {"userId": user}
    protocol.dataReceived(
        encode_json(MessageType.HELLO, hello)
        + encode_json(MessageType.JOIN_ROOM, {"room": "room"})
    )
    protocol.transport = DiscardingTransport()
    return protocol


UPGRADE = (
    b"GET /relay HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: relay.v1\r\n\r\n"
)


def masked(payload: bytes) -> bytes:
    """One client binary frame (masked with a zero key: the XOR is a no-op)."""
    assert len(payload) < 126
    return bytes((0x82, 0x80 | len(payload))) + bytes(4) + payload


def joined_websocket(site, factory: RelayFactory, user: str):
    """A subscriber through the upgrade on ``site``, writing to a discarding stream."""
    stream = DiscardingStream(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel = site.buildProtocol(stream.getPeer())
    stream.protocol = channel
    channel.makeConnection(stream)
    channel.dataReceived(UPGRADE)
    stream.protocol.dataReceived(
        masked(encode_json(MessageType.HELLO, {"userId": user}))
        + masked(encode_json(MessageType.JOIN_ROOM, {"room": "room"}))
    )
    stream.discarding = True
    return stream.protocol


class DiscardingStream(StringTransport):
    """Keeps what is written until ``discarding``, then drops it."""

    discarding = False

    def write(self, data: bytes) -> None:
        if not self.discarding:
            super().write(data)


def message() -> bytes:
    if os.environ.get("BINARY"):
        return encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("room", b"x" * SIZE))
    content: Any = "x" * SIZE
    if os.environ.get("CONTENT"):
        with open(os.environ["CONTENT"], "rb") as file:
            content = loads(file.read())
    return encode_json(MessageType.MESSAGE, {"room": "room", "content": content})


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    factory = RelayFactory(RelayConfig(history=HISTORY), reactor=Clock())
    publisher = joined(factory, "publisher")
    if os.environ.get("WEBSOCKET"):
        from relay.server.websocket import make_site

        site = make_site(factory)
        for index in range(MEMBERS):
            joined_websocket(site, factory, f"subscriber-{index}")
    else:
        for index in range(MEMBERS):
            features = (("compression",) if index < COMPRESSING else ()) + tuple(FEATURES)
            joined(factory, f"subscriber-{index}", features)
    print(f"{time_per_message(publisher, rounds) * 1e6:.3f} us per message")


def time_per_message(publisher: Any, rounds: int) -> float:
    """The best of ``rounds`` times 10 reads of PER_READ messages, per message, in seconds."""
    read = message() * PER_READ
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(10):
            publisher.dataReceived(read)
        best = min(best, time.perf_counter() - started)
    return best / (10 * PER_READ)


if __name__ == "__main__":
    main()
