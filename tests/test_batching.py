"""Fan-out semantics under outbound batching.

A read may carry many frames; every member's frames are queued and written
once at the end of the read.  These tests prove that the batching keeps
ordering, sender exclusion, DRAINING and the slow-consumer cut-off exactly
as the protocol contract states.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import directlyProvides

from relay.server.factory import RelayConfig, RelayFactory
from relay.server.fanout import Fanout
from relay.server.protocol import IMessageTransport, State
from relay.wire import (
    Decoder,
    ErrorCode,
    Flags,
    MessageType,
    decode_binary_delivery,
    encode,
    encode_binary_message,
    encode_json,
    loads,
)
from tests.support import IntegrationTestCase, StringConnection

ROOM = "lobby"


class CountingTransport(StringTransport):
    """A StringTransport that remembers the writes it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.written: list[Any] = []

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.written.append(data)
        super().write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.writes += 1
        self.written.append(list(data))
        super().writeSequence(data)

    def write_entries(self, entries: list[Any]) -> None:
        """As a message transport is given the outbox: recorded frame by frame."""
        frames = []
        for entry in entries:
            frames.extend(entry.frames if isinstance(entry, Fanout) else [entry])
        self.writeSequence(frames)


def joined_member(
    factory: RelayFactory, user: str, echo: bool = False, messages: bool = False
) -> StringConnection:
    """One server-side connection on a CountingTransport, joined to ROOM.

    ``messages`` makes its transport keep message boundaries, like WebSocket.
    """
    transport = CountingTransport()
    if messages:
        directlyProvides(transport, IMessageTransport)
    connection = StringConnection(factory, transport)
    connection.send(
        encode_json(MessageType.HELLO, {"userId": user, "echo": echo})
        + encode_json(MessageType.JOIN_ROOM, {"room": ROOM})
    )
    hello, join = connection.received()
    assert (hello.type, join.type) == (MessageType.HELLO, MessageType.JOIN_ROOM)
    transport.writes = 0
    transport.written = []
    return connection


def publish(count: int, first: int = 0, room: str = ROOM) -> bytes:
    """``count`` MESSAGEs to ``room``, as the bytes of one read."""
    return b"".join(
        encode_json(MessageType.MESSAGE, {"room": room, "content": first + index})
        for index in range(count)
    )


def join(room: str) -> bytes:
    return encode_json(MessageType.JOIN_ROOM, {"room": room})


class BatchingTestCase(unittest.TestCase):
    max_pending = 64 * 1024

    def setUp(self) -> None:
        self.clock = Clock()
        config = RelayConfig(max_pending=self.max_pending)
        self.factory = RelayFactory(config, reactor=self.clock)

    def members(self, count: int, **options: Any) -> list[StringConnection]:
        return [joined_member(self.factory, f"user-{index}", **options) for index in range(count)]


class OrderingTests(BatchingTestCase):
    def test_one_read_of_many_publishes_is_one_write_per_member(self) -> None:
        publisher, *subscribers = self.members(4)
        publisher.send(publish(50))
        for subscriber in subscribers:
            self.assertEqual(subscriber.transport.writes, 1)
            self.assertEqual(subscriber.contents(), list(range(50)))

    def test_publish_order_holds_across_reads_and_publishers(self) -> None:
        alice, bob, carol = self.members(3)
        alice.send(publish(3, first=0))
        bob.send(publish(3, first=100))
        alice.send(publish(2, first=10))
        self.assertEqual(carol.contents(), [0, 1, 2, 100, 101, 102, 10, 11])
        self.assertEqual(bob.contents(), [0, 1, 2, 10, 11])
        self.assertEqual(alice.contents(), [100, 101, 102])

    def test_seq_counts_up_in_publish_order_within_a_batch(self) -> None:
        publisher, subscriber = self.members(2)
        publisher.send(publish(20))
        seqs = [loads(frame.payload)["seq"] for frame in subscriber.received()]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(len(set(seqs)), 20)

    def test_replies_and_deliveries_keep_their_order_in_one_write(self) -> None:
        alice, bob = self.members(2)
        heartbeat = encode(MessageType.HEARTBEAT, Flags.NONE, b"")
        # Bob's read: a delivery queued by Alice sits in his outbox before
        # his own heartbeat echo and the deliveries that follow.
        alice.send(publish(1, first=1))
        bob.send(heartbeat)
        self.assertEqual(
            [f.type for f in bob.received()], [MessageType.MESSAGE, MessageType.HEARTBEAT]
        )
        bob.send(heartbeat + publish(1, first=2) + heartbeat)
        self.assertEqual(
            [f.type for f in bob.received()], [MessageType.HEARTBEAT, MessageType.HEARTBEAT]
        )
        self.assertEqual(alice.contents(), [2])

    def test_binary_deliveries_keep_order_and_bytes(self) -> None:
        publisher, subscriber = self.members(2)
        datas = [bytes([index]) * (index * 100) for index in range(1, 8)]
        publisher.send(
            b"".join(
                encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message(ROOM, data))
                for data in datas
            )
        )
        received = [decode_binary_delivery(frame.payload) for frame in subscriber.received()]
        self.assertEqual(received, [(ROOM, "user-0", data) for data in datas])


