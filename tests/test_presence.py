"""The presence and direct extensions on one node, over real loopback sockets
with raw frames: events, member lists, limits, direct messages, grants, and
nothing new for a client that asked for neither."""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from twisted.internet import endpoints, reactor
from twisted.trial import unittest

from relay import __version__
from relay.server.auth import ApiKeyFile, AuthConfigError, Authenticator, JwtVerifier, Unauthorized
from relay.server.factory import RelayConfig, RelayFactory
from relay.wire import ErrorCode, Flags, Frame, MessageType, encode, encode_json, loads
from tests.authkeys import SECRET, KeyFiles, claims, mint
from tests.support import FrameClient, IntegrationTestCase, connect_frame_client, wait_until

HEARTBEAT = (MessageType.HEARTBEAT, Flags.NONE, b"")
HEARTBEAT_FRAME = Frame(*HEARTBEAT)
PRESENCE = MessageType.PRESENCE


async def delivered(sender: FrameClient, receiver: FrameClient) -> list[tuple[int, Any]]:
    """What ``receiver`` got up to now, once the server has handled everything
    ``sender`` sent: a barrier on the sender, then one on the receiver."""
    await before_barrier(sender)
    return await before_barrier(receiver)


async def before_barrier(client: FrameClient) -> list[tuple[int, Any]]:
    """Every frame the server sends before the echo of a heartbeat sent now."""
    client.send_frame(*HEARTBEAT)
    frames = []
    while True:
        frame = await client.next_frame()
        if frame.type == MessageType.HEARTBEAT:
            return frames
        frames.append((frame.type, loads(frame.payload) if frame.is_json else frame.payload))


class PresenceCase(IntegrationTestCase):
    async def member(self, user: str, room: str | None = "lobby", features: tuple[str, ...] = ("presence",),
                     **hello: Any) -> FrameClient:
        client = await self.connect()
        ack = await client.hello(userId=user, features=list(features), **hello)
        client.connection_id = ack["connectionId"]
        if room is not None:
            await client.join(room)
        return client

    async def events(self, client: FrameClient) -> list[dict[str, Any]]:
        return [body for kind, body in await before_barrier(client) if kind == PRESENCE]


class PresenceEventTests(PresenceCase):
    async def test_join_and_leave_are_told_to_the_other_presence_members(self) -> None:
        alice = await self.member("alice")
        bob = await self.member("bob")
        self.assertEqual(
            await self.events(alice),
            [{"room": "lobby", "event": "join", "userId": "bob", "connectionId": bob.connection_id}],
        )
        self.assertEqual(await self.events(bob), [])  # not its own join
        await bob.request(MessageType.LEAVE_ROOM, {"room": "lobby"})
        self.assertEqual(
            await self.events(alice),
            [{"room": "lobby", "event": "leave", "userId": "bob", "connectionId": bob.connection_id}],
        )

    async def test_an_abrupt_disconnect_is_one_leave(self) -> None:
        alice = await self.member("alice")
        bob = await self.member("bob")
        await bob.join("second")
        await self.events(alice)
        await alice.join("second")
        bob.transport.abortConnection()
        await wait_until(lambda: len(self.factory.connections) == 1, "bob's connection to end")
        events = await self.events(alice)
        self.assertEqual(sorted((e["room"], e["event"], e["userId"]) for e in events),
                         [("lobby", "leave", "bob"), ("second", "leave", "bob")])

    async def test_joining_again_is_not_a_second_join(self) -> None:
        alice = await self.member("alice")
        bob = await self.member("bob")
        await bob.join("lobby")
        self.assertEqual([e["event"] for e in await self.events(alice)], ["join"])

    async def test_members_without_presence_get_no_presence_frame(self) -> None:
        plain = await self.member("plain", features=())
        await self.member("bob")
        client = await self.member("carol")
        await client.request(MessageType.LEAVE_ROOM, {"room": "lobby"})
        self.assertEqual(await before_barrier(plain), [])

    async def test_a_member_without_presence_is_still_seen_joining(self) -> None:
        alice = await self.member("alice")
        await self.member("plain", features=())
        self.assertEqual([e["userId"] for e in await self.events(alice)], ["plain"])

    async def test_presence_request_without_negotiation_is_fatal(self) -> None:
        client = await self.member("plain", features=())
        client.send(encode_json(PRESENCE, {"room": "lobby"}))
        kind, body = await client.next_json()
        self.assertEqual((kind, body["code"], body["fatal"]), (MessageType.ERROR, "UNKNOWN_MESSAGE_TYPE", True))
        await client.closed

    async def test_a_request_right_after_hello_in_the_same_read_is_answered(self) -> None:
        client = await self.connect()
        client.send(
            encode_json(MessageType.HELLO, {"userId": "quick", "features": ["presence"]})
            + encode_json(MessageType.JOIN_ROOM, {"room": "lobby"})
            + encode_json(PRESENCE, {"room": "lobby", "id": 5})
        )
        kinds = [(await client.next_json())[0] for _ in range(3)]
        self.assertEqual(kinds, [MessageType.HELLO, MessageType.JOIN_ROOM, PRESENCE])


