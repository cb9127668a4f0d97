"""RelayProtocol unit tests: StringTransport for the wire, Clock for time."""

from __future__ import annotations

import struct
from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial import unittest

from relay.server.factory import SHUTDOWN_GRACE_SECONDS, RelayConfig, RelayFactory
from relay.server.protocol import CLOSE_GRACE_SECONDS, State
from relay.wire import (
    MAX_ENVELOPE,
    ErrorCode,
    Flags,
    Frame,
    MessageType,
    decode_binary_delivery,
    encode,
    encode_binary_message,
    encode_json,
)
from tests.support import StringConnection


class ProtocolTestCase(unittest.TestCase):
    config = RelayConfig(idle_timeout=60, max_pending=10_000, max_rooms=3)

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.factory = RelayFactory(self.config, reactor=self.clock)

    def peer(self, **hello: Any) -> StringConnection:
        peer = StringConnection(self.factory)
        if hello:
            peer.send_json(MessageType.HELLO, hello)
            type_, body = peer.only_reply()
            self.assertEqual(type_, MessageType.HELLO, body)
        return peer

    def joined(self, room: str = "lobby", **hello: Any) -> StringConnection:
        peer = self.peer(**hello)
        peer.send_json(MessageType.JOIN_ROOM, {"room": room})
        self.assertEqual(peer.only_reply()[1]["status"], "joined")
        return peer

    def assert_error(self, reply: tuple[int, Any], code: ErrorCode, request_id: Any = None) -> None:
        type_, body = reply
        self.assertEqual(type_, MessageType.ERROR, body)
        self.assertEqual(body["code"], code.value)
        self.assertEqual(body["fatal"], code.fatal)
        self.assertIsInstance(body["message"], str)
        self.assertEqual(body.get("id"), request_id)


class HelloTests(ProtocolTestCase):
    def test_ack_reports_identity_and_limits(self) -> None:
        peer = self.peer()
        peer.send_json(MessageType.HELLO, {"userId": "alice", "clientVersion": "x", "id": "h1"})
        type_, body = peer.only_reply()
        self.assertEqual(type_, MessageType.HELLO)
        self.assertEqual(body["status"], "connected")
        self.assertEqual(body["userId"], "alice")
        self.assertEqual(body["connectionId"], peer.protocol.connection_id)
        self.assertEqual(body["heartbeatInterval"], 30)
        self.assertEqual(body["maxFrameSize"], self.config.max_frame_size)
        self.assertEqual(body["features"], [])
        self.assertEqual(body["id"], "h1")
        self.assertIsInstance(body["serverVersion"], str)

    def test_anonymous_user_without_hello(self) -> None:
        alice = self.joined()
        bob = self.joined()
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "hi"})
        sender = bob.only_reply()[1]["from"]
        self.assertTrue(sender.startswith("anon-"))
        self.assertEqual(sender, alice.protocol.user_id)

    def test_unsupported_features_are_not_enabled(self) -> None:
        peer = self.peer()
        peer.send_json(MessageType.HELLO, {"features": ["zlib", "future"]})
        self.assertEqual(peer.only_reply()[1]["features"], [])

    def test_second_hello_is_refused_but_harmless(self) -> None:
        peer = self.peer(userId="alice")
        peer.send_json(MessageType.HELLO, {"userId": "mallory", "id": 2})
        self.assert_error(peer.only_reply(), ErrorCode.BAD_REQUEST, 2)
        self.assertEqual(peer.protocol.user_id, "alice")
        self.assertFalse(peer.closing)

    def test_bad_fields_are_bad_requests(self) -> None:
        for body in (
            {"userId": ""},
            {"userId": "x" * 129},
            {"userId": 5},
            {"userId": "a\nb"},
            {"echo": "yes"},
            {"features": "zlib"},
            {"token": 1},
        ):
            peer = self.peer()
            peer.send_json(MessageType.HELLO, dict(body, id=1))
            self.assert_error(peer.only_reply(), ErrorCode.BAD_REQUEST, 1)
            self.assertFalse(peer.closing)

    def test_user_id_of_128_characters_is_honoured(self) -> None:
        peer = self.peer(userId="é" * 128)
        self.assertEqual(peer.protocol.user_id, "é" * 128)

    def test_unknown_fields_are_ignored(self) -> None:
        peer = self.peer()
        peer.send_json(MessageType.HELLO, {"userId": "a", "future": {"x": 1}})
        self.assertEqual(peer.only_reply()[1]["status"], "connected")


