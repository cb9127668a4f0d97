"""Limits and abuse resistance, one connection at a time (SPEC section 10).

StringTransport for the wire and a Clock for time; the limits met over real
sockets and a real server are in test_limits_integration.py.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial import unittest

from relay.server.factory import RelayConfig, RelayFactory
from relay.server.limits import (
    FILE_HEADROOM,
    Strikes,
    TokenBucket,
    address_group,
    clip,
    default_max_connections,
    parse_rate,
    parse_size,
)
from relay.server.protocol import RelayProtocol, State
from relay.server.rooms import Room
from relay.server.tap import DEFAULT_BACKLOG, with_backlog
from relay.wire import ErrorCode, Flags, MessageType, encode, encode_binary_message, encode_json
from tests.support import StringConnection

HEARTBEAT = encode(MessageType.HEARTBEAT)


def publish(room: str, content: Any, **fields: Any) -> bytes:
    return encode_json(MessageType.MESSAGE, {"room": room, "content": content, **fields})


class LimitsTestCase(unittest.TestCase):
    config = RelayConfig()

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.factory = RelayFactory(self.config, reactor=self.clock)

    def peer(self, transport: StringTransport | None = None) -> StringConnection:
        return StringConnection(self.factory, transport)

    def joined(self, room: str = "r") -> StringConnection:
        peer = self.peer()
        peer.send_json(MessageType.JOIN_ROOM, {"room": room})
        self.assertEqual(peer.only_reply()[1]["status"], "joined")
        return peer

    def error_of(self, reply: tuple[int, Any]) -> dict[str, Any]:
        type_, body = reply
        self.assertEqual(type_, MessageType.ERROR, body)
        return body


class OptionValueTests(unittest.TestCase):
    def test_sizes_take_binary_suffixes(self) -> None:
        self.assertEqual(
            [parse_size(v) for v in ("65536", "64KiB", "1MiB", "1mib", "2G", "7B")],
            [65536, 65536, 1 << 20, 1 << 20, 2 << 30, 7],
        )
        self.assertRaises(ValueError, parse_size, "lots")
        self.assertRaises(ValueError, parse_size, "-1")

    def test_rates_are_per_second_or_per_minute(self) -> None:
        self.assertEqual([parse_rate(v) for v in ("100/s", "100", "600/min", "0.5/s")], [100, 100, 10, 0.5])
        self.assertRaises(ValueError, parse_rate, "fast")

    def test_max_connections_default_leaves_headroom_under_the_file_limit(self) -> None:
        self.assertEqual(default_max_connections(20_000), 20_000 - FILE_HEADROOM)
        self.assertEqual(default_max_connections(1_000_000), 50_000)
        self.assertEqual(default_max_connections(None), 50_000)
        self.assertEqual(default_max_connections(10), 1)


class BacklogDescriptionTests(unittest.TestCase):
    def test_backlog_added_to_listeners_that_take_one(self) -> None:
        for description in ("tcp:4000", "tcp:4000:interface=127.0.0.1", "ssl:4443:privateKey=k.pem", "unix:/tmp/s", "relay-tls:1:privateKey=k"):
            self.assertEqual(with_backlog(description), f"{description}:backlog={DEFAULT_BACKLOG}")
        self.assertGreaterEqual(DEFAULT_BACKLOG, 1024)

    def test_a_given_backlog_is_kept(self) -> None:
        self.assertEqual(with_backlog("tcp:4000:backlog=77"), "tcp:4000:backlog=77")
        self.assertEqual(with_backlog("tcp:port=4000:BACKLOG=5"), "tcp:port=4000:BACKLOG=5")

    def test_other_endpoint_types_are_left_alone(self) -> None:
        self.assertEqual(with_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")
        # An escaped colon is part of a value, not a field separator.
        self.assertEqual(with_backlog("unix:/tmp/a\\:backlog=3", 9), "unix:/tmp/a\\:backlog=3:backlog=9")


class TokenBucketTests(unittest.TestCase):
    def test_starts_full_then_refills_at_its_rate(self) -> None:
        bucket = TokenBucket(rate=10, burst=5, now=0.0)
        self.assertEqual([bucket.take(0.0) for _ in range(5)], [0.0] * 5)
        wait = bucket.take(0.0)
        self.assertAlmostEqual(wait, 0.1)
        self.assertAlmostEqual(bucket.take(0.05), 0.05)  # a refusal takes nothing
        self.assertEqual(bucket.take(0.1), 0.0)
        self.assertGreater(bucket.take(0.1), 0.0)

    def test_never_holds_more_than_its_burst(self) -> None:
        bucket = TokenBucket(rate=10, burst=5, now=0.0)
        passed = sum(1 for _ in range(100) if bucket.take(1000.0) == 0.0)
        self.assertEqual(passed, 5)

    def test_a_take_larger_than_the_bucket_passes_once_then_waits(self) -> None:
        bucket = TokenBucket(rate=1000, burst=1000, now=0.0)
        self.assertEqual(bucket.take(0.0, 5000), 0.0)
        self.assertAlmostEqual(bucket.take(0.0, 1), 4.0, places=2)

    def test_strikes_count_within_the_window_only(self) -> None:
        strikes = Strikes(3, window=10.0)
        self.assertEqual([strikes.add(t) for t in (0.0, 5.0, 10.5, 16.0)], [False, False, False, False])
        self.assertTrue(strikes.add(17.0))  # 10.5, 16 and 17 fall within 10 s


class PublishRateTests(LimitsTestCase):
    config = RelayConfig(rate_limit=10, rate_burst=5, rate_strikes=50)

    def test_publishes_past_the_burst_are_dropped_with_retry_after(self) -> None:
        sender, member = self.joined(), self.joined()
        sender.send(b"".join(publish("r", n, id=n) for n in range(7)))
        replies = sender.replies()
        self.assertEqual(len(replies), 2)
        for (type_, body), request_id in zip(replies, (5, 6)):
            self.assertEqual(body["code"], "RATE_LIMITED")
            self.assertIs(body["fatal"], False)
            self.assertEqual(body["id"], request_id)
            self.assertEqual(body["retryAfter"], 100)
        self.assertEqual(member.contents(), [0, 1, 2, 3, 4])
        self.assertFalse(sender.closing)

    def test_the_bucket_refills_on_the_reactor_clock(self) -> None:
        sender, member = self.joined(), self.joined()
        sender.send(b"".join(publish("r", n) for n in range(5)))
        member.received()
        self.clock.advance(0.1)
        sender.send(publish("r", "again") + publish("r", "too soon"))
        self.assertEqual(member.contents(), ["again"])
        self.assertEqual(self.error_of(sender.only_reply())["retryAfter"], 100)

    def test_binary_publishes_count_too(self) -> None:
        sender, member = self.joined(), self.joined()
        binary = encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("r", b"x"))
        sender.send(binary * 6)
        self.assertEqual(len([f for f in member.received() if f.type == MessageType.MESSAGE]), 5)
        self.assertEqual(self.error_of(sender.only_reply())["code"], "RATE_LIMITED")

    def test_a_rate_limit_hit_is_logged_once_and_counted(self) -> None:
        sender = self.joined()
        with capturedLogs() as events:
            sender.send(b"".join(publish("r", n) for n in range(25)))
        logged = [e for e in events if "rate-limited" in e.get("log_format", "")]
        self.assertEqual(len(logged), 1)
        self.assertEqual(self.factory.limits.counters["rate_limited_publish"], 20)


class NoRateOptionTests(LimitsTestCase):
    def test_without_a_rate_option_publishes_skip_the_buckets(self) -> None:
        peer = self.joined()
        self.assertEqual(peer.protocol._handlers[MessageType.MESSAGE], peer.protocol._on_message)
        self.assertIsNone(peer.protocol._limits.publishes)

    def test_with_one_the_limited_handler_is_used(self) -> None:
        factory = RelayFactory(RelayConfig(byte_rate=1000), reactor=self.clock)
        peer = StringConnection(factory)
        self.assertEqual(peer.protocol._handlers[MessageType.MESSAGE], peer.protocol._on_limited_message)


class ByteRateTests(LimitsTestCase):
    config = RelayConfig(byte_rate=1000)

    def test_published_bytes_past_the_rate_are_dropped(self) -> None:
        sender, member = self.joined(), self.joined()
        big = "x" * 600
        sender.send(publish("r", big) + publish("r", big) + publish("r", big))
        # The first two pass (the second into debt), the third waits.
        self.assertEqual(member.contents(), [big, big])
        body = self.error_of(sender.only_reply())
        self.assertEqual(body["code"], "RATE_LIMITED")
        self.assertGreater(body["retryAfter"], 200)
        self.clock.advance(body["retryAfter"] / 1000)
        sender.send(publish("r", "later"))
        self.assertEqual(member.contents(), ["later"])


class JoinRateTests(LimitsTestCase):
    config = RelayConfig(join_rate=2, max_rooms=4)

    def test_joins_past_the_burst_are_refused_and_rejoins_are_free(self) -> None:
        peer = self.peer()
        for number in range(6):  # max_rooms + one second's worth
            peer.send_json(MessageType.JOIN_ROOM, {"room": f"r{number}"})
            peer.send_json(MessageType.LEAVE_ROOM, {"room": f"r{number}"})
        peer.received()
        peer.send_json(MessageType.JOIN_ROOM, {"room": "one-more", "id": "j"})
        body = self.error_of(peer.only_reply())
        self.assertEqual((body["code"], body["fatal"], body["id"], body["retryAfter"]), ("RATE_LIMITED", False, "j", 500))
        self.assertNotIn("one-more", peer.protocol.rooms)
        self.assertNotIn("one-more", self.factory.registry)

    def test_rejoining_a_room_it_is_in_costs_nothing(self) -> None:
        peer = self.peer()
        for _ in range(20):
            peer.send_json(MessageType.JOIN_ROOM, {"room": "same"})
        self.assertEqual({body["status"] for _, body in peer.replies()}, {"joined"})

    def test_the_join_rate_is_on_by_default(self) -> None:
        self.assertEqual(RelayConfig().join_rate, 20.0)


class StrikeTests(LimitsTestCase):
    config = RelayConfig(rate_limit=1, rate_burst=1, rate_strikes=3)

    def test_enough_strikes_within_ten_seconds_close_the_connection(self) -> None:
        sender = self.joined()
        sender.send(publish("r", 0) + publish("r", 1) + publish("r", 2) + publish("r", 3, id="last"))
        replies = sender.replies()
        self.assertEqual([body["fatal"] for _, body in replies], [False, False, True])
        self.assertEqual(replies[-1][1]["code"], "RATE_LIMITED")
        self.assertTrue(sender.closing)
        self.assertEqual(sender.protocol.state, State.CLOSING)
        self.assertEqual(self.factory.limits.counters["rate_strikes"], 1)

    def test_strikes_spread_over_more_than_ten_seconds_do_not(self) -> None:
        sender = self.joined()
        for _ in range(6):
            sender.send(publish("r", 0) + publish("r", 1))  # one passes, one strikes
            self.clock.advance(6)
        self.assertFalse(sender.closing)


class HelloDeadlineTests(LimitsTestCase):
    config = RelayConfig(hello_timeout=10, idle_timeout=60)

    def test_a_silent_connection_is_closed_at_the_hello_timeout(self) -> None:
        peer = self.peer()
        self.clock.advance(9.9)
        self.assertFalse(peer.closing)
        self.clock.advance(0.1)
        body = self.error_of(peer.only_reply())
        self.assertEqual((body["code"], body["fatal"]), ("HEARTBEAT_TIMEOUT", True))
        self.assertTrue(peer.closing)

    def test_trickled_header_bytes_do_not_extend_the_hello_deadline(self) -> None:
        peer = self.peer()
        for byte in HEARTBEAT[:-1]:
            peer.send(bytes([byte]))
            self.clock.advance(1.5)
        self.clock.advance(1.0)
        self.assertEqual(peer.protocol.state, State.CLOSING)
        self.assertEqual(self.error_of(peer.only_reply())["code"], "HEARTBEAT_TIMEOUT")

    def test_the_first_complete_frame_hands_over_to_the_idle_timeout(self) -> None:
        peer = self.peer()
        self.clock.advance(9)
        peer.send(HEARTBEAT)
        peer.received()
        self.clock.advance(59)
        self.assertFalse(peer.closing)
        self.clock.advance(1)
        self.assertIn("60 seconds", self.error_of(peer.only_reply())["message"])

    def test_the_hello_error_is_a_hook(self) -> None:
        class Authenticating(RelayProtocol):
            def hello_timeout_error(self) -> tuple[ErrorCode, str]:
                return ErrorCode.UNAUTHORIZED, "no HELLO with a token"

            def hello_deadline_met(self) -> bool:
                return self._said_hello

        self.factory.protocol = Authenticating
        self.patch(self.factory, "buildProtocol", lambda addr: Authenticating(self.factory))
        peer = self.peer()
        peer.send(HEARTBEAT)  # answered, but does not meet the deadline
        self.clock.advance(10)
        replies = peer.replies()
        self.assertEqual(replies[-1][1]["code"], "UNAUTHORIZED")


class IdleTimeoutCountsFramesTests(LimitsTestCase):
    config = RelayConfig(hello_timeout=10, idle_timeout=10)

    def test_a_trickled_frame_does_not_keep_the_connection_alive(self) -> None:
        peer = self.peer()
        peer.send(HEARTBEAT)
        peer.received()
        for byte in encode_json(MessageType.HEARTBEAT, {"pad": "x" * 20}):
            self.clock.advance(3)
            if peer.closing:
                break
            peer.send(bytes([byte]))
        self.assertTrue(peer.closing)
        self.assertEqual(self.error_of(peer.only_reply())["code"], "HEARTBEAT_TIMEOUT")

    def test_complete_frames_keep_it_alive(self) -> None:
        peer = self.peer()
        for _ in range(10):
            peer.send(HEARTBEAT)
            self.clock.advance(9)
        self.assertFalse(peer.closing)


class NoIdleTimeoutTests(LimitsTestCase):
    config = RelayConfig(hello_timeout=5, idle_timeout=0)

    def test_idle_timeout_zero_keeps_the_hello_deadline_only(self) -> None:
        quiet = self.peer()
        talker = self.peer()
        talker.send(HEARTBEAT)
        self.clock.advance(3600)
        self.assertTrue(quiet.closing)
        self.assertFalse(talker.closing)


class PerAddressTests(LimitsTestCase):
    config = RelayConfig(max_connections_per_ip=2)

    def from_address(self, address: Any) -> StringConnection:
        return self.peer(StringTransport(peerAddress=address))

    def test_one_connection_too_many_from_an_address_is_refused_first_thing(self) -> None:
        first, second = (self.from_address(IPv4Address("TCP", "10.1.2.3", port)) for port in (1, 2))
        third = self.from_address(IPv4Address("TCP", "10.1.2.3", 3))
        other = self.from_address(IPv4Address("TCP", "10.1.2.4", 4))
        (reply,) = third.replies()
        self.assertEqual((reply[1]["code"], reply[1]["fatal"]), ("TOO_MANY_CONNECTIONS", True))
        self.assertTrue(third.closing)
        self.assertIsNone(third.transport.producer)  # refused before any other work
        for peer in (first, second, other):
            self.assertFalse(peer.closing)

    def test_a_closed_connection_frees_its_place(self) -> None:
        address = IPv4Address("TCP", "10.1.2.3", 1)
        first, _ = self.from_address(address), self.from_address(address)
        first.protocol.connectionLost()
        self.assertFalse(self.from_address(address).closing)
        # The refused one held no place: closing it frees nothing.
        refused = self.from_address(address)
        self.assertTrue(refused.closing)
        refused.protocol.connectionLost()
        self.assertTrue(self.from_address(address).closing)

    def test_ipv6_addresses_count_by_their_64(self) -> None:
        self.from_address(IPv6Address("TCP", "2001:db8:1:2::1", 1))
        self.from_address(IPv6Address("TCP", "2001:db8:1:2:ffff::9", 1))
        self.assertTrue(self.from_address(IPv6Address("TCP", "2001:db8:1:2::77", 1)).closing)
        self.assertFalse(self.from_address(IPv6Address("TCP", "2001:db8:1:3::1", 1)).closing)

    def test_unix_sockets_are_exempt(self) -> None:
        peers = [self.from_address(UNIXAddress(None)) for _ in range(5)]
        self.assertFalse(any(peer.closing for peer in peers))

    def test_address_groups(self) -> None:
        self.assertEqual(address_group(IPv4Address("TCP", "192.0.2.1", 1)), "192.0.2.1")
        self.assertEqual(address_group(IPv6Address("TCP", "::ffff:192.0.2.1", 1)), "192.0.2.1")
        self.assertEqual(address_group(IPv6Address("TCP", "2001:db8::1%eth0", 1)), "2001:db8::/64")
        self.assertIsNone(address_group(UNIXAddress(b"/tmp/s")))
        self.assertIsNone(address_group(None))


class BoundedEchoTests(LimitsTestCase):
    def test_an_invalid_room_name_is_echoed_clipped(self) -> None:
        peer = self.joined()
        name = "\x7f" * (1024 * 1024 - 100)
        with capturedLogs() as events:
            peer.send(publish(name, 1))
        frames = peer.received()
        self.assertEqual(len(frames), 1)
        self.assertLess(len(frames[0].payload), 512)
        self.assertIn("INVALID_ROOM", frames[0].payload.decode())
        for event in events:
            self.assertLess(sum(len(str(v)) for v in event.values()), 2048)

    def test_a_room_not_joined_is_echoed_clipped(self) -> None:
        peer = self.joined()
        peer.send(publish("n" * 64, 1))
        self.assertIn("'nnnn", self.error_of(peer.only_reply())["message"])

    def test_clip(self) -> None:
        self.assertEqual(clip("abc"), "'abc'")
        self.assertEqual(clip("x" * 100, 4), "'xxxx'... (100 characters)")


class RefusalLogTests(LimitsTestCase):
    def test_refusals_are_logged_once_per_connection_and_code_then_counted(self) -> None:
        peer = self.joined()
        with capturedLogs() as events:
            peer.send(publish("elsewhere", 1) * 100 + publish("\x00", 1) * 100)
            peer.protocol.connectionLost()
        refused = [e for e in events if "refused a request" in e.get("log_format", "")]
        self.assertEqual(sorted(e["code"] for e in refused), ["INVALID_ROOM", "NOT_IN_ROOM"])
        self.assertEqual(len(peer.replies()), 200)  # every refusal is still answered
        self.assertEqual(self.factory.limits.counters["refused_NOT_IN_ROOM"], 100)
        (closed,) = [e for e in events if "disconnected" in e.get("log_format", "")]
        self.assertIn("198 more", closed["suppressed"])


class OutboundBudgetTests(LimitsTestCase):
    config = RelayConfig(max_pending=100_000, max_pending_total=50_000)

    def test_past_the_server_wide_budget_the_largest_queues_go_first(self) -> None:
        sender = self.joined("big")
        small = self.joined("small")
        large, medium = self.joined("big"), self.joined("big")
        medium.send_json(MessageType.JOIN_ROOM, {"room": "small"})
        for peer in (small, large, medium):
            peer.received()
            peer.protocol.pauseProducing()
        large.protocol.enqueue(encode(MessageType.HEARTBEAT, 0, b"x" * 25_000))
        small_sender = self.joined("small")
        small_sender.send(publish("small", "s" * 1000))
        self.assertEqual(
            self.factory.limits.outbound.total,
            sum(p.protocol._pending_bytes for p in (small, large, medium)),
        )
        self.assertLess(self.factory.limits.outbound.total, 50_000)
        sender.send(publish("big", "b" * 22_000))
        self.assertEqual(large.protocol.state, State.CLOSING)
        self.assertEqual(self.error_of(large.replies()[-1])["code"], "SLOW_CONSUMER")
        for peer in (small, medium):
            self.assertEqual(peer.protocol.state, State.DRAINING)
        self.assertLessEqual(self.factory.limits.outbound.total, 50_000)
        self.assertEqual(self.factory.limits.counters["outbound_budget"], 1)

    def test_resumed_and_closed_connections_leave_the_budget(self) -> None:
        first, second = self.joined(), self.joined()
        first.protocol.pauseProducing()
        second.protocol.pauseProducing()
        first.protocol.enqueue(HEARTBEAT)
        second.protocol.enqueue(HEARTBEAT)
        self.assertEqual(len(self.factory.limits.outbound), 2)
        first.protocol.resumeProducing()
        second.protocol.connectionLost()
        self.assertEqual((len(self.factory.limits.outbound), self.factory.limits.outbound.total), (0, 0))


class PausingTransport(StringTransport):
    """Pauses its producer from inside write() once it holds more than bufferSize, as Twisted's do."""

    bufferSize = 65536

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > self.bufferSize and self.producer is not None:
            self.producer.pauseProducing()


