"""The history extension on one node: kept deliveries, epochs, replay by since."""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from relay.server.factory import RelayConfig, RelayFactory
from relay.server.history import HistoryStore, with_fields
from relay.wire import Flags, MessageType, encode, encode_binary_message, encode_json, loads
from tests.support import StringConnection


def history_factory(**config: Any) -> tuple[RelayFactory, Clock]:
    clock = Clock()
    clock.advance(1_000_000)
    settings = {"history": 5, "history_ttl": 60, **config}
    return RelayFactory(RelayConfig(**settings), reactor=clock), clock


def member(factory: RelayFactory, user: str, room: str = "lobby", features: tuple[str, ...] = ("history",),
           since: dict[str, Any] | None = None) -> tuple[StringConnection, list[tuple[int, Any]]]:
    connection = StringConnection(factory)
    connection.send_json(MessageType.HELLO, {"userId": user, "features": list(features)})
    join: dict[str, Any] = {"room": room, "id": 1}
    if since is not None:
        join["since"] = since
    connection.send_json(MessageType.JOIN_ROOM, join)
    return connection, connection.replies()[1:]


def publish(connection: StringConnection, *contents: Any, room: str = "lobby") -> None:
    connection.send(b"".join(encode_json(MessageType.MESSAGE, {"room": room, "content": c}) for c in contents))


class WithFieldsTests(unittest.TestCase):
    def test_fields_are_inserted_before_the_closing_brace_with_the_length_fixed(self) -> None:
        frame = encode_json(MessageType.MESSAGE, {"room": "a", "seq": 1})
        spliced = with_fields(frame, b',"epoch":"e"')
        self.assertEqual(spliced, encode_json(MessageType.MESSAGE, {"room": "a", "seq": 1, "epoch": "e"}))


