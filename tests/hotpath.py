"""The server's fan-out path in one process, for cost comparisons that load cannot blur.

Real ``RelayProtocol`` connections on ``StringTransport``s, set up as
relay-bench's s1 (100 subscribers, 1 publisher, 1 room) or s3 (10 rooms of
10 subscribers and 1 publisher); each publisher then hands the server reads
of 50 messages.  With ``--auth`` every connection logs in with a JWT first.
Run it under callgrind twice with different ``--reads`` and divide the
difference in instructions by the difference in deliveries: setup cancels
out, and the figure does not depend on what else the machine runs::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m tests.hotpath s3 --auth --reads 10

Not a test (its name keeps pytest and trial from collecting it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jwt
from twisted.internet import task
from twisted.internet.testing import StringTransport

from relay.server.auth import Authenticator, JwtVerifier
from relay.server.factory import RelayConfig, RelayFactory
from relay.server.protocol import RelayProtocol
from relay.wire import MessageType, encode_json

# Fixed, so that runs are comparable instruction for instruction.
SECRET = b"hot-path-secret-" * 4
SCENARIOS = {"s1": (100, 1), "s3": (100, 10)}
MESSAGES_PER_READ = 50
CONTENT = "x" * 64


def build(auth: bool, subscribers: int, rooms: int) -> tuple[list[RelayProtocol], list[StringTransport]]:
    """The publishers and the subscribers' transports, every connection joined."""
    clock = task.Clock()
    clock.advance(1_000_000)
    authenticator = None
    if auth:
        directory = tempfile.mkdtemp()
        key = os.path.join(directory, "secret.key")
        with open(key, "wb") as file:
            file.write(SECRET)
        authenticator = Authenticator(jwt_verifier=JwtVerifier(key, leeway=0))
    factory = RelayFactory(RelayConfig(idle_timeout=0), reactor=clock, auth=authenticator)

    def connect(name: str, room: str) -> tuple[RelayProtocol, StringTransport]:
        protocol, transport = factory.buildProtocol(None), StringTransport()
        protocol.makeConnection(transport)
        if auth:
            claims = {"sub": name, "rooms": ["bench-*"], "exp": int(clock.seconds()) + 86400}
            hello = {"token": jwt.encode(claims, SECRET, algorithm="HS256")}
        else:
            hello = {"userId": name}
        protocol.dataReceived(encode_json(MessageType.HELLO, hello)
                              + encode_json(MessageType.JOIN_ROOM, {"room": room}))
        transport.clear()
        return protocol, transport

    subscribers_ = [connect(f"bench-sub-{i}", f"bench-{i % rooms}")[1] for i in range(subscribers)]
    publishers = [connect(f"bench-pub-{i}", f"bench-{i}")[0] for i in range(rooms)]
    return publishers, subscribers_


def run(scenario: str, auth: bool, reads: int) -> tuple[int, float]:
    """Deliveries made and CPU seconds spent."""
    subscribers, rooms = SCENARIOS[scenario]
    publishers, transports = build(auth, subscribers, rooms)
    reads_of = [
        b"".join(encode_json(MessageType.MESSAGE, {"room": f"bench-{i}", "content": CONTENT})
                 for _ in range(MESSAGES_PER_READ))
        for i in range(rooms)
    ]
    started = time.process_time()
    for _ in range(reads):
        for publisher, data in zip(publishers, reads_of):
            publisher.dataReceived(data)
        for transport in transports:
            transport.clear()
    return reads * MESSAGES_PER_READ * subscribers, time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--auth", action="store_true", help="log every connection in with a JWT")
    parser.add_argument("--reads", type=int, default=300, help="reads per publisher [%(default)s]")
    options = parser.parse_args()
    deliveries, seconds = run(options.scenario, options.auth, options.reads)
    rate = f", {deliveries / seconds:,.0f}/s" if seconds > 0 else ""
    print(f"{options.scenario} auth={options.auth}: {deliveries} deliveries in {seconds:.3f} s CPU{rate}")


if __name__ == "__main__":
    main()