class RequestValidationTests(ProtocolTestCase):
    def test_id_is_echoed_as_given(self) -> None:
        peer = self.peer()
        for request_id in (0, -5, 2**40, "abc", ""):
            peer.send_json(MessageType.JOIN_ROOM, {"room": "r", "id": request_id})
            self.assertEqual(peer.only_reply()[1]["id"], request_id)

    def test_id_of_another_type_is_a_bad_request(self) -> None:
        peer = self.peer()
        for request_id in (1.5, True, None, [1], {"a": 1}):
            peer.send_json(MessageType.JOIN_ROOM, {"room": "r", "id": request_id})
            if request_id is None:
                self.assertEqual(peer.only_reply()[1]["status"], "joined")
            else:
                self.assert_error(peer.only_reply(), ErrorCode.BAD_REQUEST)

    def test_request_without_json_flag_is_a_bad_request(self) -> None:
        peer = self.peer()
        peer.send(encode(MessageType.JOIN_ROOM, Flags.BINARY, b'{"room":"r"}'))
        self.assert_error(peer.only_reply(), ErrorCode.BAD_REQUEST)
        peer.send(encode(MessageType.JOIN_ROOM))
        self.assert_error(peer.only_reply(), ErrorCode.BAD_REQUEST)

    def test_json_that_is_not_an_object_is_a_bad_request(self) -> None:
        peer = self.peer()
        peer.send(encode(MessageType.JOIN_ROOM, Flags.JSON, b'["room"]'))
        self.assert_error(peer.only_reply(), ErrorCode.BAD_REQUEST)

    def test_replies_come_in_request_order(self) -> None:
        peer = self.peer()
        peer.send(
            encode_json(MessageType.JOIN_ROOM, {"room": "a", "id": 1})
            + encode_json(MessageType.MESSAGE, {"room": "zzz", "content": 1, "id": 2})
            + encode(MessageType.HEARTBEAT, 0, b"3")
            + encode_json(MessageType.LEAVE_ROOM, {"room": "a", "id": 4})
        )
        replies = peer.replies()
        self.assertEqual(
            [t for t, _ in replies],
            [MessageType.JOIN_ROOM, MessageType.ERROR, MessageType.HEARTBEAT, MessageType.LEAVE_ROOM],
        )
        self.assertEqual(replies[1][1]["id"], 2)
        self.assertEqual(replies[2][1], b"3")


class RoomTests(ProtocolTestCase):
    def test_join_ack_counts_members(self) -> None:
        self.joined("r")
        peer = self.peer()
        peer.send_json(MessageType.JOIN_ROOM, {"room": "r", "id": 9})
        self.assertEqual(
            peer.only_reply(),
            (MessageType.JOIN_ROOM, {"status": "joined", "room": "r", "members": 2, "id": 9}),
        )

    def test_joining_twice_is_acked_again(self) -> None:
        peer = self.joined("r")
        peer.send_json(MessageType.JOIN_ROOM, {"room": "r"})
        self.assertEqual(peer.only_reply()[1]["members"], 1)

    def test_room_names_are_trimmed(self) -> None:
        peer = self.peer()
        peer.send_json(MessageType.JOIN_ROOM, {"room": "  a b \t"})
        self.assertEqual(peer.only_reply()[1]["room"], "a b")
        self.assertIn("a b", self.factory.registry)

    def test_invalid_room_names(self) -> None:
        peer = self.peer()
        for name in ("", "   ", "x" * 65, "a\x00b", "bell\x07", "c1\x85c1"):
            peer.send_json(MessageType.JOIN_ROOM, {"room": name, "id": 3})
            self.assert_error(peer.only_reply(), ErrorCode.INVALID_ROOM, 3)
        self.assertEqual(len(self.factory.registry), 0)
        self.assertFalse(peer.closing)

    def test_sixty_four_code_points_is_a_valid_name(self) -> None:
        peer = self.peer()
        peer.send_json(MessageType.JOIN_ROOM, {"room": "€" * 64})
        self.assertEqual(peer.only_reply()[1]["status"], "joined")

    def test_missing_or_mistyped_room_is_a_bad_request(self) -> None:
        peer = self.peer()
        for body in ({}, {"room": 5}, {"room": None}):
            peer.send_json(MessageType.JOIN_ROOM, dict(body, id="x"))
            self.assert_error(peer.only_reply(), ErrorCode.BAD_REQUEST, "x")

    def test_room_limit_per_connection(self) -> None:
        peer = self.peer()
        for name in ("a", "b", "c"):
            peer.send_json(MessageType.JOIN_ROOM, {"room": name})
            peer.received()
        peer.send_json(MessageType.JOIN_ROOM, {"room": "d"})
        self.assert_error(peer.only_reply(), ErrorCode.BAD_REQUEST)
        peer.send_json(MessageType.JOIN_ROOM, {"room": "a"})
        self.assertEqual(peer.only_reply()[1]["status"], "joined")

    def test_leave_is_idempotent(self) -> None:
        peer = self.joined("r")
        for _ in range(2):
            peer.send_json(MessageType.LEAVE_ROOM, {"room": " r ", "id": 1})
            self.assertEqual(
                peer.only_reply(),
                (MessageType.LEAVE_ROOM, {"status": "left", "room": "r", "id": 1}),
            )
        peer.send_json(MessageType.LEAVE_ROOM, {"room": "never"})
        self.assertEqual(peer.only_reply()[1]["status"], "left")

    def test_last_member_leaving_deletes_the_room(self) -> None:
        alice = self.joined("r")
        bob = self.joined("r")
        alice.send_json(MessageType.LEAVE_ROOM, {"room": "r"})
        self.assertIn("r", self.factory.registry)
        bob.send_json(MessageType.LEAVE_ROOM, {"room": "r"})
        self.assertNotIn("r", self.factory.registry)