class ProtocolTests(unittest.TestCase):
    def test_history_is_offered_only_when_the_server_keeps_history(self) -> None:
        off = RelayFactory(RelayConfig(), reactor=Clock())
        connection = StringConnection(off)
        connection.send_json(MessageType.HELLO, {"features": ["history", "acks"]})
        self.assertEqual(connection.only_reply()[1]["features"], ["acks"])
        on, _ = history_factory()
        connection = StringConnection(on)
        connection.send_json(MessageType.HELLO, {"features": ["history"]})
        self.assertEqual(connection.only_reply()[1]["features"], ["history"])

    def test_join_ack_of_a_history_connection_carries_seq_and_epoch(self) -> None:
        factory, _ = history_factory()
        alice, _ = member(factory, "alice")
        publish(alice, "one", "two")
        _, replies = member(factory, "bob")
        (type_, ack), = replies
        self.assertEqual((type_, ack["seq"], ack["status"]), (MessageType.JOIN_ROOM, 2, "joined"))
        self.assertIsInstance(ack["epoch"], str)
        self.assertNotIn("recovered", ack)

    def test_deliveries_carry_the_epoch_only_to_history_connections(self) -> None:
        factory, _ = history_factory()
        alice, _ = member(factory, "alice")
        plain, _ = member(factory, "carol", features=())
        bob, replies = member(factory, "bob")
        epoch = replies[0][1]["epoch"]
        publish(alice, "hi")
        (_, delivery), = bob.replies()
        self.assertEqual((delivery["content"], delivery["seq"], delivery["epoch"]), ("hi", 1, epoch))
        self.assertNotIn("replayed", delivery)
        (_, v1), = plain.replies()
        self.assertNotIn("epoch", v1)
        self.assertEqual(set(v1), {"room", "from", "content", "timestamp", "seq"})

    def test_join_with_since_replays_what_was_missed_before_the_ack(self) -> None:
        factory, _ = history_factory()
        alice, _ = member(factory, "alice")
        bob, replies = member(factory, "bob")
        epoch = replies[0][1]["epoch"]
        publish(alice, 1)
        self.assertEqual([body["seq"] for _, body in bob.replies()], [1])
        bob.protocol.transport.loseConnection()
        bob.protocol.connectionLost()
        publish(alice, 2, 3)
        _, replies = member(factory, "bob", since={"seq": 1, "epoch": epoch})
        types = [type_ for type_, _ in replies]
        self.assertEqual(types, [MessageType.MESSAGE, MessageType.MESSAGE, MessageType.JOIN_ROOM])
        self.assertEqual([(b["content"], b["seq"], b["replayed"], b["epoch"]) for _, b in replies[:2]],
                         [(2, 2, True, epoch), (3, 3, True, epoch)])
        ack = replies[2][1]
        self.assertEqual((ack["recovered"], ack["replayed"], ack["seq"], ack["epoch"]), (True, 2, 3, epoch))

    def test_since_up_to_date_replays_nothing_and_recovers(self) -> None:
        factory, _ = history_factory()
        alice, replies = member(factory, "alice")
        publish(alice, 1)
        epoch = replies[0][1]["epoch"]
        _, replies = member(factory, "bob", since={"seq": 1, "epoch": epoch})
        (_, ack), = replies
        self.assertEqual((ack["recovered"], ack["replayed"]), (True, 0))

    def test_more_than_n_missed_is_not_recovered_but_the_kept_ones_are_replayed(self) -> None:
        factory, _ = history_factory(history=3)
        alice, replies = member(factory, "alice")
        epoch = replies[0][1]["epoch"]
        publish(alice, *range(1, 8))
        _, replies = member(factory, "bob", since={"seq": 2, "epoch": epoch})
        self.assertEqual([b.get("content") for _, b in replies[:-1]], [5, 6, 7])
        self.assertEqual(replies[-1][1]["recovered"], False)
        _, replies = member(factory, "carol", since={"seq": 4, "epoch": epoch})
        self.assertEqual(replies[-1][1]["recovered"], True)

    def test_deliveries_older_than_the_ttl_are_not_replayed(self) -> None:
        factory, clock = history_factory(history_ttl=60)
        alice, replies = member(factory, "alice")
        epoch = replies[0][1]["epoch"]
        publish(alice, "old")
        clock.advance(45)
        publish(alice, "new")
        clock.advance(30)  # "old" is 75 s old now, "new" 30 s
        _, replies = member(factory, "bob", since={"seq": 0, "epoch": epoch})
        self.assertEqual([b.get("content") for _, b in replies[:-1]], ["new"])
        self.assertEqual(replies[-1][1]["recovered"], False)

    def test_a_room_emptied_and_recreated_past_its_ttl_has_a_new_epoch(self) -> None:
        factory, clock = history_factory(history_ttl=60)
        alice, replies = member(factory, "alice")
        epoch = replies[0][1]["epoch"]
        publish(alice, "before")
        alice.protocol.connectionLost()
        self.assertIsNone(factory.registry.get("lobby"))
        clock.advance(30)
        # Within the TTL the history (and seq) survive the empty room.
        _, replies = member(factory, "bob", since={"seq": 0, "epoch": epoch})
        self.assertEqual([b.get("content") for _, b in replies[:-1]], ["before"])
        self.assertEqual((replies[-1][1]["epoch"], replies[-1][1]["recovered"]), (epoch, True))
        factory.registry.get("lobby")  # bob is in it
        for connection in list(factory.connections):
            connection.connectionLost()
        clock.advance(61)
        _, replies = member(factory, "carol", since={"seq": 1, "epoch": epoch})
        (_, ack), = replies
        self.assertNotEqual(ack["epoch"], epoch)
        self.assertEqual((ack["recovered"], ack["replayed"], ack["seq"]), (False, 0, 0))

    def test_the_memory_budget_evicts_the_least_recently_used_room_first(self) -> None:
        factory, _ = history_factory(history=100, history_memory=4000)
        alice, replies = member(factory, "alice", room="old")
        old_epoch = replies[0][1]["epoch"]
        publish(alice, *(["x" * 100] * 5), room="old")
        alice.send_json(MessageType.JOIN_ROOM, {"room": "new"})
        new_epoch = alice.replies()[0][1]["epoch"]
        publish(alice, *(["y" * 100] * 5), room="new")
        self.assertLessEqual(factory.history.store.size, 4000)
        _, replies = member(factory, "bob", room="old", since={"seq": 0, "epoch": old_epoch})
        self.assertEqual(replies[-1][1]["recovered"], False)
        _, replies = member(factory, "carol", room="new", since={"seq": 0, "epoch": new_epoch})
        self.assertEqual(replies[-1][1]["recovered"], True)
        self.assertEqual(len(replies) - 1, 5)

    def test_another_epoch_replays_nothing_and_is_not_recovered(self) -> None:
        factory, _ = history_factory()
        alice, _ = member(factory, "alice")
        publish(alice, 1)
        _, replies = member(factory, "bob", since={"seq": 0, "epoch": "from-a-previous-run"})
        (_, ack), = replies
        self.assertEqual((ack["recovered"], ack["replayed"], ack["seq"]), (False, 0, 1))

    def test_a_seq_ahead_of_the_room_is_not_recovered(self) -> None:
        factory, _ = history_factory()
        alice, replies = member(factory, "alice")
        publish(alice, 1)
        _, replies = member(factory, "bob", since={"seq": 9, "epoch": replies[0][1]["epoch"]})
        (_, ack), = replies
        self.assertEqual((ack["recovered"], ack["replayed"]), (False, 0))

    def test_a_malformed_since_is_a_bad_request_and_does_not_join(self) -> None:
        factory, _ = history_factory()
        for since in ({"seq": -1, "epoch": "e"}, {"seq": 1}, {"seq": "1", "epoch": "e"}, "x",
                      {"seq": 1, "epoch": "e" * 65}, {"seq": True, "epoch": "e"}):
            connection, replies = member(factory, "bob", since=since)
            (type_, error), = replies
            self.assertEqual((type_, error["code"], error["id"]), (MessageType.ERROR, "BAD_REQUEST", 1))
            self.assertEqual(connection.protocol.rooms, set())

    def test_since_without_history_negotiated_is_ignored(self) -> None:
        factory, _ = history_factory()
        _, replies = member(factory, "bob", features=(), since={"seq": "nonsense"})
        (type_, ack), = replies
        self.assertEqual(ack, {"status": "joined", "room": "lobby", "members": 1, "id": 1})

    def test_binary_messages_take_a_seq_but_are_not_kept_nor_missed(self) -> None:
        factory, _ = history_factory()
        alice, replies = member(factory, "alice")
        epoch = replies[0][1]["epoch"]
        bob, _ = member(factory, "bob")
        alice.send(encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("lobby", b"\x01")))
        publish(alice, "after")
        frames = bob.received()
        self.assertEqual(frames[0].flags, Flags.BINARY)  # binary deliveries are as in v1
        self.assertEqual(loads(frames[1].payload)["seq"], 2)
        _, replies = member(factory, "carol", since={"seq": 0, "epoch": epoch})
        self.assertEqual([b["seq"] for _, b in replies[:-1]], [2])
        self.assertEqual(replies[-1][1]["recovered"], True)


