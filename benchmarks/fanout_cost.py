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
that enable it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

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
    for index in range(MEMBERS):
        features = (("compression",) if index < COMPRESSING else ()) + tuple(FEATURES)
        joined(factory, f"subscriber-{index}", features)
    read = message() * PER_READ
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(10):
            publisher.dataReceived(read)
        best = min(best, time.perf_counter() - started)
    print(f"{best / (10 * PER_READ) * 1e6:.3f} us per message")


if __name__ == "__main__":
    main()