class MessageTests(ProtocolTestCase):
    def test_members_receive_and_sender_is_excluded(self) -> None:
        alice = self.joined(userId="alice")
        bob = self.joined(userId="bob")
        carol = self.joined(userId="carol")
        outsider = self.peer(userId="dave")
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": {"t": "hi"}})
        expected = {
            "room": "lobby",
            "from": "alice",
            "content": {"t": "hi"},
            "timestamp": 1_700_000_000_000,
            "seq": 1,
        }
        self.assertEqual(bob.only_reply(), (MessageType.MESSAGE, expected))
        self.assertEqual(carol.only_reply(), (MessageType.MESSAGE, expected))
        self.assertEqual(alice.replies(), [])
        self.assertEqual(outsider.replies(), [])

    def test_echo_includes_the_sender(self) -> None:
        alice = self.joined(userId="alice", echo=True)
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": 1})
        self.assertEqual(alice.only_reply()[1]["content"], 1)

    def test_every_member_gets_the_same_bytes(self) -> None:
        self.joined(userId="alice", echo=True)
        members = [self.joined() for _ in range(3)]
        members[0].send_json(MessageType.MESSAGE, {"room": "lobby", "content": [1, 2]})
        deliveries = [m.transport.value() for m in members[1:]]
        self.assertEqual(len(set(deliveries)), 1)

    def test_null_content_is_relayed(self) -> None:
        alice = self.joined()
        bob = self.joined()
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": None})
        self.assertIsNone(bob.only_reply()[1]["content"])

    def test_missing_content_is_a_bad_request(self) -> None:
        alice = self.joined()
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "id": 4})
        self.assert_error(alice.only_reply(), ErrorCode.BAD_REQUEST, 4)

    def test_publishing_outside_a_room(self) -> None:
        self.joined("other")
        alice = self.joined("mine")
        for room in ("other", "nowhere"):
            alice.send_json(MessageType.MESSAGE, {"room": room, "content": 1, "id": room})
            self.assert_error(alice.only_reply(), ErrorCode.NOT_IN_ROOM, room)
        alice.send_json(MessageType.MESSAGE, {"room": "\x00", "content": 1})
        self.assert_error(alice.only_reply(), ErrorCode.INVALID_ROOM)
        self.assertFalse(alice.closing)

    def test_room_name_is_trimmed_when_publishing(self) -> None:
        alice = self.joined("r")
        bob = self.joined("r")
        alice.send_json(MessageType.MESSAGE, {"room": "  r", "content": 1})
        self.assertEqual(bob.only_reply()[1]["room"], "r")

    def test_sequence_numbers_count_publishes_per_room(self) -> None:
        alice = self.joined("r")
        bob = self.joined("r")
        for _ in range(3):
            alice.send_json(MessageType.MESSAGE, {"room": "r", "content": 0})
        self.assertEqual([body["seq"] for _, body in bob.replies()], [1, 2, 3])

    def test_per_room_order_is_kept(self) -> None:
        alice = self.joined()
        bob = self.joined()
        alice.send(
            b"".join(
                encode_json(MessageType.MESSAGE, {"room": "lobby", "content": n})
                for n in range(100)
            )
        )
        self.assertEqual([body["content"] for _, body in bob.replies()], list(range(100)))

    def test_binary_message_is_relayed_byte_for_byte(self) -> None:
        alice = self.joined(userId="alice")
        bob = self.joined()
        data = bytes(range(256))
        alice.send(encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("lobby", data)))
        (frame,) = bob.received()
        self.assertEqual(frame.flags, Flags.BINARY)
        self.assertEqual(decode_binary_delivery(frame.payload), ("lobby", "alice", data))

    def test_binary_message_outside_a_room_is_not_in_room(self) -> None:
        alice = self.joined()
        alice.send(encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("x", b"1")))
        self.assert_error(alice.only_reply(), ErrorCode.NOT_IN_ROOM)

    def test_delivery_larger_than_the_envelope_allows_is_refused(self) -> None:
        factory = RelayFactory(RelayConfig(max_frame_size=1000), reactor=self.clock)
        alice, bob = StringConnection(factory), StringConnection(factory)
        for peer in (alice, bob):
            peer.send_json(MessageType.JOIN_ROOM, {"room": "r"})
            peer.received()
        # 1e15 is re-serialised as 1000000000000000.0: the delivery outgrows
        # the 512 bytes a server may add to a frame.
        numbers = b",".join([b"1e15"] * 190)
        alice.send(encode(MessageType.MESSAGE, Flags.JSON, b'{"room":"r","content":[' + numbers + b"]}"))
        self.assert_error(alice.only_reply(), ErrorCode.BAD_REQUEST)
        self.assertEqual(bob.replies(), [])

    def test_delivery_of_exactly_the_envelope_limit_is_relayed(self) -> None:
        # 128 characters, 510 bytes: a binary delivery adds 2 + 510 bytes.
        alice, bob = self.envelope_pair("😀" * 127 + "é")
        alice.send(self.largest_binary_publish())
        (frame,) = bob.received()
        self.assertEqual(len(frame.payload) + 3, 1000 + MAX_ENVELOPE)

    def test_binary_delivery_past_the_envelope_limit_is_refused(self) -> None:
        # 128 characters, 512 bytes: the delivery would outgrow it by 2.
        alice, bob = self.envelope_pair("😀" * 128)
        alice.send(self.largest_binary_publish())
        self.assert_error(alice.only_reply(), ErrorCode.BAD_REQUEST)
        self.assertEqual(bob.replies(), [])

    def envelope_pair(self, sender: str) -> tuple[StringConnection, StringConnection]:
        """A sender called ``sender`` and a member, on a server whose frames
        may be 1000 bytes long."""
        factory = RelayFactory(RelayConfig(max_frame_size=1000), reactor=self.clock)
        alice, bob = StringConnection(factory), StringConnection(factory)
        alice.send_json(MessageType.HELLO, {"userId": sender})
        for peer in (alice, bob):
            peer.send_json(MessageType.JOIN_ROOM, {"room": "r"})
            peer.received()
        return alice, bob

    @staticmethod
    def largest_binary_publish() -> bytes:
        """A binary MESSAGE to room "r" whose length is the 1000 allowed."""
        frame = encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("r", b"\x00" * 994))
        assert len(frame) == 4 + 1000, len(frame)
        return frame