class SharedFanoutTests(BatchingTestCase):
    """Consecutive broadcasts share one outbox entry; order is still per member."""

    def test_members_are_written_the_same_bytes_object(self) -> None:
        publisher, alice, bob = self.members(3)
        publisher.send(publish(30))
        (to_alice,) = alice.transport.written
        (to_bob,) = bob.transport.written
        self.assertIs(to_alice, to_bob)
        self.assertEqual(alice.contents(), list(range(30)))

    def test_alternating_rooms_in_one_read_keep_publish_order(self) -> None:
        publisher, both, only_lobby = self.members(3)
        for member in (publisher, both):
            member.send(join("other"))
            member.received()
        publisher.send(
            publish(2, first=0) + publish(2, first=10, room="other") + publish(2, first=20)
        )
        self.assertEqual(both.contents(), [0, 1, 10, 11, 20, 21])
        self.assertEqual(only_lobby.contents(), [0, 1, 20, 21])

    def test_echo_sender_replies_interleave_with_its_broadcasts(self) -> None:
        (publisher,) = self.members(1, echo=True)
        heartbeat = encode(MessageType.HEARTBEAT, Flags.NONE, b"")
        publisher.send(publish(2) + heartbeat + publish(2, first=2) + join("other") + publish(1, first=4))
        self.assertEqual(
            [(f.type, loads(f.payload).get("content") if f.flags & Flags.JSON else None)
             for f in publisher.received()],
            [
                (MessageType.MESSAGE, 0),
                (MessageType.MESSAGE, 1),
                (MessageType.HEARTBEAT, None),
                (MessageType.MESSAGE, 2),
                (MessageType.MESSAGE, 3),
                (MessageType.JOIN_ROOM, None),
                (MessageType.MESSAGE, 4),
            ],
        )

    def test_membership_change_mid_read_starts_a_new_fanout(self) -> None:
        publisher, subscriber, other = self.members(3)
        other.send(join("other"))
        other.received()
        # The publisher joins "other" mid-read, between broadcasts to it.
        publisher.send(
            publish(1, first=0)
            + join("other")
            + publish(2, first=10, room="other")
            + publish(1, first=1)
        )
        self.assertEqual(other.contents(), [0, 10, 11, 1])
        self.assertEqual(subscriber.contents(), [0, 1])
        self.assertEqual(publisher.received()[0].type, MessageType.JOIN_ROOM)

    def test_paused_member_counts_shared_broadcasts_frame_by_frame(self) -> None:
        publisher, paused, running = self.members(3)
        paused.protocol.pauseProducing()
        one = len(publish(1))
        count = self.max_pending // one + 1
        publisher.send(publish(count))
        self.assertEqual(running.contents(), list(range(count)))
        self.assertIs(paused.protocol.state, State.CLOSING)
        self.assertEqual(
            loads(paused.received()[-1].payload)["code"], ErrorCode.SLOW_CONSUMER.value
        )

    def test_fanout_nobody_shared_does_not_outlive_its_flush(self) -> None:
        publisher, alice, bob = self.members(3)
        for member in (alice, bob):
            member.protocol.pauseProducing()
        publisher.send(publish(3))
        for member in (alice, bob):
            member.protocol.resumeProducing()
        publisher.send(publish(2, first=3))
        self.assertIs(alice.transport.written[-1], bob.transport.written[-1])
        self.assertEqual(alice.contents(), [0, 1, 2, 3, 4])
        self.assertEqual(bob.contents(), [0, 1, 2, 3, 4])

    def test_message_transport_gets_each_frame_as_its_own_element(self) -> None:
        publisher = joined_member(self.factory, "publisher")
        websocket = joined_member(self.factory, "websocket", messages=True)
        publisher.send(publish(3))
        (sequence,) = websocket.transport.written
        self.assertEqual(len(sequence), 3)
        self.assertEqual(
            [loads(Decoder().feed(frame).__next__().payload)["content"] for frame in sequence],
            [0, 1, 2],
        )

    def test_message_transport_writes_count_each_byte_once(self) -> None:
        publisher = joined_member(self.factory, "publisher")
        websocket = joined_member(self.factory, "websocket", messages=True)
        stats = self.factory.stats
        before = stats.bytes_out
        publisher.send(publish(3) + encode(MessageType.HEARTBEAT, 0, b""))
        written = sum(map(len, websocket.transport.written[0])) + len(publisher.transport.value())
        self.assertEqual(stats.bytes_out - before, written)

    def test_no_fanout_outlives_the_flush(self) -> None:
        publisher, subscriber = self.members(2)
        publisher.send(publish(5))
        self.assertEqual(subscriber.contents(), list(range(5)))
        self.assertEqual(self.factory.batch.fanouts, {})