class TransportShareTests(LimitsTestCase):
    config = RelayConfig(max_pending=100_000, read_size=16_384)

    def test_a_paused_connection_counts_what_the_transport_holds(self) -> None:
        transport = PausingTransport()
        peer = self.peer(transport)
        peer.send_json(MessageType.JOIN_ROOM, {"room": "r"})
        # The write buffer is kept under a quarter of max-pending.
        self.assertEqual(transport.bufferSize, 16_384)
        sender = self.joined()
        before = len(transport.value())
        sender.send(publish("r", "x" * 30_000))
        written = len(transport.value()) - before
        self.assertEqual(peer.protocol.state, State.DRAINING)
        # Its buffer's worth, and the write that took it past.
        self.assertEqual(peer.protocol._pending_bytes, 16_384 + written)
        self.assertEqual(self.factory.limits.outbound.total, 16_384 + written)
        sender.send(publish("r", "y" * 30_000) + publish("r", "z" * 30_000))
        self.assertEqual(peer.protocol.state, State.CLOSING)
        self.assertIn(b"SLOW_CONSUMER", peer.transport.value()[-200:])


class SendBufferTests(unittest.TestCase):
    def test_the_socket_under_tls_or_websocket_layers_is_capped(self) -> None:
        import socket

        from relay.server.protocol import cap_send_buffer

        class Layer:
            def __init__(self, below: Any = None, sock: Any = None, name: str = "transport") -> None:
                setattr(self, name, below)
                self._sock = sock

            def getHandle(self) -> Any:
                return self._sock if self._sock is not None else object()

        for build in (
            lambda sock: Layer(sock=sock),  # TCP
            lambda sock: Layer(Layer(sock=sock)),  # TLS over TCP
            lambda sock: Layer(Layer(Layer(sock=sock)), name="stream"),  # WebSocket over TLS
        ):
            sock = socket.socket()
            self.addCleanup(sock.close)
            cap_send_buffer(build(sock), 64 * 1024)
            self.assertLessEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), 2 * 64 * 1024)