class HeartbeatTests(ProtocolTestCase):
    def test_heartbeat_is_echoed_with_flags_and_payload(self) -> None:
        peer = self.peer()
        for flags, payload in ((0, b""), (Flags.BINARY, b"\x00\x01"), (Flags.JSON, b'{"n":1}')):
            peer.send(encode(MessageType.HEARTBEAT, flags, payload))
            self.assertEqual(peer.received(), [Frame(MessageType.HEARTBEAT, flags, payload)])

    def test_silence_past_the_idle_timeout_closes(self) -> None:
        peer = self.peer()
        peer.send(encode(MessageType.HEARTBEAT))  # past the hello deadline
        peer.received()
        self.clock.advance(59)
        self.assertFalse(peer.closing)
        self.clock.advance(1)
        self.assert_error(peer.only_reply(), ErrorCode.HEARTBEAT_TIMEOUT)
        self.assertTrue(peer.closing)
        self.assertEqual(peer.protocol.state, State.CLOSING)

    def test_any_frame_counts_as_liveness(self) -> None:
        peer = self.peer()
        for _ in range(5):
            peer.send_json(MessageType.JOIN_ROOM, {"room": "r"})
            self.clock.advance(50)
        self.assertFalse(peer.closing)
        self.assertEqual([t for t, _ in peer.replies()], [MessageType.JOIN_ROOM] * 5)

    def test_client_error_frame_is_ignored(self) -> None:
        peer = self.peer()
        peer.send_json(MessageType.ERROR, {"code": "X"})
        self.assertEqual(peer.replies(), [])
        self.assertFalse(peer.closing)
        peer.send(encode(MessageType.HEARTBEAT))
        self.assertEqual(len(peer.received()), 1)


