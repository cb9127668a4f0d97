"""relay-chaos: misbehaving clients against any Relay v1 server, and a checker.

It keeps a set of *stable* clients (members that read everything and
publishers that publish at a steady rate) connected for the whole run, and
around them ``--clients`` *disruptive* ones that each play a role and, when
they are done, make room for a new one::

    rst       joins, publishes a little, then resets its connection (RST)
    leave     joins, publishes a little, leaves and closes gracefully
    slow      joins a busy room and reads in short bursts
    never     joins a busy room and never reads (a slow consumer to cut off)
    garbage   sends bytes that are not Relay (expects a fatal ERROR)
    oversize  sends a header announcing a frame past the limit
    trickle   sends a frame one byte every few seconds (expects a timeout)
    churn     joins and leaves rooms in a loop
    publisher publishes as fast as its window allows, then leaves

At the end it checks the server's invariants through the protocol:

- every message a stable publisher had acknowledged (a heartbeat echoed
  after it with no ERROR for it in between) reached every stable member of
  its room once, in publish order, and nothing arrived that was not sent;
- no stable client was disconnected;
- a fresh JOIN of each room reports exactly the members still in it;
- with ``--metrics URL``, the server's connection gauge agrees, and with
  ``--server-pid``, its RSS did not drift more than ``--max-rss-drift`` %.

It prints a progress line every second (stderr), then a summary table, or
one JSON object with ``--json``; it exits 1 when an invariant is broken and
2 when it cannot connect.  Presets stand for the usual runs::

    relay-chaos --preset chaos          # every role at once
    relay-chaos --preset load           # many publishers and members, no disruption
    relay-chaos --preset fragmentation  # every client's bytes split and coalesced at random
    relay-chaos --preset soak --duration 600 --server-pid PID   # RSS drift
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import struct
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.protocol import Protocol

from relay.rlimits import raise_open_file_limit
from relay.wire import (
    Decoder,
    Flags,
    MessageType,
    ProtocolError,
    encode,
    encode_json,
    loads,
)

DEFAULT_ENDPOINT = "tcp:host=127.0.0.1:port=4000"
ROLES = ("rst", "leave", "slow", "never", "garbage", "oversize", "trickle", "churn", "publisher")
PRESETS: dict[str, dict[str, Any]] = {
    "chaos": {
        "members": 8, "publishers": 4, "clients": 40, "rooms": 4, "rate": 20.0, "duration": 20.0,
        "mix": "rst=3,leave=3,slow=1,never=1,garbage=2,oversize=1,trickle=1,churn=2,publisher=2",
    },
    "load": {
        "members": 40, "publishers": 20, "clients": 0, "rooms": 4, "rate": 50.0, "duration": 20.0,
        "mix": "",
    },
    "fragmentation": {
        "members": 8, "publishers": 8, "clients": 8, "rooms": 2, "rate": 50.0, "duration": 20.0,
        "mix": "leave=1,rst=1", "fragment": True,
    },
    "soak": {
        "members": 16, "publishers": 8, "clients": 40, "rooms": 8, "rate": 20.0, "duration": 600.0,
        "mix": "rst=3,leave=3,slow=1,never=1,garbage=2,oversize=1,trickle=1,churn=2,publisher=2",
        # The allocator's high-water marks settle over the first minutes.
        "warmup": 180.0,
    },
}
PROGRESS_INTERVAL = 1.0
# How long the checker waits for the server to notice the last disruptive
# clients are gone, for exact member counts.
SETTLE_SECONDS = 10.0
_LINGER_RESET = struct.pack("ii", 1, 0)


def sleep(clock: Any, seconds: float) -> defer.Deferred[None]:
    return task.deferLater(clock, max(0.0, seconds), lambda: None)


@dataclass
class Stats:
    """What the run did, for the progress line and the summary."""

    started: dict[str, int] = field(default_factory=collections.Counter)
    ended: dict[str, int] = field(default_factory=collections.Counter)
    errors: dict[str, int] = field(default_factory=collections.Counter)
    connect_failures: int = 0
    published: int = 0
    acknowledged: int = 0
    refused: int = 0
    delivered: int = 0
    latencies: list[float] = field(default_factory=list)
    rss_samples: list[tuple[float, int]] = field(default_factory=list)


class ChaosConnection(Protocol):
    """One raw Relay connection: requests matched by id, heartbeat syncs, deliveries."""

    def __init__(self, run: ChaosRun, role: str, user_id: str) -> None:
        self.run = run
        self.role = role
        self.user_id = user_id
        self.decoder = Decoder(max_frame_size=2**31, known_types=frozenset(range(256)))
        self.pending: dict[Any, defer.Deferred[tuple[int, Any]]] = {}
        self.syncs: dict[bytes, defer.Deferred[None]] = {}
        self.errors: list[dict[str, Any]] = []
        self.fatal: str | None = None
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.connected = False
        self.rooms: set[str] = set()
        self.on_delivery: Callable[[dict[str, Any]], None] | None = None
        self._next_id = 0
        self._fragment_buffer = b""
        self.heartbeat_interval = 30.0

    # Wiring

    def connectionMade(self) -> None:
        self.connected = True

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = False
        for waiter in list(self.pending.values()) + list(self.syncs.values()):
            if not waiter.called:
                waiter.errback(ConnectionError(self.fatal or "connection closed"))
        self.pending.clear()
        self.syncs.clear()
        if not self.closed.called:
            self.closed.callback(None)

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = list(self.decoder.feed(data))
        except ProtocolError as error:
            self.run.stats.errors[f"client-decoder:{error.code}"] += 1
            self.transport.abortConnection()
            return
        for frame in frames:
            self.frame_received(frame.type, frame.flags, frame.payload)

    def frame_received(self, type_: int, flags: int, payload: bytes) -> None:
        if type_ == MessageType.HEARTBEAT:
            waiter = self.syncs.pop(payload, None)
            if waiter is not None:
                waiter.callback(None)
            return
        if not flags & Flags.JSON:
            if type_ == MessageType.MESSAGE:
                self.run.stats.delivered += 1
            return
        body = loads(payload)
        if type_ == MessageType.MESSAGE:
            self.run.stats.delivered += 1
            if self.on_delivery is not None:
                self.on_delivery(body)
            return
        if type_ == MessageType.ERROR:
            self.run.stats.errors[body.get("code", "?")] += 1
            self.errors.append(body)
            if body.get("fatal"):
                self.fatal = body.get("code")
        waiter = self.pending.pop(body.get("id"), None)
        if waiter is not None:
            waiter.callback((type_, body))

    # Sending

    def send(self, data: bytes) -> None:
        if not self.connected:
            return
        if self.run.fragment:
            self._fragment_buffer += data
            self._write_fragments()
        else:
            self.transport.write(data)

    def _write_fragments(self) -> None:
        """Write what is buffered in random pieces: some split, some coalesced."""
        rng = self.run.rng
        while self._fragment_buffer and self.connected:
            size = rng.choice((1, 2, 3, 7, 64, 1000, len(self._fragment_buffer)))
            piece, self._fragment_buffer = self._fragment_buffer[:size], self._fragment_buffer[size:]
            self.transport.write(piece)

    def request(self, type_: MessageType, body: dict[str, Any]) -> defer.Deferred[tuple[int, Any]]:
        if not self.connected:
            return defer.fail(ConnectionError(self.fatal or "connection closed"))
        self._next_id += 1
        body = dict(body, id=self._next_id)
        waiter: defer.Deferred[tuple[int, Any]] = defer.Deferred()
        self.pending[self._next_id] = waiter
        self.send(encode_json(type_, body))
        return waiter

    async def hello(self) -> None:
        type_, body = await self.request(MessageType.HELLO, {"userId": self.user_id})
        if type_ != MessageType.HELLO:
            raise ConnectionError(f"HELLO refused: {body}")
        self.heartbeat_interval = float(body.get("heartbeatInterval") or 30)

    def keep_alive(self) -> None:
        """Heartbeat at the interval the server asked for, as a well-behaved client does."""
        beat = task.LoopingCall(lambda: self.send(encode(MessageType.HEARTBEAT)))
        beat.clock = self.run.clock
        beat.start(self.heartbeat_interval, now=False)
        self.closed.addBoth(lambda _: beat.running and beat.stop())

    async def join(self, room: str) -> dict[str, Any]:
        """Join ``room``, waiting out a join rate limit."""
        while True:
            type_, body = await self.request(MessageType.JOIN_ROOM, {"room": room})
            if type_ == MessageType.JOIN_ROOM:
                self.rooms.add(room)
                return body
            if body.get("code") == "RATE_LIMITED" and not body.get("fatal"):
                await sleep(self.run.clock, body.get("retryAfter", 100) / 1000)
                continue
            raise ConnectionError(f"JOIN refused: {body}")

    async def leave(self, room: str) -> None:
        await self.request(MessageType.LEAVE_ROOM, {"room": room})
        self.rooms.discard(room)

    def sync(self) -> defer.Deferred[None]:
        """A Deferred that fires once the server has handled everything sent so far."""
        if not self.connected:
            return defer.fail(ConnectionError(self.fatal or "connection closed"))
        token = uuid.uuid4().hex.encode()
        waiter: defer.Deferred[None] = defer.Deferred()
        self.syncs[token] = waiter
        self.send(encode(MessageType.HEARTBEAT, Flags.BINARY, token))
        return waiter

    def reset(self) -> None:
        """Close with an RST, as a crashed client or a dropped link would."""
        if not self.connected:
            return
        handle = getattr(self.transport, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            try:
                handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self.transport.abortConnection()


class Member:
    """A stable member: reads everything, remembers every delivery from a stable publisher."""

    def __init__(self, connection: ChaosConnection, publishers: set[str], clock: Any) -> None:
        self.connection = connection
        self.publishers = publishers
        self.clock = clock
        # (room, publisher) -> the sequence numbers delivered, in arrival order.
        self.received: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
        connection.on_delivery = self.delivered

    def delivered(self, body: dict[str, Any]) -> None:
        sender = body.get("from")
        content = body.get("content")
        if sender in self.publishers and isinstance(content, dict):
            self.received[(body.get("room"), sender)].append(content.get("n"))
            sent = content.get("t")
            if isinstance(sent, float):
                self.connection.run.stats.latencies.append(self.clock.seconds() - sent)


class Publisher:
    """A stable publisher: numbered messages to one room, acknowledged by heartbeat syncs."""

    def __init__(self, connection: ChaosConnection, room: str) -> None:
        self.connection = connection
        self.room = room
        self.sent: list[int] = []
        self.acknowledged: list[int] = []
        self._unconfirmed: list[int] = []
        self._next = 0

    def publish(self, clock: Any) -> None:
        self._next += 1
        number = self._next
        body = {"room": self.room, "content": {"n": number, "t": clock.seconds()}, "id": f"m{number}"}
        self.connection.send(encode_json(MessageType.MESSAGE, body))
        self.sent.append(number)
        self._unconfirmed.append(number)
        self.connection.run.stats.published += 1

    async def confirm(self) -> None:
        """Acknowledge what was sent before now, unless the server refused it."""
        batch, self._unconfirmed = self._unconfirmed, []
        errors_before = len(self.connection.errors)
        await self.connection.sync()
        refused = {
            error.get("id") for error in self.connection.errors[errors_before:] if error.get("id")
        }
        for number in batch:
            if f"m{number}" in refused:
                self.connection.run.stats.refused += 1
            else:
                self.acknowledged.append(number)
                self.connection.run.stats.acknowledged += 1


class ChaosRun:
    """One run: stable clients, disruptive slots, and the checks at the end."""

    def __init__(self, clock: Any, options: argparse.Namespace) -> None:
        self.clock = clock
        self.options = options
        self.rng = random.Random(options.seed)
        self.fragment = options.fragment
        self.run_id = uuid.uuid4().hex[:6]
        self.rooms = [f"chaos-{self.run_id}-{number}" for number in range(options.rooms)]
        self.stats = Stats()
        self.running = True
        self.members: list[Member] = []
        self.publishers: list[Publisher] = []
        self.disruptive: set[ChaosConnection] = set()
        self.invariants: dict[str, tuple[bool, str]] = {}
        self._counter = 0
        self._mix = parse_mix(options.mix)

    # Connections

    async def connect(self, role: str) -> ChaosConnection:
        self._counter += 1
        user_id = f"{role}-{self.run_id}-{self._counter}"
        endpoint = clientFromString(self.clock, self.options.endpoint)
        connection = await connectProtocol(endpoint, ChaosConnection(self, role, user_id))
        self.stats.started[role] += 1
        connection.closed.addCallback(lambda _: self._ended(connection))
        return connection

    def _ended(self, connection: ChaosConnection) -> None:
        self.stats.ended[f"{connection.role}:{connection.fatal or 'closed'}"] += 1

    # The run

    async def run(self) -> int:
        options = self.options
        try:
            await self.start_stable()
        except Exception as error:  # noqa: BLE001 - reported, then exit 2
            print(f"relay-chaos: cannot start: {error}", file=sys.stderr)
            return 2
        started = self.clock.seconds()
        deadline = started + options.duration
        slots = [defer.ensureDeferred(self.slot(role)) for role in self.slot_roles()]
        pump = defer.ensureDeferred(self.publish_until(deadline))
        progress = task.LoopingCall(self.progress, started)
        progress.clock = self.clock
        progress.start(PROGRESS_INTERVAL, now=False)
        sampler = None
        if options.server_pid:
            sampler = task.LoopingCall(self.sample_rss, started)
            sampler.clock = self.clock
            sampler.start(1.0)
        await pump
        self.running = False
        for connection in list(self.disruptive):
            connection.reset()
        await defer.DeferredList(slots, consumeErrors=True)
        progress.stop()
        if sampler is not None:
            sampler.stop()
        if not options.quiet:
            print(file=sys.stderr)
        await self.check()
        await self.close()
        self.report()
        return 0 if all(ok for ok, _ in self.invariants.values()) else 1

    async def close(self) -> None:
        """Leave the server as we found it: close every connection still open."""
        connections = [c for c in self.stable_connections() if c.connected]
        for connection in connections:
            connection.transport.loseConnection()
        await defer.DeferredList([c.closed for c in connections], consumeErrors=True)

    async def start_stable(self) -> None:
        options = self.options
        for number in range(options.publishers):
            connection = await self.connect("stable-publisher")
            await connection.hello()
            room = self.rooms[number % len(self.rooms)]
            await connection.join(room)
            connection.keep_alive()
            self.publishers.append(Publisher(connection, room))
        names = {publisher.connection.user_id for publisher in self.publishers}
        for _ in range(options.members):
            connection = await self.connect("stable-member")
            await connection.hello()
            for room in self.rooms:
                await connection.join(room)
            connection.keep_alive()
            self.members.append(Member(connection, names, self.clock))

    async def publish_until(self, deadline: float) -> None:
        """Publish at ``--rate`` per stable publisher, confirming every tick."""
        interval = 0.05
        per_tick = self.options.rate * interval
        owed = 0.0
        while self.clock.seconds() < deadline:
            owed += per_tick
            count, owed = int(owed), owed - int(owed)
            confirms = []
            for publisher in self.publishers:
                if publisher.connection.connected:
                    for _ in range(count):
                        publisher.publish(self.clock)
                    confirms.append(defer.ensureDeferred(publisher.confirm()))
            await defer.DeferredList(confirms, consumeErrors=True)
            await sleep(self.clock, interval)

    def slot_roles(self) -> list[str]:
        roles = [role for role, weight in self._mix.items() for _ in range(weight)]
        if not roles:
            return []
        return [roles[number % len(roles)] for number in range(self.options.clients)]

    async def slot(self, role: str) -> None:
        """Keep one disruptive client of ``role`` going until the run ends."""
        while self.running:
            try:
                connection = await self.connect(role)
            except Exception:  # noqa: BLE001 - counted; the server may be refusing
                self.stats.connect_failures += 1
                await sleep(self.clock, 0.2)
                continue
            self.disruptive.add(connection)
            try:
                if self.running:
                    await BEHAVIOURS[role](self, connection)
            except Exception:  # noqa: BLE001 - a disruptive client may die any way
                pass
            finally:
                if connection.connected:
                    await _closed_or_timeout(self, connection, 2.0 if self.running else 0.0)
                self.disruptive.discard(connection)

    def busy_room(self) -> str:
        return self.rng.choice(self.rooms)

    # Checks

    async def check(self) -> None:
        for publisher in self.publishers:
            if publisher.connection.connected:
                try:
                    await publisher.confirm()
                except ConnectionError:
                    pass
        for member in self.members:
            if member.connection.connected:
                try:
                    await member.connection.sync()
                except ConnectionError:
                    pass
        self.check_stable_connected()
        self.check_deliveries()
        await self.check_member_counts()
        if self.options.metrics:
            await self.check_metrics()
        if self.options.server_pid:
            self.check_rss()

    def check_stable_connected(self) -> None:
        lost = [c.user_id for c in self.stable_connections() if not c.connected]
        self.invariants["stable clients stayed connected"] = (not lost, f"lost: {lost[:5]}" if lost else "")

    def stable_connections(self) -> list[ChaosConnection]:
        return [p.connection for p in self.publishers] + [m.connection for m in self.members]

    def check_deliveries(self) -> None:
        problems = []
        for member in self.members:
            for publisher in self.publishers:
                key = (publisher.room, publisher.connection.user_id)
                got = member.received.get(key, [])
                problems.extend(self.delivery_problems(member, publisher, got))
        acknowledged = sum(len(p.acknowledged) for p in self.publishers)
        self.invariants["acknowledged messages delivered once, in order"] = (
            not problems,
            "; ".join(problems[:5]) if problems else f"{acknowledged} acknowledged x {len(self.members)} members",
        )

    @staticmethod
    def delivery_problems(member: Member, publisher: Publisher, got: list[int]) -> list[str]:
        who = f"{member.connection.user_id} from {publisher.connection.user_id}"
        problems = []
        if got != sorted(got):
            problems.append(f"{who}: out of order")
        if len(set(got)) != len(got):
            problems.append(f"{who}: duplicates")
        sent = set(publisher.sent)
        if not set(got) <= sent:
            problems.append(f"{who}: never sent {sorted(set(got) - sent)[:3]}")
        missing = set(publisher.acknowledged) - set(got)
        if missing:
            problems.append(f"{who}: {len(missing)} acknowledged not delivered, e.g. {sorted(missing)[:3]}")
        return problems

    def expected_members(self, room: str) -> int:
        stable = sum(1 for c in self.stable_connections() if c.connected and room in c.rooms)
        return stable + 1  # the checker itself

    async def check_member_counts(self) -> None:
        problems = []
        try:
            checker = await self.connect("checker")
            await checker.hello()
        except Exception as error:  # noqa: BLE001
            self.invariants["fresh JOIN gives exact member counts"] = (False, f"cannot connect: {error}")
            return
        deadline = self.clock.seconds() + SETTLE_SECONDS
        for room in self.rooms:
            expected = self.expected_members(room)
            while True:
                members = (await checker.join(room))["members"]
                if members == expected or self.clock.seconds() > deadline:
                    break
                await checker.leave(room)
                await sleep(self.clock, 0.1)  # the server may still be closing disruptive ones
            if members != expected:
                problems.append(f"{room}: {members} members, expected {expected}")
        checker.transport.loseConnection()
        await checker.closed
        self.invariants["fresh JOIN gives exact member counts"] = (not problems, "; ".join(problems))

    async def check_metrics(self) -> None:
        from twisted.web.client import Agent, readBody

        try:
            response = await Agent(self.clock).request(b"GET", self.options.metrics.encode())
            text = (await readBody(response)).decode()
        except Exception as error:  # noqa: BLE001
            self.invariants["metrics agree"] = (False, f"cannot read {self.options.metrics}: {error}")
            return
        values = parse_metrics(text)
        gauge = next((values[name] for name in ("relay_connections", "relay_connections_current") if name in values), None)
        if gauge is None:
            self.invariants["metrics agree"] = (True, "no relay_connections gauge to compare")
            return
        open_now = sum(1 for c in self.stable_connections() if c.connected)
        ok = gauge >= open_now
        self.invariants["metrics agree"] = (ok, f"relay_connections {gauge:g}, {open_now} stable clients open")

    def sample_rss(self, started: float) -> None:
        try:
            with open(f"/proc/{self.options.server_pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        self.stats.rss_samples.append((self.clock.seconds() - started, int(line.split()[1])))
        except OSError:
            pass

    def rss_drift(self) -> tuple[int, int, float] | None:
        """RSS (KiB) right after the warm-up and at the end, and the drift between, in %."""
        samples = self.stats.rss_samples
        after = [rss for at, rss in samples if at >= self.options.warmup]
        if len(after) < 2:
            return None
        return after[0], after[-1], 100.0 * (after[-1] - after[0]) / after[0]

    def check_rss(self) -> None:
        drift = self.rss_drift()
        if drift is None:
            self.invariants["server RSS drift"] = (False, "not enough samples after the warm-up")
            return
        start, end, percent = drift
        limit = self.options.max_rss_drift
        self.invariants["server RSS drift"] = (
            limit is None or percent < limit,
            f"{start} KiB -> {end} KiB ({percent:+.2f} %)" + (f", limit {limit} %" if limit is not None else ""),
        )

    # Output

    def progress(self, started: float) -> None:
        if self.options.quiet:
            return
        stats = self.stats
        open_now = len(self.disruptive) + sum(1 for c in self.stable_connections() if c.connected)
        line = (
            f"\r{self.clock.seconds() - started:6.1f}s  open {open_now:4d}  "
            f"clients {sum(stats.started.values()):6d}  published {stats.published:7d}  "
            f"acked {stats.acknowledged:7d}  delivered {stats.delivered:8d}  errors {sum(stats.errors.values()):6d}"
        )
        if stats.rss_samples:
            line += f"  rss {stats.rss_samples[-1][1] // 1024} MiB"
        print(line, end="", file=sys.stderr, flush=True)

    def summary(self) -> dict[str, Any]:
        stats = self.stats
        latencies = sorted(stats.latencies)
        result: dict[str, Any] = {
            "preset": self.options.preset,
            "duration": self.options.duration,
            "clients_started": dict(stats.started),
            "clients_ended": dict(stats.ended),
            "connect_failures": stats.connect_failures,
            "errors_received": dict(stats.errors),
            "published": stats.published,
            "acknowledged": stats.acknowledged,
            "refused": stats.refused,
            "delivered": stats.delivered,
            "invariants": {name: {"ok": ok, "detail": detail} for name, (ok, detail) in self.invariants.items()},
            "ok": all(ok for ok, _ in self.invariants.values()),
        }
        if latencies:
            result["latency_ms"] = {
                "p50": round(1000 * latencies[len(latencies) // 2], 2),
                "p99": round(1000 * latencies[int(len(latencies) * 0.99)], 2),
                "max": round(1000 * latencies[-1], 2),
            }
        drift = self.rss_drift()
        if drift is not None:
            result["rss_kib"] = {
                "after_warmup": drift[0],
                "end": drift[1],
                "drift_percent": round(drift[2], 3),
                # One sample every ten seconds, to see the curve.
                "series": [(round(at), rss) for at, rss in stats.rss_samples[::10]],
            }
        return result

    def report(self) -> None:
        summary = self.summary()
        if self.options.json:
            print(json.dumps(summary))
            return
        rows = [
            ("clients started", sum(summary["clients_started"].values())),
            ("published / acknowledged / refused", f"{summary['published']} / {summary['acknowledged']} / {summary['refused']}"),
            ("delivered", summary["delivered"]),
            ("connect failures", summary["connect_failures"]),
        ]
        if "latency_ms" in summary:
            latency = summary["latency_ms"]
            rows.append(("delivery latency p50 / p99 / max", f"{latency['p50']} / {latency['p99']} / {latency['max']} ms"))
        if "rss_kib" in summary:
            rss = summary["rss_kib"]
            rows.append(("server RSS after warm-up -> end", f"{rss['after_warmup']} -> {rss['end']} KiB ({rss['drift_percent']:+.2f} %)"))
        rows.extend((f"ended {kind}", count) for kind, count in sorted(summary["clients_ended"].items()))
        rows.extend((f"ERROR {code}", count) for code, count in sorted(summary["errors_received"].items()))
        for name, (ok, detail) in self.invariants.items():
            rows.append((f"{'PASS' if ok else 'FAIL'} {name}", detail))
        width = max(len(label) for label, _ in rows)
        for label, value in rows:
            print(f"{label.ljust(width)}  {value}")


# Disruptive behaviours: each gets a fresh connection and ends it somehow.


async def behave_rst(run: ChaosRun, connection: ChaosConnection) -> None:
    await connection.hello()
    await connection.join(run.busy_room())
    for number in range(run.rng.randint(0, 5)):
        connection.send(encode_json(MessageType.MESSAGE, {"room": next(iter(connection.rooms)), "content": number}))
    await sleep(run.clock, run.rng.uniform(0.05, 1.5))
    connection.reset()


async def behave_leave(run: ChaosRun, connection: ChaosConnection) -> None:
    await connection.hello()
    room = run.busy_room()
    await connection.join(room)
    connection.send(encode_json(MessageType.MESSAGE, {"room": room, "content": "bye"}))
    await sleep(run.clock, run.rng.uniform(0.05, 1.5))
    await connection.leave(room)
    connection.transport.loseConnection()
    await connection.closed


async def behave_slow(run: ChaosRun, connection: ChaosConnection) -> None:
    await connection.hello()
    await connection.join(run.busy_room())
    for _ in range(run.rng.randint(3, 10)):
        connection.transport.pauseProducing()
        await sleep(run.clock, run.rng.uniform(0.2, 1.0))
        connection.transport.resumeProducing()
        await sleep(run.clock, 0.02)
        if not connection.connected:
            return
    connection.transport.loseConnection()


async def behave_never(run: ChaosRun, connection: ChaosConnection) -> None:
    await connection.hello()
    await connection.join(run.busy_room())
    connection.transport.pauseProducing()
    # It keeps talking, so only its backlog can get it cut off.
    for _ in range(int(run.rng.uniform(2, 8) / 0.5)):
        if not connection.connected:
            return
        connection.send(encode(MessageType.HEARTBEAT))
        await sleep(run.clock, 0.5)
    connection.reset()


async def behave_garbage(run: ChaosRun, connection: ChaosConnection) -> None:
    choices = [
        bytes(run.rng.randrange(256) for _ in range(run.rng.randint(1, 64))),
        b"\x00\x00\x00\x02\x01\x05\x00",  # length below 3
        b"\x00\x00\x00\x03\x02\x05\x00",  # version 2
        b"\x00\x00\x00\x03\x01\x7f\x00",  # unknown type
        b"\x00\x00\x00\x05\x01\x02\x01{[",  # not JSON
        b"\x00\x00\x00\x03\x01\x05\xf8",  # reserved flags
        b"GET / HTTP/1.1\r\n\r\n",
    ]
    await connection.hello()
    connection.send(run.rng.choice(choices))
    await _closed_or_timeout(run, connection, 5.0)


async def behave_oversize(run: ChaosRun, connection: ChaosConnection) -> None:
    connection.send(struct.pack("!IBBB", 0x7FFFFFFF, 1, MessageType.MESSAGE, Flags.JSON))
    await _closed_or_timeout(run, connection, 5.0)


async def behave_trickle(run: ChaosRun, connection: ChaosConnection) -> None:
    frame = encode_json(MessageType.HELLO, {"userId": connection.user_id})
    for byte in frame:
        if not connection.connected or not run.running:
            return
        connection.transport.write(bytes([byte]))
        await sleep(run.clock, run.options.trickle_interval)


async def behave_churn(run: ChaosRun, connection: ChaosConnection) -> None:
    await connection.hello()
    for _ in range(run.rng.randint(5, 40)):
        if not run.running:
            break
        room = run.busy_room()
        await connection.join(room)
        await connection.leave(room)
    connection.transport.loseConnection()


async def behave_publisher(run: ChaosRun, connection: ChaosConnection) -> None:
    await connection.hello()
    room = run.busy_room()
    await connection.join(room)
    for number in range(run.rng.randint(10, 200)):
        connection.send(encode_json(MessageType.MESSAGE, {"room": room, "content": {"burst": number}}))
        if number % 20 == 19:
            await connection.sync()
    await connection.sync()
    connection.transport.loseConnection()


async def _closed_or_timeout(run: ChaosRun, connection: ChaosConnection, seconds: float) -> None:
    timeout = run.clock.callLater(seconds, connection.reset)
    await connection.closed
    if timeout.active():
        timeout.cancel()


BEHAVIOURS: dict[str, Callable[[ChaosRun, ChaosConnection], Awaitable[None]]] = {
    "rst": behave_rst,
    "leave": behave_leave,
    "slow": behave_slow,
    "never": behave_never,
    "garbage": behave_garbage,
    "oversize": behave_oversize,
    "trickle": behave_trickle,
    "churn": behave_churn,
    "publisher": behave_publisher,
}


def parse_mix(mix: str) -> dict[str, int]:
    """``rst=3,leave=2`` as role weights; unknown roles are an error."""
    weights: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in mix.split(","))):
        role, _, weight = part.partition("=")
        if role not in BEHAVIOURS:
            raise argparse.ArgumentTypeError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        weights[role] = int(weight or 1)
    return weights


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: the sum over labels of each sample name."""
    values: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_and_labels, _, value = line.rpartition(" ")
        name = name_and_labels.split("{", 1)[0]
        try:
            values[name] += float(value)
        except ValueError:
            continue
    return dict(values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay-chaos",
        description="Misbehaving clients against a Relay server, and a check of its invariants.",
    )
    add = parser.add_argument
    add("--endpoint", default=DEFAULT_ENDPOINT, help=f"Twisted client endpoint [default: {DEFAULT_ENDPOINT}]")
    add("--preset", choices=sorted(PRESETS), default="chaos", help="a scenario's defaults [default: chaos]")
    add("--duration", type=float, help="seconds of chaos")
    add("--members", type=int, help="stable members (they join every room and read everything)")
    add("--publishers", type=int, help="stable publishers (one room each)")
    add("--clients", type=int, help="disruptive clients at any time")
    add("--mix", help=f"role weights of the disruptive clients, e.g. rst=3,garbage=1 (roles: {', '.join(ROLES)})")
    add("--rooms", type=int, help="rooms the run uses")
    add("--rate", type=float, help="messages per second per stable publisher")
    add("--fragment", action="store_true", default=None, help="split and coalesce every client's bytes at random")
    add("--trickle-interval", type=float, default=3.0, help="seconds between a trickler's bytes [default: 3]")
    add("--metrics", help="URL of the server's Prometheus /metrics, checked at the end")
    add("--server-pid", type=int, help="the server's process id, to sample its RSS (same machine)")
    add("--warmup", type=float, help="seconds before RSS drift is measured [default: a tenth of the run]")
    add("--max-rss-drift", type=float, help="fail if RSS grows more than this %% after the warm-up")
    add("--seed", type=int, default=None, help="random seed, for a repeatable run")
    add("--json", action="store_true", help="print one JSON object instead of the table")
    add("--quiet", action="store_true", help="no progress line")
    return parser


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    options = build_parser().parse_args(argv)
    for name, value in PRESETS[options.preset].items():
        if getattr(options, name, None) is None:
            setattr(options, name, value)
    options.fragment = bool(options.fragment)
    if options.warmup is None:
        options.warmup = options.duration / 10
    try:
        parse_mix(options.mix)
    except argparse.ArgumentTypeError as error:
        build_parser().error(str(error))
    if options.rooms < 1:
        build_parser().error("--rooms must be at least 1")
    return options


def main(argv: list[str] | None = None) -> None:
    options = parse_options(argv)
    raise_open_file_limit()

    def run(reactor: Any) -> defer.Deferred[None]:
        started = time.monotonic()

        async def go() -> None:
            code = await ChaosRun(reactor, options).run()
            if not options.quiet and not options.json:
                print(f"relay-chaos: done in {time.monotonic() - started:.1f} s", file=sys.stderr)
            if code:
                raise SystemExit(code)

        return defer.ensureDeferred(go())

    task.react(run)


if __name__ == "__main__":
    main()