class EventsLimitTests(PresenceCase):
    server_config = {"presence_events_limit": 2}

    async def test_no_events_in_a_room_past_the_limit(self) -> None:
        alice = await self.member("alice")
        await self.member("bob")
        self.assertEqual(len(await self.events(alice)), 1)
        await self.member("carol")  # three members: past the limit of 2
        self.assertEqual(await self.events(alice), [])


class MemberListTests(PresenceCase):
    async def ask(self, client: FrameClient, room: str = "lobby", **extra: Any) -> tuple[int, dict[str, Any]]:
        return await client.request(PRESENCE, {"room": room, **extra})

    async def test_list_counts_users_and_their_connections(self) -> None:
        alice = await self.member("alice")
        await self.member("bob", features=())
        await self.member("bob")
        await self.events(alice)
        kind, body = await self.ask(alice, id="who-1")
        self.assertEqual(kind, PRESENCE)
        self.assertEqual(body, {
            "room": "lobby",
            "members": [{"userId": "alice", "connections": 1}, {"userId": "bob", "connections": 2}],
            "count": 2,
            "id": "who-1",
        })

    async def test_list_needs_membership(self) -> None:
        alice = await self.member("alice")
        kind, body = await self.ask(alice, room="elsewhere", id=3)
        self.assertEqual((kind, body["code"], body["fatal"], body["id"]),
                         (MessageType.ERROR, "NOT_IN_ROOM", False, 3))
        kind, body = await self.ask(alice, room="\x00bad")
        self.assertEqual(body["code"], "INVALID_ROOM")

    async def test_list_refused_for_a_malformed_request(self) -> None:
        alice = await self.member("alice")
        kind, body = await alice.request(PRESENCE, {"id": 1})
        self.assertEqual((kind, body["code"]), (MessageType.ERROR, "BAD_REQUEST"))


class ListLimitTests(PresenceCase):
    server_config = {"presence_list_limit": 2}

    async def test_list_past_the_limit_is_truncated_with_the_full_count(self) -> None:
        alice = await self.member("alice")
        for user in ("dave", "bob", "carol"):
            await self.member(user, features=())
        await self.events(alice)
        kind, body = await alice.request(PRESENCE, {"room": "lobby"})
        self.assertEqual([m["userId"] for m in body["members"]], ["alice", "bob"])
        self.assertEqual((body["count"], body["truncated"]), (4, True))