class FatalErrorTests(ProtocolTestCase):
    HEARTBEAT = encode(MessageType.HEARTBEAT)

    def assert_fatal(self, violation: bytes, code: ErrorCode) -> StringConnection:
        peer = self.joined("r")
        # A heartbeat before the violation is answered; one after it is not.
        peer.send(self.HEARTBEAT + violation + self.HEARTBEAT)
        replies = peer.replies()
        self.assertEqual(replies[0], (MessageType.HEARTBEAT, b""))
        self.assertEqual(len(replies), 2, replies)
        self.assert_error(replies[1], code)
        self.assertTrue(peer.closing)
        peer.send(self.HEARTBEAT)
        self.assertEqual(peer.received(), [])
        return peer

    def test_length_below_three(self) -> None:
        self.assert_fatal(struct.pack("!IBB", 2, 1, 5), ErrorCode.INVALID_FRAME)

    def test_reserved_flags(self) -> None:
        self.assert_fatal(encode(MessageType.HEARTBEAT, 0x10), ErrorCode.INVALID_FRAME)

    def test_json_and_binary(self) -> None:
        self.assert_fatal(encode(MessageType.MESSAGE, 0x03, b"{}"), ErrorCode.INVALID_FRAME)

    def test_compression_not_negotiated(self) -> None:
        self.assert_fatal(encode(MessageType.MESSAGE, 0x05, b"x"), ErrorCode.INVALID_FRAME)

    def test_bad_binary_layout(self) -> None:
        self.assert_fatal(
            encode(MessageType.MESSAGE, Flags.BINARY, b"\x00\x09r"), ErrorCode.INVALID_FRAME
        )

    def test_frame_too_large(self) -> None:
        self.assert_fatal(struct.pack("!I", self.config.max_frame_size + 1), ErrorCode.FRAME_TOO_LARGE)

    def test_unsupported_version(self) -> None:
        self.assert_fatal(struct.pack("!IBBB", 3, 2, 5, 0), ErrorCode.UNSUPPORTED_VERSION)

    def test_unknown_message_type(self) -> None:
        self.assert_fatal(encode(0x42), ErrorCode.UNKNOWN_MESSAGE_TYPE)

    def test_parse_error(self) -> None:
        self.assert_fatal(encode(MessageType.JOIN_ROOM, Flags.JSON, b"{nope"), ErrorCode.PARSE_ERROR)

    def test_parse_error_in_a_message(self) -> None:
        self.assert_fatal(encode(MessageType.MESSAGE, Flags.JSON, b"\xff"), ErrorCode.PARSE_ERROR)

    def test_close_is_forced_when_the_peer_does_not_read(self) -> None:
        peer = self.assert_fatal(encode(0x42), ErrorCode.UNKNOWN_MESSAGE_TYPE)
        self.assertFalse(peer.transport.disconnected)
        self.clock.advance(CLOSE_GRACE_SECONDS)
        self.assertTrue(peer.transport.disconnected)

    def test_a_closing_connection_is_sent_no_second_error(self) -> None:
        peer = self.assert_fatal(encode(0x42), ErrorCode.UNKNOWN_MESSAGE_TYPE)
        self.factory.shutdown()
        self.assertEqual(peer.received(), [])

    def test_too_many_connections(self) -> None:
        factory = RelayFactory(RelayConfig(max_connections=1), reactor=self.clock)
        first, second = StringConnection(factory), StringConnection(factory)
        self.assertFalse(first.closing)
        self.assert_error(second.only_reply(), ErrorCode.TOO_MANY_CONNECTIONS)
        self.assertTrue(second.closing)
        second.protocol.connectionLost(connectionDone)
        self.assertEqual(factory.connections, {first.protocol})