class StoreTests(unittest.TestCase):
    def test_the_store_never_exceeds_its_memory_budget(self) -> None:
        clock = Clock()
        store = HistoryStore(limit=1000, ttl=300, memory=10_000, clock=clock.seconds)
        frame = encode_json(MessageType.MESSAGE, {"content": "x" * 200, "seq": 1})
        for index in range(50):
            record = store.open(f"room-{index % 7}")
            for seq in range(10):
                store.keep(record, seq + 1, frame)
                self.assertLessEqual(store.size, 10_000)
        self.assertGreater(store.evicted, 0)

    def test_rooms_gone_past_their_ttl_are_forgotten(self) -> None:
        clock = Clock()
        store = HistoryStore(limit=10, ttl=60, memory=10**6, clock=clock.seconds)
        for index in range(100):
            store.close(store.open(f"gone-{index}"))
        self.assertEqual(len(store), 100)
        clock.advance(61)
        store.close(store.open("another"))
        self.assertEqual(len(store), 1)


# A v1 session captured from the server before the history extension existed.
ALICE_CAPTURE = bytes.fromhex(
    "0000009c0101017b22737461747573223a22636f6e6e6563746564222c22636f6e6e656374696f6e4964223a22636f6e"
    "6e31222c22757365724964223a22616c696365222c2273657276657256657273696f6e223a22302e312e30222c226865"
    "61727462656174496e74657276616c223a33302c226d61784672616d6553697a65223a313034383537362c2266656174"
    "75726573223a5b5d2c226964223a317d000000370102017b22737461747573223a226a6f696e6564222c22726f6f6d22"
    "3a2274657374222c226d656d62657273223a312c226964223a327d000000370102017b22737461747573223a226a6f69"
    "6e6564222c22726f6f6d223a2274657374222c226d656d62657273223a322c226964223a347d0000000d0105017b2270"
    "696e67223a317d000000290103017b22737461747573223a226c656674222c22726f6f6d223a2274657374222c226964"
    "223a357d"
)
BOB_CAPTURE = bytes.fromhex(
    "0000009a0101017b22737461747573223a22636f6e6e6563746564222c22636f6e6e656374696f6e4964223a22636f6e"
    "6e32222c22757365724964223a22626f62222c2273657276657256657273696f6e223a22302e312e30222c2268656172"
    "7462656174496e74657276616c223a33302c226d61784672616d6553697a65223a313034383537362c22666561747572"
    "6573223a5b5d2c226964223a317d000000370102017b22737461747573223a226a6f696e6564222c22726f6f6d223a22"
    "74657374222c226d656d62657273223a322c226964223a327d0000005b0104017b22726f6f6d223a2274657374222c22"
    "66726f6d223a22616c696365222c22636f6e74656e74223a7b2274657874223a226869227d2c2274696d657374616d70"
    "223a313739353330353831333638332c22736571223a317d000000120104020004746573740005616c6963650102"
)


