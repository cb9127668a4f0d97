"""Hypothesis stateful tests of whole connections against a model of rooms.

Random sequences of valid and invalid requests, from several connections
at once, against a model of who is in which room: every reply must be the
one the model predicts, every delivery must reach exactly the model's other
members, and the server's rooms must always be the model's.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from twisted.internet.task import Clock
from twisted.trial import unittest

from relay.requests import normalize_room_name
from relay.server.factory import RelayConfig, RelayFactory
from relay.server.protocol import State
from relay.wire import Flags, MessageType, encode, encode_binary_message, encode_json
from tests.support import StringConnection

MAX_ROOMS = 3
ROOM_NAMES = st.sampled_from(["a", " a ", "b", "c", "d", "\x07bad", "", "x" * 65, "é"])
GARBAGE = st.sampled_from(
    [
        b"\x00\x00\x00\x02\x01\x05\x00",  # length below 3
        b"\x00\x00\x00\x03\x09\x05\x00",  # version 9
        b"\x00\x00\x00\x03\x01\x63\x00",  # unknown type
        b"\x00\x00\x00\x04\x01\x02\x01{",  # JSON that is not
        b"\x00\x00\x00\x03\x01\x05\x03",  # JSON and BINARY
        b"\x7f\xff\xff\xff",  # past the frame limit
    ]
)


class RelayMachine(RuleBasedStateMachine):
    """Connections and rooms, checked step by step against the model."""

    connections = Bundle("connections")

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        config = RelayConfig(max_rooms=MAX_ROOMS, join_rate=None, hello_timeout=10, idle_timeout=30)
        self.factory = RelayFactory(config, reactor=self.clock)
        self.model: dict[str, set[StringConnection]] = {}
        self.open: set[StringConnection] = set()
        self.joined: dict[StringConnection, set[str]] = {}

    # Rules

    @rule(target=connections)
    def connect(self) -> StringConnection:
        peer = StringConnection(self.factory)
        self.open.add(peer)
        self.joined[peer] = set()
        return peer

    @rule(peer=connections, name=ROOM_NAMES, request_id=st.one_of(st.none(), st.integers(0, 9), st.text(max_size=3)))
    def join(self, peer: StringConnection, name: str, request_id: Any) -> None:
        body: dict[str, Any] = {"room": name}
        if request_id is not None:
            body["id"] = request_id
        self.send(peer, encode_json(MessageType.JOIN_ROOM, body))
        if peer not in self.open:
            return
        room = normalize_room_name(name)
        (type_, reply), = self.replies(peer)
        self.assertEqual(reply.get("id"), request_id)
        if room is None:
            self.assert_code(type_, reply, "INVALID_ROOM")
        elif room not in self.joined[peer] and len(self.joined[peer]) >= MAX_ROOMS:
            self.assert_code(type_, reply, "BAD_REQUEST")
        else:
            self.model.setdefault(room, set()).add(peer)
            self.joined[peer].add(room)
            assert type_ == MessageType.JOIN_ROOM, reply
            assert reply["members"] == len(self.model[room]), (reply, len(self.model[room]))

    @rule(peer=connections, name=ROOM_NAMES)
    def leave(self, peer: StringConnection, name: str) -> None:
        self.send(peer, encode_json(MessageType.LEAVE_ROOM, {"room": name}))
        if peer not in self.open:
            return
        room = normalize_room_name(name)
        (type_, reply), = self.replies(peer)
        if room is None:
            self.assert_code(type_, reply, "INVALID_ROOM")
            return
        assert (type_, reply["status"]) == (MessageType.LEAVE_ROOM, "left"), reply
        if room in self.joined[peer]:
            self.joined[peer].discard(room)
            self.model[room].discard(peer)
            if not self.model[room]:
                del self.model[room]

    @rule(peer=connections, name=ROOM_NAMES, content=st.one_of(st.integers(), st.text(max_size=5), st.none()), binary=st.booleans())
    def publish(self, peer: StringConnection, name: str, content: Any, binary: bool) -> None:
        if binary:
            frame = encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message(name, b"\x00data"))
        else:
            frame = encode_json(MessageType.MESSAGE, {"room": name, "content": content})
        self.send(peer, frame)
        if peer not in self.open:
            return
        room = normalize_room_name(name)
        members = self.model.get(room, set()) if room is not None else set()
        if peer not in members:
            (type_, reply), = self.replies(peer)
            self.assert_code(type_, reply, "INVALID_ROOM" if room is None else "NOT_IN_ROOM")
            for other in self.open - {peer}:
                assert other.received() == []
            return
        assert peer.received() == []  # no echo asked for
        for other in self.open - {peer}:
            frames = other.received()
            if other in members:
                assert len(frames) == 1 and frames[0].type == MessageType.MESSAGE, frames
                if not binary:
                    delivery = other_body(frames[0])
                    assert (delivery["room"], delivery["content"]) == (room, content), delivery
            else:
                assert frames == [], frames

    @rule(peer=connections, payload=st.binary(max_size=16))
    def heartbeat(self, peer: StringConnection, payload: bytes) -> None:
        self.send(peer, encode(MessageType.HEARTBEAT, 0 if not payload else Flags.BINARY, payload))
        if peer in self.open:
            (frame,) = peer.received()
            assert (frame.type, frame.payload) == (MessageType.HEARTBEAT, payload)

    @rule(peer=consumes(connections), garbage=GARBAGE)
    def violate(self, peer: StringConnection, garbage: bytes) -> None:
        self.send(peer, garbage)
        if peer in self.open:
            frames = peer.received()
            assert frames and frames[-1].type == MessageType.ERROR, frames
            assert b'"fatal":true' in frames[-1].payload
            assert peer.protocol.state is State.CLOSING
            self.close(peer)

    @rule(peer=consumes(connections))
    def disconnect(self, peer: StringConnection) -> None:
        if peer in self.open:
            self.close(peer)

    @rule(seconds=st.sampled_from([1.0, 5.0, 11.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        for peer in list(self.open):
            if peer.protocol.state is State.CLOSING:  # a timeout closed it
                frames = peer.received()
                assert frames and b"HEARTBEAT_TIMEOUT" in frames[-1].payload, frames
                self.close(peer)

    # Model upkeep

    def send(self, peer: StringConnection, data: bytes) -> None:
        if peer in self.open:
            peer.send(data)

    def close(self, peer: StringConnection) -> None:
        peer.protocol.connectionLost()
        self.open.discard(peer)
        for room in self.joined.pop(peer, set()):
            self.model[room].discard(peer)
            if not self.model[room]:
                del self.model[room]

    def replies(self, peer: StringConnection) -> list[tuple[int, Any]]:
        return peer.replies()

    @staticmethod
    def assert_code(type_: int, reply: dict[str, Any], code: str) -> None:
        assert type_ == MessageType.ERROR and reply["code"] == code and reply["fatal"] is False, reply

    @staticmethod
    def assertEqual(first: Any, second: Any) -> None:
        assert first == second, (first, second)

    # Invariants

    @invariant()
    def rooms_are_the_model(self) -> None:
        registry = self.factory.registry
        assert set(self.model) == {name for name in self.model if name in registry}
        assert len(registry) == len(self.model), (len(registry), self.model)
        for name, members in self.model.items():
            room = registry.get(name)
            assert room is not None and {m for m in room.members} == {p.protocol for p in members}

    @invariant()
    def connections_are_the_model(self) -> None:
        assert self.factory.connections == {p.protocol for p in self.open if p.protocol.state is not State.CLOSED}


def other_body(frame: Any) -> dict[str, Any]:
    from relay.wire import loads

    return loads(frame.payload)


RelayMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class RelayStatefulTests(RelayMachine.TestCase, unittest.SynchronousTestCase):
    """Runs the machine under trial as well as pytest."""

    def test_random_request_sequences_keep_the_model(self) -> None:
        self.runTest()