class BackpressureTests(ProtocolTestCase):
    def test_pause_drains_and_resume_opens(self) -> None:
        alice = self.joined()
        bob = self.joined()
        bob.protocol.pauseProducing()
        self.assertEqual(bob.protocol.state, State.DRAINING)
        for n in range(3):
            alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": n})
        self.assertEqual(bob.received(), [])
        # Inbound frames are still processed while draining.
        bob.send(encode(MessageType.HEARTBEAT))
        bob.protocol.resumeProducing()
        self.assertEqual(bob.protocol.state, State.OPEN)
        replies = bob.replies()
        self.assertEqual([body["content"] for _, body in replies[:3]], [0, 1, 2])
        self.assertEqual(replies[3], (MessageType.HEARTBEAT, b""))

    def test_slow_consumer_is_cut_off_and_others_still_served(self) -> None:
        alice = self.joined()
        slow = self.joined()
        fast = self.joined()
        slow.protocol.pauseProducing()
        message = encode_json(MessageType.MESSAGE, {"room": "lobby", "content": "x" * 1000})
        for _ in range(11):
            alice.send(message)
        self.assert_error(slow.only_reply(), ErrorCode.SLOW_CONSUMER)
        self.assertTrue(slow.transport.disconnected)
        self.assertEqual(len(fast.received()), 11)
        self.assertFalse(alice.closing)
        alice.send(message)
        self.assertEqual(len(fast.received()), 1)
        self.assertEqual(slow.received(), [])

    def test_slow_consumer_queue_is_released_at_the_cut_off(self) -> None:
        alice = self.joined()
        slow = self.joined()
        slow.protocol.pauseProducing()
        message = encode_json(MessageType.MESSAGE, {"room": "lobby", "content": "x" * 1000})
        for _ in range(9):
            alice.send(message)
        self.assertGreater(slow.protocol.queued_bytes, 9000)
        alice.send(message * 2)
        # The transport has not reported the close yet: the memory is free now.
        self.assertTrue(slow.transport.disconnecting)
        self.assertEqual(slow.protocol.queued_bytes, 0)

    def test_nothing_is_handled_after_a_cut_off_in_the_same_read(self) -> None:
        slow = self.joined(userId="slow")
        bob = self.joined()
        slow.protocol.pauseProducing()
        # The second echo overflows the 10 000 byte queue.
        echo = encode(MessageType.HEARTBEAT, Flags.BINARY, b"x" * 6000)
        slow.send(
            echo
            + echo
            + encode_json(MessageType.MESSAGE, {"room": "lobby", "content": "after"})
            + encode_json(MessageType.JOIN_ROOM, {"room": "after"})
        )
        self.assert_error(slow.only_reply(), ErrorCode.SLOW_CONSUMER)
        self.assertEqual(bob.replies(), [])
        self.assertNotIn("after", self.factory.registry)

    def test_frames_queued_before_a_pause_wait_for_the_resume(self) -> None:
        alice = self.joined()
        bob = self.joined()
        # The transport may pause its producer between a queueing and the flush.
        bob.protocol.enqueue(encode(MessageType.HEARTBEAT))
        bob.protocol.pauseProducing()
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": 1})
        self.assertEqual(bob.transport.value(), b"")
        bob.protocol.resumeProducing()
        self.assertEqual(
            [t for t, _ in bob.replies()], [MessageType.HEARTBEAT, MessageType.MESSAGE]
        )

    def test_stop_producing_drops_the_queue(self) -> None:
        alice = self.joined()
        bob = self.joined()
        bob.protocol.pauseProducing()
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": 1})
        self.assertGreater(bob.protocol.queued_bytes, 0)
        bob.protocol.stopProducing()
        self.assertEqual(bob.protocol.queued_bytes, 0)
        bob.protocol.resumeProducing()
        self.assertEqual(bob.received(), [])

    def test_queue_below_the_limit_is_kept(self) -> None:
        alice = self.joined()
        slow = self.joined()
        slow.protocol.pauseProducing()
        message = encode_json(MessageType.MESSAGE, {"room": "lobby", "content": "x" * 1000})
        for _ in range(9):
            alice.send(message)
        self.assertFalse(slow.closing)
        slow.protocol.resumeProducing()
        self.assertEqual(len(slow.received()), 9)