class ExclusionTests(BatchingTestCase):
    def test_sender_is_excluded_from_its_own_batch(self) -> None:
        publisher, subscriber = self.members(2)
        publisher.send(publish(10))
        self.assertEqual(publisher.received(), [])
        self.assertEqual(publisher.transport.writes, 0)
        self.assertEqual(subscriber.contents(), list(range(10)))

    def test_echo_sender_receives_its_batch_in_order(self) -> None:
        (publisher,) = self.members(1, echo=True)
        publisher.send(publish(10))
        self.assertEqual(publisher.transport.writes, 1)
        self.assertEqual(publisher.contents(), list(range(10)))


class DrainingTests(BatchingTestCase):
    def test_paused_member_gets_nothing_until_resumed_then_all_in_order(self) -> None:
        publisher, paused, running = self.members(3)
        paused.protocol.pauseProducing()
        self.assertIs(paused.protocol.state, State.DRAINING)
        publisher.send(publish(5))
        publisher.send(publish(5, first=5))
        self.assertEqual(paused.transport.value(), b"")
        self.assertEqual(running.contents(), list(range(10)))
        paused.protocol.resumeProducing()
        self.assertIs(paused.protocol.state, State.OPEN)
        self.assertEqual(paused.transport.writes, 1)
        self.assertEqual(paused.contents(), list(range(10)))

    def test_draining_member_still_has_its_requests_handled(self) -> None:
        publisher, paused = self.members(2)
        paused.protocol.pauseProducing()
        paused.send(publish(3))
        self.assertEqual(publisher.contents(), [0, 1, 2])
        self.assertEqual(paused.transport.value(), b"")


class SlowConsumerTests(BatchingTestCase):
    max_pending = 4096

    def test_slow_consumer_is_cut_off_mid_batch_and_the_others_get_everything(self) -> None:
        publisher, slow, fast = self.members(3)
        slow.protocol.pauseProducing()
        # Comfortably more than max_pending in one read.
        count = 200
        publisher.send(publish(count))
        self.assertEqual(fast.contents(), list(range(count)))
        self.assertIs(slow.protocol.state, State.CLOSING)
        self.assertTrue(slow.transport.disconnecting)
        (error,) = slow.received()
        self.assertEqual(error.type, MessageType.ERROR)
        self.assertEqual(loads(error.payload)["code"], ErrorCode.SLOW_CONSUMER.value)

    def test_bytes_below_the_limit_are_kept_while_paused(self) -> None:
        publisher, slow = self.members(2)
        slow.protocol.pauseProducing()
        publisher.send(publish(10))
        self.assertIs(slow.protocol.state, State.DRAINING)
        slow.protocol.resumeProducing()
        self.assertEqual(slow.contents(), list(range(10)))

    def test_limit_counts_what_was_queued_before_the_pause(self) -> None:
        (slow,) = self.members(1)
        # Queued in the same read, then the transport pauses before the flush.
        frames = publish(120)
        self.assertLess(len(frames) // 2, self.max_pending)
        self.assertGreater(len(frames), self.max_pending)
        half = len(frames) // 2
        slow.protocol.enqueue(frames[:half])
        slow.protocol.pauseProducing()
        slow.protocol.enqueue(frames[half:])
        self.assertIs(slow.protocol.state, State.CLOSING)


class ViolationTests(BatchingTestCase):
    def test_frames_before_a_violation_are_delivered_none_after(self) -> None:
        publisher, subscriber = self.members(2)
        bad = encode(MessageType.HEARTBEAT, 0x80, b"")  # reserved flag bit
        publisher.send(publish(3) + bad + publish(3, first=3))
        self.assertEqual(subscriber.contents(), [0, 1, 2])
        (error,) = publisher.received()
        self.assertEqual(loads(error.payload)["code"], ErrorCode.INVALID_FRAME.value)
        self.assertTrue(publisher.transport.disconnecting)


class LoopbackBatchingTests(IntegrationTestCase):
    """The same guarantees over real sockets, with reads split by the kernel."""

    async def test_many_publishes_in_one_write_arrive_in_order_everywhere(self) -> None:
        publisher = await self.connect()
        subscribers = [await self.connect() for _ in range(3)]
        for index, client in enumerate([publisher, *subscribers]):
            await client.hello(userId=f"user-{index}")
            await client.join(ROOM)
        count = 500
        publisher.send(publish(count))
        for subscriber in subscribers:
            contents = []
            while len(contents) < count:
                type_, body = await subscriber.next_json()
                self.assertEqual(type_, MessageType.MESSAGE)
                contents.append(body["content"])
            self.assertEqual(contents, list(range(count)))
        # The publisher was excluded: a heartbeat comes back as its next frame.
        publisher.send_frame(MessageType.HEARTBEAT)
        frame = await publisher.next_frame()
        self.assertEqual(frame.type, MessageType.HEARTBEAT)
