"""What the presence extension costs a join, and what presence and direct
cost the fan-out path, without sockets.

    python benchmarks/presence_cost.py join [MEMBERS [ROUNDS]]
        A room of MEMBERS (1000) presence-enabled members (WATCH=0: none
        enabled presence); one more connection joins and leaves it ROUNDS
        (200) times, 5 times over.  Prints the best server time per
        join+leave and the frames each join queues for the others.  Under
        callgrind, ROUNDS 20 and 40 give the instructions of 100 join+leave.

    python benchmarks/presence_cost.py fanout [ROUNDS]
        benchmarks/fanout_cost.py's publisher and MEMBERS (10) subscribers,
        every one of them with presence and direct enabled (FEATURES, e.g.
        FEATURES=presence,direct, the default).  Run it under callgrind with
        2 and 4 rounds, as fanout_cost.py says, to compare instruction counts.
"""

from __future__ import annotations

import os
import sys
import time

from twisted.internet.task import Clock

from relay.server.factory import RelayConfig, RelayFactory
from relay.wire import MessageType, encode_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fanout_cost import DiscardingTransport, joined, time_per_message  # noqa: E402

FEATURES = [f for f in os.environ.get("FEATURES", "presence,direct").split(",") if f]
MEMBERS = int(os.environ.get("MEMBERS", "10"))


def join_cost(members: int, rounds: int = 200) -> None:
    factory = RelayFactory(RelayConfig(join_rate=None, presence_events_limit=10**9), reactor=Clock())
    for index in range(members):
        joined(factory, f"member-{index}", ["presence"] if os.environ.get("WATCH", "1") != "0" else [])
    newcomer = factory.buildProtocol(None)
    newcomer.makeConnection(DiscardingTransport())
    newcomer.dataReceived(encode_json(MessageType.HELLO, {"userId": "newcomer"}))
    join = encode_json(MessageType.JOIN_ROOM, {"room": "room"})
    leave = encode_json(MessageType.LEAVE_ROOM, {"room": "room"})
    before = factory.stats.frames_out
    newcomer.dataReceived(join)
    frames_per_join = factory.stats.frames_out - before - 1  # less the joiner's own ack
    newcomer.dataReceived(leave)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(rounds):
            newcomer.dataReceived(join)
            newcomer.dataReceived(leave)
        best = min(best, time.perf_counter() - started)
    print(f"{members} members: {best / rounds * 1e6:.1f} us per join+leave, {frames_per_join} events per join")


def fanout(rounds: int) -> None:
    factory = RelayFactory(RelayConfig(), reactor=Clock())
    publisher = joined(factory, "publisher", FEATURES)
    for index in range(MEMBERS):
        joined(factory, f"subscriber-{index}", FEATURES)
    print(f"{time_per_message(publisher, rounds) * 1e6:.3f} us per message")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "join"
    if what == "join":
        join_cost(int(sys.argv[2]) if len(sys.argv) > 2 else 1000, int(sys.argv[3]) if len(sys.argv) > 3 else 200)
    else:
        fanout(int(sys.argv[2]) if len(sys.argv) > 2 else 30)