class LifecycleTests(ProtocolTestCase):
    def test_membership_is_cleaned_up_exactly_once(self) -> None:
        alice = self.joined("a")
        alice.send_json(MessageType.JOIN_ROOM, {"room": "b"})
        alice.received()
        bob = self.joined("a")
        alice.protocol.connectionLost(connectionDone)
        alice.protocol.connectionLost(connectionDone)
        self.assertEqual(alice.protocol.state, State.CLOSED)
        self.assertNotIn("b", self.factory.registry)
        self.assertEqual(len(self.factory.registry.get("a")), 1)
        self.assertEqual(self.factory.connections, {bob.protocol})
        bob.send_json(MessageType.MESSAGE, {"room": "a", "content": 1})
        self.assertEqual(alice.received(), [])

    def test_nothing_is_written_after_close(self) -> None:
        alice = self.joined()
        bob = self.joined()
        bob.protocol.connectionLost(connectionDone)
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": 1})
        bob.protocol.enqueue(encode(MessageType.HEARTBEAT))
        bob.protocol.flush()
        self.assertEqual(bob.received(), [])

    def test_closing_releases_the_queue_and_the_rooms(self) -> None:
        alice = self.joined("a")
        bob = self.joined("a")
        bob.send_json(MessageType.JOIN_ROOM, {"room": "b"})
        bob.received()
        bob.protocol.pauseProducing()
        alice.send_json(MessageType.MESSAGE, {"room": "a", "content": 1})
        self.assertGreater(bob.protocol.queued_bytes, 0)
        bob.protocol.connectionLost(connectionDone)
        self.assertEqual(bob.protocol.queued_bytes, 0)
        self.assertEqual(bob.protocol.rooms, set())

    def test_a_second_connection_lost_is_silent(self) -> None:
        # Wrapping transports may report the loss twice.
        peer = self.joined()
        peer.protocol.connectionLost(connectionDone)
        with capturedLogs() as events:
            peer.protocol.connectionLost(connectionDone)
        self.assertEqual(events, [])

    def test_illegal_transition_is_logged_as_a_bug(self) -> None:
        peer = self.peer()
        peer.protocol.connectionLost(connectionDone)
        with capturedLogs() as events:
            peer.protocol.resumeProducing()
            self.assertFalse(peer.protocol._transition(State.OPEN))
        self.assertEqual(peer.protocol.state, State.CLOSED)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.critical])

    def test_transitions_are_logged_only_with_debug(self) -> None:
        for debug, expected in ((False, 0), (True, 2)):
            factory = RelayFactory(RelayConfig(debug=debug), reactor=self.clock)
            with capturedLogs() as events:
                peer = StringConnection(factory)
                peer.protocol.pauseProducing()
            transitions = [e for e in events if "state" in e["log_format"]]
            self.assertEqual(len(transitions), expected)

    def test_debug_logs_every_frame_in_and_out(self) -> None:
        factory = RelayFactory(RelayConfig(debug=True), reactor=self.clock)
        peer = StringConnection(factory)
        with capturedLogs() as events:
            peer.send(encode(MessageType.HEARTBEAT, Flags.BINARY, b"abc"))
        traces = [e for e in events if e.get("direction")]
        self.assertEqual([e["direction"] for e in traces], ["in", "out"])
        self.assertEqual(traces[0]["size"], 3)
        self.assertEqual(traces[0]["conn"], peer.protocol.connection_id)

    def test_debug_traces_every_delivery_to_every_member(self) -> None:
        factory = RelayFactory(RelayConfig(debug=True), reactor=self.clock)
        alice, bob, carol = (StringConnection(factory) for _ in range(3))
        for peer in (alice, bob, carol):
            peer.send_json(MessageType.JOIN_ROOM, {"room": "lobby"})
        with capturedLogs() as events:
            alice.send(
                encode_json(MessageType.MESSAGE, {"room": "lobby", "content": 1})
                + encode_json(MessageType.MESSAGE, {"room": "lobby", "content": 2})
            )
        traced = [e["conn"] for e in events if e.get("direction") == "out"]
        members = [bob.protocol.connection_id, carol.protocol.connection_id]
        self.assertEqual(sorted(traced), sorted(members * 2))
        self.assertEqual(bob.contents()[-2:], [1, 2])

    def test_debug_traces_nothing_for_a_closing_connection(self) -> None:
        factory = RelayFactory(RelayConfig(debug=True), reactor=self.clock)
        alice, bob = StringConnection(factory), StringConnection(factory)
        for peer in (alice, bob):
            peer.send_json(MessageType.JOIN_ROOM, {"room": "lobby"})
        # Fatal: bob is closing, and a member until its transport is gone.
        bob.send(encode(0x42))
        with capturedLogs() as events:
            alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": 1})
        traced = [e["conn"] for e in events if e.get("direction") == "out"]
        self.assertNotIn(bob.protocol.connection_id, traced)

    def test_no_per_frame_logging_without_debug(self) -> None:
        alice = self.joined()
        with capturedLogs() as events:
            alice.send(encode(MessageType.HEARTBEAT) * 10)
            alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": 1})
        self.assertEqual(events, [])


