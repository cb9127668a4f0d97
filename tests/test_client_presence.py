"""The client library's side of presence and direct messages, against the real
server on loopback: events, who(), send_direct(), and the reconnecting client."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor

from relay.client import (
    DirectMessage,
    MemberList,
    PresenceEvent,
    ReconnectingClient,
    RelayClientProtocol,
    RelayError,
    connect,
)
from relay.wire import ErrorCode
from tests.support import IntegrationTestCase


class ClientPresenceTests(IntegrationTestCase):
    def address(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port.getHost().port}"

    async def client(self, user: str, **flags: Any) -> RelayClientProtocol:
        client = await connect(reactor, self.address(), user=user, **flags)
        self.addCleanup(client.disconnect)
        return client

    async def test_presence_events_reach_callback_and_stream(self) -> None:
        alice = await self.client("alice", presence=True)
        self.assertTrue(alice.presence_enabled)
        seen: list[PresenceEvent] = []
        alice.on_presence = seen.append
        stream = alice.presence_events()
        await alice.join("lobby")
        bob = await self.client("bob")
        ack = await bob.join("lobby")
        event = await stream.__anext__()
        self.assertEqual(event, PresenceEvent("lobby", "join", "bob", bob.server_info["connectionId"]))
        self.assertEqual(seen, [event])
        self.assertEqual(ack["members"], 2)
        await bob.disconnect()
        self.assertEqual((await stream.__anext__()).event, "leave")

    async def test_who_lists_the_room(self) -> None:
        alice = await self.client("alice", presence=True)
        await alice.join("lobby")
        bob = await self.client("bob")
        await bob.join("lobby")
        members = await alice.who("lobby")
        self.assertEqual(members, MemberList("lobby", [("alice", 1), ("bob", 1)], 2, False))
        with self.assertRaises(RelayError) as refused:
            await alice.who("elsewhere")
        self.assertEqual(refused.exception.code, ErrorCode.NOT_IN_ROOM)

    async def test_send_direct_delivers_and_reports_offline_users(self) -> None:
        alice = await self.client("alice", direct=True, acks=True)
        bob = await self.client("bob", direct=True)
        received: defer.Deferred[DirectMessage] = defer.Deferred()
        bob.on_direct = received.callback
        await alice.send_direct("bob", {"text": "psst"})
        message = await received
        self.assertEqual((message.to, message.sender, message.content), ("bob", "alice", {"text": "psst"}))
        with self.assertRaises(RelayError) as refused:
            await alice.send_direct("nobody", "x")
        self.assertEqual((refused.exception.code, refused.exception.fatal), (ErrorCode.USER_OFFLINE, False))

    async def test_room_deliveries_are_not_taken_for_direct_ones(self) -> None:
        alice = await self.client("alice", direct=True, acks=True)
        bob = await self.client("bob", direct=True)
        directs: list[DirectMessage] = []
        bob.on_direct = directs.append
        stream = bob.messages()
        await alice.join("lobby")
        await bob.join("lobby")
        await alice.send("lobby", "to the room")
        self.assertEqual((await stream.__anext__()).content, "to the room")
        self.assertEqual(directs, [])

    async def test_reconnecting_client_asks_for_both_and_relays_them(self) -> None:
        client = ReconnectingClient(reactor, self.address(), user="carol", presence=True, direct=True, acks=True)
        self.addCleanup(client.stop)
        events: defer.Deferred[PresenceEvent] = defer.Deferred()
        directs: defer.Deferred[DirectMessage] = defer.Deferred()
        client.on_presence = events.callback
        client.on_direct = directs.callback
        client.start()
        await client.join("lobby")
        dave = await self.client("dave", direct=True, acks=True)
        await dave.join("lobby")
        self.assertEqual((await events).user_id, "dave")
        self.assertEqual((await client.who("lobby")).count, 2)
        await dave.send_direct("carol", "hello carol")
        self.assertEqual((await directs).content, "hello carol")
        await client.send_direct("dave", "hello dave")