class InstanceAttributeTests(LimitsTestCase):
    def test_a_connection_stays_under_the_shared_keys_limit(self) -> None:
        # CPython 3.11 shares an instance dict's keys up to 30: past 29
        # attributes every attribute read on the fan-out path slows down.
        peer = self.joined()
        self.assertLessEqual(len(vars(peer.protocol)), 29)


class ChurnCostTests(LimitsTestCase):
    config = RelayConfig(join_rate=None)

    def churn_seconds(self, members: int) -> float:
        """CPU seconds for one connection's 2,000 pipelined JOIN/LEAVE pairs in a room of ``members``."""
        import time

        room = f"room-{members}"
        for _ in range(members):  # members that only need to be counted
            self.factory.registry.join(object(), room)  # type: ignore[arg-type]
        churner = self.peer()
        pairs = (
            encode_json(MessageType.JOIN_ROOM, {"room": room})
            + encode_json(MessageType.LEAVE_ROOM, {"room": room})
        ) * 2000
        started = time.process_time()
        churner.send(pairs)
        return time.process_time() - started

    def test_join_and_leave_cost_the_same_in_a_big_room_as_in_a_small_one(self) -> None:
        small = min(self.churn_seconds(1) for _ in range(3))
        big = self.churn_seconds(10_000)
        # Rebuilding the member tuple on every change made it six times slower.
        self.assertLess(big, 3 * small + 0.05, (small, big))


class LazySnapshotTests(unittest.TestCase):
    def test_joins_and_leaves_do_not_rebuild_the_member_tuple(self) -> None:
        room = Room("big")
        members = [object() for _ in range(10_000)]
        for member in members:
            room.add(member)  # type: ignore[arg-type]
        snapshot = room.members
        self.assertEqual(len(snapshot), 10_000)
        newcomer = object()
        room.add(newcomer)  # type: ignore[arg-type]
        room.discard(newcomer)  # type: ignore[arg-type]
        self.assertIsNone(room._snapshot)  # rebuilt only when next needed
        rebuilt = room.members
        self.assertIsNot(rebuilt, snapshot)
        self.assertEqual(rebuilt, snapshot)
        self.assertIs(room.members, rebuilt)

    def test_a_member_that_left_is_not_kept_by_the_old_tuple(self) -> None:
        import weakref

        class Member:
            pass

        room = Room("r")
        member = Member()
        room.add(member)  # type: ignore[arg-type]
        room.members
        gone = weakref.ref(member)
        room.discard(member)  # type: ignore[arg-type]
        del member
        self.assertIsNone(gone())