class ShutdownTests(ProtocolTestCase):
    def test_every_client_is_told_and_closed(self) -> None:
        peers = [self.joined() for _ in range(3)]
        done = self.factory.shutdown()
        for peer in peers:
            self.assert_error(peer.only_reply(), ErrorCode.SERVER_SHUTDOWN)
            self.assertTrue(peer.closing)
        self.assertNoResult(done)
        for peer in peers:
            peer.protocol.connectionLost(connectionDone)
        self.successResultOf(done)

    def test_shutdown_waits_for_the_last_client_not_the_first(self) -> None:
        peers = [self.joined() for _ in range(3)]
        done = self.factory.shutdown()
        for peer in peers[:2]:
            peer.protocol.connectionLost(connectionDone)
            self.assertNoResult(done)
        peers[2].protocol.connectionLost(connectionDone)
        self.successResultOf(done)

    def test_requests_after_shutdown_began_are_not_handled(self) -> None:
        alice = self.joined()
        self.factory.shutdown()
        alice.received()
        alice.send_json(MessageType.JOIN_ROOM, {"room": "late"})
        self.assertEqual(alice.received(), [])
        self.assertNotIn("late", self.factory.registry)
        self.assertEqual(alice.protocol.rooms, {"lobby"})

    def test_clients_that_linger_are_aborted(self) -> None:
        peer = self.joined()
        done = self.factory.shutdown()
        self.clock.advance(SHUTDOWN_GRACE_SECONDS)
        self.assertTrue(peer.transport.disconnected)
        peer.protocol.connectionLost(connectionDone)
        self.successResultOf(done)


class SummaryTests(ProtocolTestCase):
    def test_summary_counts_the_run(self) -> None:
        alice, bob, carol = (StringConnection(self.factory) for _ in range(3))
        reads = [
            (alice, encode_json(MessageType.JOIN_ROOM, {"room": "a"})
             + encode_json(MessageType.JOIN_ROOM, {"room": "b"})),
            (bob, encode_json(MessageType.JOIN_ROOM, {"room": "a"})),
            (carol, encode(MessageType.HEARTBEAT)),
            # Two publishes in one read: bob's deliveries share one entry.
            (alice, encode_json(MessageType.MESSAGE, {"room": "a", "content": 1})
             + encode_json(MessageType.MESSAGE, {"room": "a", "content": 2})),
            (bob, encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("a", b"z"))),
        ]
        for peer, data in reads:
            peer.send(data)
        carol.protocol.connectionLost(connectionDone)
        StringConnection(self.factory)
        self.clock.advance(5)
        written = [peer.transport.value() for peer in (alice, bob, carol)]
        self.assertEqual(
            self.factory.summary(),
            {
                "uptime": 5.0,
                "connections_total": 4,
                "connections_peak": 3,
                "rooms_now": 2,
                "rooms_peak": 2,
                "messages_published": 3,
                "frames_in": 7,
                "frames_out": 7,  # alice 2 acks and 1 delivery, bob 1 and 2, carol 1
                "bytes_in": sum(len(data) for _, data in reads),
                "bytes_out": sum(map(len, written)),
            },
        )