class DirectTests(PresenceCase):
    async def test_direct_message_reaches_every_direct_connection_of_the_user(self) -> None:
        alice = await self.member("alice", room=None, features=("direct",))
        bob_one = await self.member("bob", room=None, features=("direct",))
        bob_two = await self.member("bob", room=None, features=("direct",))
        bob_plain = await self.member("bob", room=None, features=())
        alice.send_json(MessageType.MESSAGE, {"to": "bob", "content": {"hi": 1}})
        self.assertEqual(await before_barrier(alice), [])
        for bob in (bob_one, bob_two):
            [(kind, body)] = await before_barrier(bob)
            self.assertEqual(kind, MessageType.MESSAGE)
            self.assertEqual((body["to"], body["from"], body["content"]), ("bob", "alice", {"hi": 1}))
            self.assertIsInstance(body["timestamp"], int)
            self.assertNotIn("room", body)
        self.assertEqual(await before_barrier(bob_plain), [])

    async def test_a_user_with_no_direct_connection_is_offline(self) -> None:
        alice = await self.member("alice", room=None, features=("direct",))
        await self.member("bob", room=None, features=())
        kind, body = await alice.request(MessageType.MESSAGE, {"to": "bob", "content": "x", "id": 9})
        self.assertEqual((kind, body["code"], body["fatal"], body["id"]),
                         (MessageType.ERROR, "USER_OFFLINE", False, 9))

    async def test_acks_answer_a_delivered_direct_message(self) -> None:
        alice = await self.member("alice", room=None, features=("direct", "acks"))
        await self.member("bob", room=None, features=("direct",))
        kind, body = await alice.request(MessageType.MESSAGE, {"to": "bob", "content": "x", "id": "d1"})
        self.assertEqual((kind, body), (MessageType.MESSAGE, {"status": "published", "to": "bob", "id": "d1"}))

    async def test_direct_without_negotiation_is_a_bad_request(self) -> None:
        alice = await self.member("alice", room=None, features=())
        await self.member("bob", room=None, features=("direct",))
        kind, body = await alice.request(MessageType.MESSAGE, {"to": "bob", "content": "x"})
        self.assertEqual((kind, body["code"]), (MessageType.ERROR, "BAD_REQUEST"))

    async def test_malformed_recipient_is_a_bad_request(self) -> None:
        alice = await self.member("alice", room=None, features=("direct",))
        for to in ("", 5, "x" * 129, "a\x00"):
            kind, body = await alice.request(MessageType.MESSAGE, {"to": to, "content": "x"})
            self.assertEqual(body["code"], "BAD_REQUEST", to)

    async def test_room_messages_still_work_with_direct_enabled(self) -> None:
        alice = await self.member("alice", features=("direct",))
        bob = await self.member("bob", features=("direct",))
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "room"})
        [(kind, body)] = await delivered(alice, bob)
        self.assertEqual((body["room"], body["content"]), ("lobby", "room"))

    async def test_a_disconnected_user_becomes_offline(self) -> None:
        alice = await self.member("alice", room=None, features=("direct",))
        bob = await self.member("bob", room=None, features=("direct",))
        bob.transport.loseConnection()
        await bob.closed
        await wait_until(lambda: len(self.factory.direct) == 1, "bob's registration to go")
        kind, body = await alice.request(MessageType.MESSAGE, {"to": "bob", "content": "x"})
        self.assertEqual(body["code"], "USER_OFFLINE")


class DirectRateLimitTests(PresenceCase):
    server_config = {"rate_limit": 1.0, "rate_burst": 1}

    async def test_rate_limit_applies_to_direct_messages(self) -> None:
        alice = await self.member("alice", room=None, features=("direct",))
        bob = await self.member("bob", room=None, features=("direct",))
        for n in range(3):
            alice.send_json(MessageType.MESSAGE, {"to": "bob", "content": n})
        refusals = [body["code"] for kind, body in await before_barrier(alice)]
        self.assertEqual(refusals, ["RATE_LIMITED", "RATE_LIMITED"])
        self.assertEqual([body["content"] for _, body in await delivered(alice, bob)], [0])


class NothingNewTests(PresenceCase):
    async def test_v1_session_bytes_are_unchanged_next_to_extension_users(self) -> None:
        watcher = await self.member("watcher", features=("presence", "direct"))
        legacy = await self.connect()
        legacy.send_json(MessageType.HELLO, {"userId": "legacy", "id": 1})
        legacy.send_json(MessageType.JOIN_ROOM, {"room": "lobby", "id": 2})
        hello = await legacy.next_frame()
        connection_id = loads(hello.payload)["connectionId"]
        self.assertEqual(
            encode(hello.type, hello.flags, hello.payload),
            encode_json(MessageType.HELLO, {
                "status": "connected", "connectionId": connection_id, "userId": "legacy",
                "serverVersion": __version__, "heartbeatInterval": 30, "maxFrameSize": 1048576,
                "features": [], "id": 1,
            }),
        )
        join = await legacy.next_frame()
        self.assertEqual(join.payload, b'{"status":"joined","room":"lobby","members":2,"id":2}')
        await self.member("late")
        watcher.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "hi"})
        leaver = await self.member("leaver")
        leaver.transport.abortConnection()
        await wait_until(lambda: len(self.factory.connections) == 3, "the leaver's connection to end")
        legacy.send_frame(*HEARTBEAT)
        await before_barrier(watcher)
        frame = await legacy.next_frame()
        stamp = loads(frame.payload)["timestamp"]
        # The one frame it gets is the v1 delivery, byte for byte; then its echo.
        self.assertEqual(
            encode(frame.type, frame.flags, frame.payload),
            b"\x00\x00\x00\x55\x01\x04\x01"
            + b'{"room":"lobby","from":"watcher","content":"hi","timestamp":%d,"seq":1}' % stamp,
        )
        self.assertEqual(await legacy.next_frame(), HEARTBEAT_FRAME)


