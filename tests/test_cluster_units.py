"""The cluster's pieces on their own: addresses, options, envelopes, backoff,
and how the registry and a connection talk to a backplane."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from relay.server.backplane import BackplaneStats, IBackplane, LocalBackplane, parse_redis_url
from relay.server.factory import RelayConfig, RelayFactory
from relay.server.fanout import Batch
from relay.server.redis_backplane import (
    MAX_RETRY_DELAY,
    EnvelopeError,
    RedisBackplane,
    envelope_head,
    origin_field,
    parse_envelope,
    retry_delay,
)
from relay.server.rooms import ForwardingRoom, Room, RoomRegistry
from relay.server.tap import Options
from relay.wire import Decoder, MessageType, encode_json, loads


class RedisUrlTests(unittest.TestCase):
    def test_tcp_url_with_user_password_and_database(self) -> None:
        address = parse_redis_url("redis://app:p%40ss@redis.example:6380/3", environ={})
        self.assertEqual(
            (address.scheme, address.host, address.port, address.db, address.username, address.password),
            ("redis", "redis.example", 6380, 3, "app", "p@ss"),
        )

    def test_defaults(self) -> None:
        address = parse_redis_url("redis://", environ={})
        self.assertEqual((address.host, address.port, address.db, address.password), ("127.0.0.1", 6379, 0, None))

    def test_unix_socket_with_database_and_password(self) -> None:
        address = parse_redis_url("unix:///run/redis/redis.sock?db=2&password=x", environ={})
        self.assertEqual((address.scheme, address.path, address.db, address.password), ("unix", "/run/redis/redis.sock", 2, "x"))

    def test_rediss_takes_pem_files(self) -> None:
        address = parse_redis_url("rediss://h:1/0?trustRoots=/ca.pem&certificate=/c.pem&privateKey=/k.pem", environ={})
        self.assertTrue(address.tls)
        self.assertEqual((address.trust_roots, address.certificate, address.private_key), ("/ca.pem", "/c.pem", "/k.pem"))

    def test_password_from_the_environment_when_the_url_has_none(self) -> None:
        self.assertEqual(parse_redis_url("redis://h", environ={"RELAY_REDIS_PASSWORD": "e"}).password, "e")
        self.assertEqual(parse_redis_url("redis://:u@h", environ={"RELAY_REDIS_PASSWORD": "e"}).password, "u")

    def test_the_password_never_shows_in_repr_or_str(self) -> None:
        address = parse_redis_url("redis://user:hunter2@h:1/0", environ={})
        self.assertNotIn("hunter2", repr(address))
        self.assertNotIn("hunter2", str(address))
        self.assertNotIn("hunter2", repr(RelayConfig(redis=address)))
        self.assertEqual(str(address), "redis://user:***@h:1/0")

    def test_bad_urls_are_refused(self) -> None:
        for url in ("http://h", "redis://h/x", "unix://", "redis://h?tls=1", "redis://h?trustRoots=/a", "redis://h:99999"):
            self.assertRaises(ValueError, parse_redis_url, url, {})


class OptionTests(unittest.TestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_cluster_options_reach_the_config(self) -> None:
        config = self.parse(
            "--redis", "redis://h:1/2", "--cluster-name", "blue", "--redis-queue", "4096", "--membership-ttl", "5"
        ).config()
        self.assertEqual((config.redis.host, config.redis.db), ("h", 2))
        self.assertEqual((config.cluster_name, config.redis_queue, config.membership_ttl), ("blue", 4096, 5))

    def test_without_redis_there_is_no_cluster(self) -> None:
        options = self.parse()
        self.assertIsNone(options.config().redis)
        self.assertEqual(options["workers"], 0)

    def test_workers_without_redis_is_a_startup_error(self) -> None:
        with self.assertRaises(usage.UsageError) as raised:
            self.parse("--workers", "2")
        self.assertIn("--redis", str(raised.exception))

    def test_bad_values_are_refused(self) -> None:
        for argv in (
            ("--cluster-name", "has space"),
            ("--cluster-name", "x" * 65),
            ("--redis-queue", "0"),
            ("--membership-ttl", "0"),
            ("--workers", "-1"),
            ("--redis", "http://nope"),
        ):
            self.assertRaises(usage.UsageError, self.parse, *argv)


class EnvelopeTests(unittest.TestCase):
    frames = [encode_json(MessageType.MESSAGE, {"room": "r", "n": n}) for n in range(3)]

    def test_round_trip(self) -> None:
        payload = envelope_head("node1") + origin_field("conn7") + b"".join(self.frames)
        self.assertEqual(parse_envelope(payload), ("node1", "conn7", self.frames))

    def test_frames_come_out_as_the_bytes_that_went_in(self) -> None:
        payload = envelope_head("n") + origin_field(None) + self.frames[0]
        self.assertEqual(parse_envelope(payload)[2], [self.frames[0]])

    def test_malformed_envelopes_are_refused(self) -> None:
        good = envelope_head("n") + origin_field("c") + b"".join(self.frames)
        for payload in (
            b"",
            b"\x02" + good[1:],  # another version
            good[:3],  # cut in the node id
            envelope_head("n") + origin_field("c"),  # no frame
            good[:-1],  # the last frame cut short
            envelope_head("n") + origin_field("c") + b"\x00\x00\x00\x01\x01",  # length below a header
            envelope_head("n") + origin_field("c") + b"\x00\x00",  # a length cut in two
        ):
            self.assertRaises(EnvelopeError, parse_envelope, payload)


class RetryDelayTests(unittest.TestCase):
    def test_doubles_then_stays_under_the_ceiling(self) -> None:
        delays = [retry_delay(attempt, rand=lambda: 0.0) for attempt in range(1, 12)]
        self.assertEqual(delays[:3], [0.05, 0.1, 0.2])
        self.assertEqual(max(delays), MAX_RETRY_DELAY)
        self.assertEqual(delays, sorted(delays))

    def test_jitter_only_shortens_the_delay(self) -> None:
        for attempt in (1, 5, 100, 10_000):
            self.assertLessEqual(retry_delay(attempt, rand=lambda: 0.999), MAX_RETRY_DELAY)
            self.assertGreater(retry_delay(attempt, rand=lambda: 0.999), 0)


@implementer(IBackplane)
class RecordingBackplane:
    """A backplane double that records what it is told; joins wait to be answered."""

    node_id = "test"
    clustered = True
    link_up = True

    def __init__(self) -> None:
        self.stats = BackplaneStats()
        self.calls: list[tuple] = []
        self.waiting: list[defer.Deferred[int]] = []

    def start(self, node) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def joined(self, room: str, new: bool) -> defer.Deferred[int]:
        self.calls.append(("joined", room, new))
        waiting: defer.Deferred[int] = defer.Deferred()
        self.waiting.append(waiting)
        return waiting

    def left(self, room: str) -> None:
        self.calls.append(("left", room))

    def forward(self, room, frame, origin, batch) -> None:
        self.calls.append(("forward", room, frame, origin))

    def health(self):
        return True, ""

    def metric_values(self):
        return []


class RegistryTests(unittest.TestCase):
    def test_interfaces(self) -> None:
        verifyObject(IBackplane, LocalBackplane())
        verifyObject(IBackplane, RedisBackplane(parse_redis_url("redis://", {}), reactor=MemoryReactorClock()))

    def test_one_node_is_always_healthy_and_has_no_cluster_metrics(self) -> None:
        self.assertEqual((LocalBackplane().health()[0], LocalBackplane().metric_values()), (True, []))

    def test_every_cluster_metric_has_a_kind_and_help(self) -> None:
        values = RedisBackplane(parse_redis_url("redis://", {}), reactor=MemoryReactorClock()).metric_values()
        self.assertEqual(len(values), 13)
        for name, kind, help_, value in values:
            self.assertTrue(name.startswith("relay_cluster_"))
            self.assertIn(kind, ("gauge", "counter"))
            self.assertEqual(kind == "counter", name.endswith("_total"))
            self.assertTrue(help_)

    def test_one_node_makes_plain_rooms_and_asks_nobody(self) -> None:
        registry = RoomRegistry()
        self.assertIsNone(registry.count_members("r", True))
        self.assertIs(type(registry.join(object(), "r")), Room)

    def test_a_cluster_room_forwards_its_broadcasts_with_their_origin(self) -> None:
        backplane = RecordingBackplane()
        sender = object()
        room = RoomRegistry(backplane).join(sender, "r")
        self.assertIs(type(room), ForwardingRoom)
        room.broadcast(b"frame", sender, Batch(), "conn1")
        self.assertEqual(backplane.calls, [("forward", "r", b"frame", "conn1")])

    def test_deliveries_from_other_nodes_reach_every_local_member_and_are_not_forwarded(self) -> None:
        backplane = RecordingBackplane()
        factory = RelayFactory(RelayConfig(), reactor=MemoryReactorClock(), backplane=backplane)
        members = [factory.buildProtocol(None) for _ in range(2)]
        for member in members:
            member.makeConnection(StringTransport())
            factory.registry.join(member, "r")
        factory.deliver_remote("r", [b"one", b"two"])
        factory.deliver_remote("unknown", [b"x"])
        factory.flush()
        for member in members:
            self.assertEqual(member.transport.value(), b"onetwo")
        self.assertEqual([c for c in backplane.calls if c[0] == "forward"], [])


class HeldJoinTests(unittest.TestCase):
    """A JOIN in a cluster waits for the count; what the client sent after it waits too."""

    def setUp(self) -> None:
        self.backplane = RecordingBackplane()
        self.factory = RelayFactory(RelayConfig(), reactor=MemoryReactorClock(), backplane=self.backplane)
        self.connection = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)

    def replies(self) -> list[tuple[int, dict]]:
        frames = list(Decoder(known_types=frozenset(range(256))).feed(self.transport.value()))
        return [(frame.type, loads(frame.payload)) for frame in frames]

    def test_replies_keep_the_order_of_their_requests(self) -> None:
        self.connection.dataReceived(
            encode_json(MessageType.JOIN_ROOM, {"room": "r", "id": 1})
            + encode_json(MessageType.HEARTBEAT, {"n": 2})
        )
        self.assertEqual(self.replies(), [])
        self.assertEqual(self.transport.producerState, "paused")
        # More frames while the count is awaited wait too.
        self.connection.dataReceived(encode_json(MessageType.MESSAGE, {"room": "r", "content": 3, "id": 3}))
        self.assertEqual(self.replies(), [])
        self.assertNotIn(self.connection, self.factory.registry.get("r") or ())
        self.backplane.waiting.pop().callback(7)
        replies = self.replies()
        self.assertEqual(replies[0], (MessageType.JOIN_ROOM, {"status": "joined", "room": "r", "members": 7, "id": 1}))
        self.assertEqual(replies[1], (MessageType.HEARTBEAT, {"n": 2}))
        self.assertEqual(len(replies), 2)  # the publish went to the room, not back to the sender
        self.assertEqual(self.transport.producerState, "producing")
        self.assertIn(self.connection, self.factory.registry.get("r"))
        forwarded = [c for c in self.backplane.calls if c[0] == "forward"]
        self.assertEqual([(c[1], loads(c[2][7:])["content"], c[3]) for c in forwarded], [("r", 3, self.connection.connection_id)])

    def test_a_connection_gone_before_the_count_never_joins(self) -> None:
        self.connection.dataReceived(encode_json(MessageType.JOIN_ROOM, {"room": "r"}))
        self.connection.connectionLost(connectionDone)
        self.assertEqual(self.backplane.calls, [("joined", "r", True), ("left", "r")])
        self.backplane.waiting.pop().callback(1)
        self.assertIsNone(self.factory.registry.get("r"))

    def test_joining_again_is_counted_but_not_as_new(self) -> None:
        self.connection.dataReceived(encode_json(MessageType.JOIN_ROOM, {"room": "r"}))
        self.backplane.waiting.pop().callback(1)
        self.connection.dataReceived(encode_json(MessageType.JOIN_ROOM, {"room": "r"}))
        self.backplane.waiting.pop().callback(1)
        self.assertEqual(self.backplane.calls, [("joined", "r", True), ("joined", "r", False)])
        self.assertEqual(len(self.factory.registry.get("r")), 1)


class FakeCommandConnection:
    """Records the commands a backplane sends; replies are never given."""

    def __init__(self) -> None:
        self.sent: list[tuple] = []
        self.transport = StringTransport()

    def execute_command(self, *command):
        self.sent.append(command)
        return defer.Deferred()


class PublishQueueTests(unittest.TestCase):
    """Envelopes wait in the bounded queue while the command connection's
    write buffer is full, and leave in order when it drains."""

    def setUp(self) -> None:
        self.backplane = RedisBackplane(parse_redis_url("redis://", {}), queue_limit=1000, reactor=MemoryReactorClock())
        self.command = FakeCommandConnection()
        self.backplane._command.protocol = self.command
        self.backplane._command_usable(self.command)
        self.producer = self.command.transport.producer

    def published(self) -> list[bytes]:
        return [parse_envelope(c[2])[2][0] for c in self.command.sent if c[0] == "PUBLISH"]

    def test_a_full_write_buffer_holds_envelopes_then_sends_them_in_order(self) -> None:
        self.backplane.forward("r", b"\x00\x00\x00\x03\x01\x04\x01", "c", None)
        self.producer.pauseProducing()
        for n in (2, 3):
            self.backplane.forward("r", b"\x00\x00\x00\x04\x01\x04\x01" + bytes([n]), "c", None)
        self.assertEqual(len(self.published()), 1)
        self.assertGreater(self.backplane.held_bytes, 0)
        self.producer.resumeProducing()
        self.assertEqual([frame[-1] for frame in self.published()[1:]], [2, 3])
        self.assertEqual(self.backplane.held_bytes, 0)

    def test_past_the_queue_limit_envelopes_are_dropped_and_counted(self) -> None:
        self.producer.pauseProducing()
        frame = b"\x00\x00\x01\x03\x01\x04\x01" + b"x" * 256
        for _ in range(10):
            self.backplane.forward("r", frame, "c", None)
        self.assertLessEqual(self.backplane.held_bytes, 1000)
        self.assertGreater(self.backplane.stats.dropped_frames, 0)
        self.producer.resumeProducing()
        self.assertEqual(len(self.published()) + self.backplane.stats.dropped_frames, 10)
        self.assertGreater(len(self.published()), 0)


class HelpTests(unittest.TestCase):
    async def test_twistd_relay_help_lists_the_cluster_options(self) -> None:
        import os
        import sys
        import tempfile
        from pathlib import Path

        from twisted.internet.utils import getProcessOutputAndValue

        repo = Path(__file__).resolve().parent.parent
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
        twistd = str(Path(sys.executable).with_name("twistd"))
        out, err, code = await getProcessOutputAndValue(twistd, ["relay", "--help"], env=env, path=tempfile.mkdtemp())
        self.assertEqual(code, 0, err)
        for expected in (b"--redis=", b"--cluster-name=", b"[default: relay]", b"--redis-queue=", b"16777216", b"--membership-ttl=", b"--workers="):
            self.assertIn(expected, out)
