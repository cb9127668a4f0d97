"""The cost of an unbatched delivery on real sockets, reactor included.

``fanout_cost.py`` measures the server's Python work on transports that
discard what they are written; what a write costs in Twisted's transport
and reactor (buffering, ``startWriting``/``stopWriting``, the reactor turn
that sends) is not in it.  Here one publisher and MEMBERS subscribers are
real loopback TCP connections to a RelayFactory on the default reactor.
The publisher sends one message at a time, as chat traffic does, and the
script turns the reactor by hand (``reactor.iterate(0)``) until every
subscriber has it, reading each subscriber's socket without blocking.
Loopback hands bytes over inside ``send()``, so the number of reactor turns
and syscalls per message does not depend on timing.

Under callgrind, the difference between two message counts is the cost of
the messages alone (the script's own client side, the same in every tree,
included); under ``strace -c -f`` the syscalls per message:

    for n in 200 400; do
        PYTHONPATH=. valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
            python benchmarks/write_cost.py $n 2>&1 | grep Collected
    done
    # instructions per delivery = (second - first) / (200 * MEMBERS)

Environment: MEMBERS (100), SIZE of the content (64).
"""

from __future__ import annotations

import os
import select
import socket
import sys

from twisted.internet import reactor

from relay.server.factory import RelayConfig, RelayFactory
from relay.wire import MessageType, encode_json

MEMBERS = int(os.environ.get("MEMBERS", "100"))
SIZE = int(os.environ.get("SIZE", "64"))
# How long the members' sockets are waited on before the reactor turns again.
SETTLE_SECONDS = float(os.environ.get("SETTLE", "0.05"))


def turn_until(done) -> int:
    """Turn the reactor until ``done()``; how many turns it took."""
    turns = 0
    while not done():
        reactor.iterate(0)
        turns += 1
        if turns > 10_000:
            raise RuntimeError("the server did not answer")
    return turns


class Client:
    """A plain non-blocking socket and the bytes it has read."""

    def __init__(self, port: int, name: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.received = 0
        self.sock.sendall(
            encode_json(MessageType.HELLO, {"userId": name})
            + encode_json(MessageType.JOIN_ROOM, {"room": "room"})
        )

    def read(self) -> int:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    raise RuntimeError("the server closed a connection")
                self.received += len(data)
        except BlockingIOError:
            pass
        return self.received


def deliver(members: list[Client]) -> int:
    """Turn the reactor until every member has read one more delivery.

    After each turn the members' sockets are waited on (select) before the
    next turn: a loaded kernel may hand loopback bytes over a little later,
    and spinning the reactor meanwhile would count work that is not the
    server's.  How many turns it took.
    """
    goals = {member.sock: member.received for member in members}
    pending = {member.sock: member for member in members}
    turns = 0
    while pending:
        reactor.iterate(0)
        turns += 1
        while pending:
            ready, _, _ = select.select(list(pending), [], [], SETTLE_SECONDS)
            if not ready:
                break
            for sock in ready:
                if pending[sock].read() > goals[sock]:
                    del pending[sock]
        if turns > 1000:
            raise RuntimeError("the server did not deliver")
    return turns


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    # No idle timeout: under callgrind a run outlasts it.
    factory = RelayFactory(RelayConfig(idle_timeout=0), reactor=reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1").getHost().port
    everyone = []
    for index in range(MEMBERS + 1):  # one at a time: the listen backlog is short
        everyone.append(Client(port, f"client-{index}"))
        turn_until(lambda: len(factory.connections) == len(everyone))
    publisher, *members = everyone
    def all_joined() -> bool:
        room = factory.registry.get("room")
        return room is not None and len(room) == len(everyone)

    turn_until(all_joined)
    for _ in range(50):  # settle: the last acks go out
        reactor.iterate(0)
    for client in everyone:
        client.read()
    message = encode_json(MessageType.MESSAGE, {"room": "room", "content": "x" * SIZE})
    turns = 0
    for _ in range(count):
        publisher.sock.sendall(message)
        turns += deliver(members)
    print(f"{turns / count:.2f} reactor turns per message")


if __name__ == "__main__":
    main()