class AuthenticatedCase(PresenceCase):
    """A server with API keys and a JWT key."""

    def setUp(self) -> Any:
        directory = tempfile.mkdtemp(prefix="relay-presence-")
        keys = os.path.join(directory, "keys.json")
        with open(keys, "w") as file:
            json.dump({
                "alice-key-0123456789abcdef": {"user": "alice", "rooms": ["lobby"], "direct": True},
                "bob-key-0123456789abcdef0": {"user": "bob", "rooms": ["lobby"]},
            }, file)
        secret = os.path.join(directory, "jwt.key")
        with open(secret, "wb") as file:
            file.write(SECRET)
        auth = Authenticator(ApiKeyFile(keys), JwtVerifier(secret, leeway=0))
        self.factory = RelayFactory(RelayConfig(), reactor=reactor, auth=auth)
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")

        def listening(port: Any) -> None:
            self.port = port
            self.addCleanup(port.stopListening)
            self.addCleanup(self.factory.wait_closed)

        return endpoint.listen(self.factory).addCallback(listening)

    async def authed(self, token: str, features: tuple[str, ...] = ("presence", "direct")) -> FrameClient:
        client = await connect_frame_client(self, self.port)
        await client.hello(token=token, features=list(features))
        return client


class AuthTests(AuthenticatedCase):
    async def test_direct_needs_the_grant(self) -> None:
        alice = await self.authed("alice-key-0123456789abcdef")
        bob = await self.authed("bob-key-0123456789abcdef0")
        kind, body = await bob.request(MessageType.MESSAGE, {"to": "alice", "content": "x", "id": 1})
        self.assertEqual((kind, body["code"]), (MessageType.ERROR, "FORBIDDEN"))
        alice.send_json(MessageType.MESSAGE, {"to": "bob", "content": "granted"})
        [(kind, body)] = await delivered(alice, bob)
        self.assertEqual((body["from"], body["content"]), ("alice", "granted"))

    async def test_jwt_direct_claim_grants_direct(self) -> None:
        alice = await self.authed("alice-key-0123456789abcdef")
        carol = await self.authed(mint(claims(sub="carol", now=time.time(), direct=True)))
        carol.send_json(MessageType.MESSAGE, {"to": "alice", "content": "from a JWT"})
        [(kind, body)] = await delivered(carol, alice)
        self.assertEqual((body["from"], body["content"]), ("carol", "from a JWT"))
        dave = await self.authed(mint(claims(sub="dave", now=time.time())))
        kind, body = await dave.request(MessageType.MESSAGE, {"to": "alice", "content": "x", "id": 2})
        self.assertEqual(body["code"], "FORBIDDEN")

    async def test_list_of_a_room_not_granted_is_forbidden(self) -> None:
        alice = await self.authed("alice-key-0123456789abcdef")
        kind, body = await alice.request(PRESENCE, {"room": "secret", "id": 4})
        self.assertEqual((kind, body["code"]), (MessageType.ERROR, "FORBIDDEN"))
        kind, body = await alice.request(PRESENCE, {"room": "lobby", "id": 5})
        self.assertEqual(body["code"], "NOT_IN_ROOM")  # granted, but not joined
        await alice.join("lobby")
        kind, body = await alice.request(PRESENCE, {"room": "lobby", "id": 6})
        self.assertEqual((kind, body["count"]), (PRESENCE, 1))


class DirectGrantParsingTests(unittest.TestCase):
    def test_only_a_boolean_direct_is_a_grant(self) -> None:
        files = KeyFiles(self)
        tokens = files.api_keys({"k" * 20: {"user": "a", "rooms": [], "direct": "yes"}})
        with self.assertRaises(AuthConfigError):
            ApiKeyFile(tokens)
        verifier = JwtVerifier(files.secret(), leeway=0)
        with self.assertRaises(Unauthorized):
            verifier.verify(mint(claims(sub="a", now=time.time(), direct=1)), time.time())
        self.assertTrue(verifier.verify(mint(claims(sub="a", now=time.time(), direct=True)), time.time()).direct)
        self.assertFalse(verifier.verify(mint(claims(sub="a", now=time.time())), time.time()).direct)