def v1_session(config: RelayConfig) -> list[bytes]:
    """What alice and bob, two v1 clients that ask for no feature, receive."""
    clock = Clock()
    clock.advance(1795305813.683)
    factory = RelayFactory(config, reactor=clock)
    ids = itertools.count(1)
    factory.new_connection_id = lambda: f"conn{next(ids)}"
    wires = []
    protocols = []
    for user in ("alice", "bob"):
        transport = StringTransport()
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        protocols.append(protocol)
        wires.append(transport)
        protocol.dataReceived(encode_json(MessageType.HELLO, {"userId": user, "id": 1})
                              + encode_json(MessageType.JOIN_ROOM, {"room": "test", "id": 2}))
    alice, bob = protocols
    alice.dataReceived(encode_json(MessageType.MESSAGE, {"room": "test", "content": {"text": "hi"}, "id": 3})
                       + encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("test", b"\x01\x02"))
                       + encode_json(MessageType.JOIN_ROOM, {"room": "test", "since": {"seq": 0, "epoch": "x"}, "id": 4})
                       + encode_json(MessageType.HEARTBEAT, {"ping": 1})
                       + encode_json(MessageType.LEAVE_ROOM, {"room": "test", "id": 5}))
    bob.dataReceived(encode_json(MessageType.MESSAGE, {"room": "test", "content": None}))
    return [w.value() for w in wires]


class V1ByteIdentityTests(unittest.TestCase):
    def test_a_v1_session_is_byte_identical_with_history_off_and_on(self) -> None:
        for config in (RelayConfig(), RelayConfig(history=5)):
            self.assertEqual(v1_session(config), [ALICE_CAPTURE, BOB_CAPTURE], config)


class ReplayBudgetTests(unittest.TestCase):
    def test_a_replay_past_half_of_max_pending_sends_the_newest_and_is_not_recovered(self) -> None:
        factory, _ = history_factory(history=100, max_pending=20_000)
        alice, replies = member(factory, "alice")
        epoch = replies[0][1]["epoch"]
        publish(alice, *[f"{index:04d}" + "x" * 1000 for index in range(30)])
        _, replies = member(factory, "bob", since={"seq": 0, "epoch": epoch})
        replayed, ack = replies[:-1], replies[-1][1]
        self.assertEqual((ack["recovered"], ack["replayed"]), (False, len(replayed)))
        self.assertLess(len(replayed), 30)
        self.assertEqual([b["seq"] for _, b in replayed], list(range(31 - len(replayed), 31)))
        self.assertLessEqual(sum(len(b["content"]) for _, b in replayed), 10_000)


class GrantsAndBoundsTests(unittest.TestCase):
    def test_a_join_with_since_outside_the_grant_is_forbidden_and_replays_nothing(self) -> None:
        from relay.server.auth import Authenticator, JwtVerifier
        from tests.authkeys import KeyFiles, claims, mint

        clock = Clock()
        clock.advance(1_000_000)
        authenticator = Authenticator(None, JwtVerifier(KeyFiles(self).secret(), leeway=0.0))
        factory = RelayFactory(RelayConfig(history=5), reactor=clock, auth=authenticator)
        insider = StringConnection(factory)
        insider.send_json(MessageType.HELLO, {"token": mint(claims(now=clock.seconds(), sub="in", rooms=["secret"])),
                                              "features": ["history"]})
        insider.send_json(MessageType.JOIN_ROOM, {"room": "secret"})
        epoch = insider.replies()[1][1]["epoch"]
        publish(insider, "classified", room="secret")
        outsider = StringConnection(factory)
        outsider.send_json(MessageType.HELLO, {"token": mint(claims(now=clock.seconds(), sub="out", rooms=["lobby"])),
                                               "features": ["history"]})
        outsider.received()
        outsider.send_json(MessageType.JOIN_ROOM, {"room": "secret", "since": {"seq": 0, "epoch": epoch}, "id": 2})
        (type_, error), = outsider.replies()
        self.assertEqual((type_, error["code"], error["id"]), (MessageType.ERROR, "FORBIDDEN", 2))

    def test_a_history_connection_stays_under_the_shared_keys_limit(self) -> None:
        factory, _ = history_factory()
        connection, _ = member(factory, "alice")
        publish(connection, "x")
        self.assertLessEqual(len(vars(connection.protocol)), 29)
