"""Shared fan-out entries: the guards on their reuse, their lifetime, their invariant.

``Room`` is tested with plain recording members (what ``Member`` asks of a
connection); the lifetime and the invariant with real ``RelayProtocol``s on
StringTransports.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from relay.server.factory import RelayConfig, RelayFactory
from relay.server.fanout import Batch, Fanout
from relay.server.rooms import Room
from relay.wire import MessageType, encode_json


class RecordingMember:
    """A member that shares Fanouts and records what it would be written."""

    def __init__(self, name: str, shares: bool = True) -> None:
        self.name = name
        self.shares = shares
        self.outbox: list[bytes | Fanout] = []

    def __repr__(self) -> str:
        return f"<member {self.name}>"

    def enqueue(self, frame: bytes) -> None:
        if self.outbox and isinstance(self.outbox[-1], Fanout):
            self.outbox[-1].close()
        self.outbox.append(frame)

    def enqueue_shared(self, fanout: Fanout) -> bool:
        if not self.shares:
            return False
        if self.outbox and isinstance(self.outbox[-1], Fanout):
            self.outbox[-1].close()
        self.outbox.append(fanout)
        return True

    def flush(self) -> None:
        pass

    def written(self) -> bytes:
        """What a flush would write now."""
        return b"".join(e.join() if isinstance(e, Fanout) else e for e in self.outbox)

    def received(self) -> list[bytes]:
        frames: list[bytes] = []
        for entry in self.outbox:
            frames.extend(entry.frames if isinstance(entry, Fanout) else [entry])
        return frames


class RoomFanoutTests(unittest.TestCase):
    def setUp(self) -> None:
        self.room = Room("lobby")
        self.batch = Batch()

    def members(self, *names: str) -> list[RecordingMember]:
        members = [RecordingMember(name) for name in names]
        for member in members:
            self.room.add(member)
        return members

    def test_consecutive_broadcasts_share_one_entry(self) -> None:
        alice, bob = self.members("alice", "bob")
        self.room.broadcast(b"1", batch=self.batch)
        self.room.broadcast(b"2", batch=self.batch)
        self.assertEqual(len(alice.outbox), 1)
        self.assertIs(alice.outbox[0], bob.outbox[0])
        self.assertEqual(alice.received(), [b"1", b"2"])

    def test_member_who_joins_mid_batch_gets_what_follows(self) -> None:
        (alice,) = self.members("alice")
        self.room.broadcast(b"1", batch=self.batch)
        (bob,) = self.members("bob")
        self.room.broadcast(b"2", batch=self.batch)
        self.assertEqual(alice.received(), [b"1", b"2"])
        self.assertEqual(bob.received(), [b"2"])

    def test_member_who_leaves_mid_batch_gets_nothing_more(self) -> None:
        alice, bob = self.members("alice", "bob")
        self.room.broadcast(b"1", batch=self.batch)
        self.room.discard(bob)
        self.room.broadcast(b"2", batch=self.batch)
        self.assertEqual(alice.received(), [b"1", b"2"])
        self.assertEqual(bob.received(), [b"1"])

    def test_broadcast_from_another_sender_reaches_the_first_one(self) -> None:
        alice, bob = self.members("alice", "bob")
        self.room.broadcast(b"from alice", exclude=alice, batch=self.batch)
        self.room.broadcast(b"from bob", exclude=bob, batch=self.batch)
        self.assertEqual(alice.received(), [b"from bob"])
        self.assertEqual(bob.received(), [b"from alice"])

    def test_frame_queued_after_a_fanout_keeps_its_place(self) -> None:
        alice, bob = self.members("alice", "bob")
        self.room.broadcast(b"1", batch=self.batch)
        alice.enqueue(b"reply")
        self.room.broadcast(b"2", batch=self.batch)
        self.assertEqual(alice.received(), [b"1", b"reply", b"2"])
        self.assertEqual(bob.received(), [b"1", b"2"])

    def test_fanout_written_by_one_member_takes_no_more_frames(self) -> None:
        alice, bob = self.members("alice", "bob")
        self.room.broadcast(b"1", batch=self.batch)
        self.assertEqual(alice.written(), b"1")  # as a closing member writes at once
        self.room.broadcast(b"2", batch=self.batch)
        self.assertEqual(bob.written(), b"12")

    def test_member_that_does_not_share_gets_every_frame(self) -> None:
        (alice,) = self.members("alice")
        paused = RecordingMember("paused", shares=False)
        self.room.add(paused)
        for frame in (b"1", b"2", b"3"):
            self.room.broadcast(frame, batch=self.batch)
        self.assertEqual(paused.outbox, [b"1", b"2", b"3"])
        self.assertEqual(alice.received(), [b"1", b"2", b"3"])

    def test_next_batch_opens_a_new_fanout(self) -> None:
        (alice,) = self.members("alice")
        self.room.broadcast(b"1", batch=self.batch)
        self.batch.flush()
        self.room.broadcast(b"2", batch=self.batch)
        self.assertEqual(len(alice.outbox), 2)
        self.assertEqual(alice.outbox[0].frames, [b"1"])

    def test_without_a_batch_nothing_is_shared(self) -> None:
        (alice,) = self.members("alice")
        self.room.broadcast(b"1")
        self.room.broadcast(b"2")
        self.assertEqual(len(alice.outbox), 2)


class Connection:
    """A RelayProtocol on a StringTransport, joined to ``lobby``."""

    def __init__(self, factory: RelayFactory, user: str) -> None:
        self.transport = StringTransport()
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(
            encode_json(MessageType.HELLO, {"userId": user})
            + encode_json(MessageType.JOIN_ROOM, {"room": "lobby"})
        )
        self.transport.clear()


def delivery(content: Any) -> bytes:
    return encode_json(MessageType.MESSAGE, {"room": "lobby", "from": "x", "content": content})


class FanoutLifetimeTests(unittest.TestCase):
    def setUp(self) -> None:
        self.factory = RelayFactory(RelayConfig(), reactor=Clock())
        self.room_members = [Connection(self.factory, name) for name in ("alice", "bob")]
        self.room = self.factory.registry.get("lobby")

    def test_nothing_holds_a_fanout_after_the_flush(self) -> None:
        self.room.broadcast(delivery(1), batch=self.factory.batch)
        fanout = self.factory.batch.fanouts[self.room]
        self.factory.flush()
        # This test's own reference, and getrefcount's argument: no outbox,
        # member, room or batch still holds it (or its frames).
        self.assertEqual(sys.getrefcount(fanout), 2)
        for member in self.room_members:
            self.assertEqual(member.transport.value(), delivery(1))


class InvariantCheckTests(unittest.TestCase):
    """Under --debug, a member leaving OPEN while it holds an open Fanout is
    reported as a bug."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def bugs(self) -> list[dict[str, Any]]:
        return [
            e for e in self.events
            if e.get("log_level") is LogLevel.critical and "BUG" in e.get("log_format", "")
        ]

    def members(self, debug: bool) -> list[Connection]:
        self.factory = RelayFactory(RelayConfig(debug=debug), reactor=Clock())
        return [Connection(self.factory, name) for name in ("alice", "bob")]

    def test_pausing_while_holding_an_open_fanout_is_reported(self) -> None:
        alice, _ = self.members(debug=True)
        self.factory.registry.get("lobby").broadcast(delivery(1), batch=self.factory.batch)
        alice.protocol.pauseProducing()
        self.assertEqual(len(self.bugs()), 1)
        self.assertEqual(self.bugs()[0]["conn"], alice.protocol.connection_id)

    def test_not_checked_without_debug(self) -> None:
        alice, _ = self.members(debug=False)
        self.factory.registry.get("lobby").broadcast(delivery(1), batch=self.factory.batch)
        alice.protocol.pauseProducing()
        self.assertEqual(self.bugs(), [])

    def test_pausing_after_the_flush_is_fine(self) -> None:
        alice, bob = self.members(debug=True)
        self.factory.registry.get("lobby").broadcast(delivery(1), batch=self.factory.batch)
        self.factory.flush()
        alice.protocol.pauseProducing()
        self.assertEqual(self.bugs(), [])
        self.assertEqual(bob.transport.value(), delivery(1))

    def test_failing_while_holding_an_open_fanout_writes_it_first(self) -> None:
        alice, bob = self.members(debug=True)
        self.factory.registry.get("lobby").broadcast(delivery(1), batch=self.factory.batch)
        alice.protocol.dataReceived(b"\x00\x00\x00\x01")  # length 1: a violation
        self.assertEqual(self.bugs(), [])
        self.assertTrue(alice.transport.value().startswith(delivery(1)))
        self.assertEqual(bob.transport.value(), delivery(1))
