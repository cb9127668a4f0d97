"""Presence and direct messages across nodes: a real redis-server, in-process
nodes on loopback sockets, and real ``twistd relay`` processes for a node
killed with SIGKILL."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor, task
from twisted.trial import unittest

from relay.wire import MessageType
from tests.cluster_support import ClusterNodes, RedisServer, connect, wait_until
from tests.support import FrameClient
from tests import test_cluster_failures
from tests.test_presence import before_barrier

PRESENCE = MessageType.PRESENCE


class TwoNodePresenceTests(unittest.TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.redis = await RedisServer(self).start()
        nodes = ClusterNodes(self, self.redis.url)
        self.a = await nodes.node()
        self.b = await nodes.node()

    async def member(self, node: Any, user: str, room: str | None = "lobby",
                     features: tuple[str, ...] = ("presence",)) -> FrameClient:
        client = await connect(self, node)
        ack = await client.hello(userId=user, features=list(features))
        client.connection_id = ack["connectionId"]
        if room is not None:
            await client.join(room)
        return client

    async def next_of(self, client: FrameClient, type_: int) -> dict[str, Any]:
        while True:
            kind, body = await client.next_json()
            if kind == type_:
                return body

    async def test_joins_and_leaves_on_one_node_reach_presence_members_on_the_other(self) -> None:
        plain = await self.member(self.a, "plain", features=())
        alice = await self.member(self.a, "alice")
        bob = await self.member(self.b, "bob")
        self.assertEqual(
            await self.next_of(alice, PRESENCE),
            {"room": "lobby", "event": "join", "userId": "bob", "connectionId": bob.connection_id},
        )
        bob.transport.abortConnection()
        event = await self.next_of(alice, PRESENCE)
        self.assertEqual((event["event"], event["userId"]), ("leave", "bob"))
        carol = await self.member(self.b, "carol")
        self.assertEqual((await self.next_of(alice, PRESENCE))["userId"], "carol")
        # The other way, and never to a member that did not ask.
        dave = await self.member(self.a, "dave", features=())
        self.assertEqual((await self.next_of(carol, PRESENCE))["userId"], "dave")
        self.assertEqual([kind for kind, _ in await before_barrier(plain)], [])

    async def test_the_member_list_and_count_cover_the_cluster(self) -> None:
        alice = await self.member(self.a, "alice")
        await self.member(self.b, "bob", features=())
        await self.member(self.b, "alice", features=())
        await self.member(self.a, "carol", features=())

        async def listed() -> dict[str, Any]:
            alice.send_json(PRESENCE, {"room": "lobby", "id": "who"})
            while True:
                body = await self.next_of(alice, PRESENCE)
                if body.get("id") == "who":
                    return body

        body = await listed()
        self.assertEqual(body["count"], 3)
        self.assertEqual(body["members"], [
            {"userId": "alice", "connections": 2},
            {"userId": "bob", "connections": 1},
            {"userId": "carol", "connections": 1},
        ])

    async def test_direct_reaches_the_user_on_both_nodes(self) -> None:
        alice = await self.member(self.a, "alice", room=None, features=("direct", "acks"))
        bob_a = await self.member(self.a, "bob", room=None, features=("direct",))
        bob_b = await self.member(self.b, "bob", room=None, features=("direct",))
        await wait_until(lambda: "bob" in self.b.factory.direct.users(), "bob's registration")
        alice.send_json(MessageType.MESSAGE, {"to": "bob", "content": "both", "id": 1})
        self.assertEqual((await alice.next_json())[1], {"status": "published", "to": "bob", "id": 1})
        for bob in (bob_a, bob_b):
            body = await self.next_of(bob, MessageType.MESSAGE)
            self.assertEqual((body["to"], body["from"], body["content"]), ("bob", "alice", "both"))
        # Once each: nothing more for either.
        for bob in (bob_a, bob_b):
            self.assertEqual(await before_barrier(bob), [])

    async def test_direct_to_a_user_only_on_the_other_node(self) -> None:
        alice = await self.member(self.a, "alice", room=None, features=("direct", "acks"))
        bob = await self.member(self.b, "bob", room=None, features=("direct",))
        # The subscription is confirmed once a round trip on its connection is done.
        await wait_until(lambda: self.b.factory.direct.users() == ["bob"], "bob's registration")
        await task.deferLater(reactor, 0.2, lambda: None)
        kind, body = await alice.request(MessageType.MESSAGE, {"to": "bob", "content": "far", "id": 2})
        self.assertEqual(body, {"status": "published", "to": "bob", "id": 2})
        self.assertEqual((await self.next_of(bob, MessageType.MESSAGE))["content"], "far")

    async def test_a_user_offline_on_every_node_is_user_offline(self) -> None:
        alice = await self.member(self.a, "alice", room=None, features=("direct",))
        await self.member(self.b, "bob", room=None, features=())
        kind, body = await alice.request(MessageType.MESSAGE, {"to": "bob", "content": "x", "id": 3})
        self.assertEqual((kind, body["code"], body["fatal"], body["id"]),
                         (MessageType.ERROR, "USER_OFFLINE", False, 3))
        # Replies stay in request order after the wait for Redis.
        alice.send_json(MessageType.MESSAGE, {"to": "nobody", "content": "x", "id": 4})
        alice.send_json(MessageType.JOIN_ROOM, {"room": "after", "id": 5})
        self.assertEqual([(await alice.next_json())[1]["id"] for _ in range(2)], [4, 5])


class KilledNodePresenceTests(unittest.TestCase):
    """A node killed with SIGKILL leaves every member list within the TTL."""

    timeout = 90
    # Real ``twistd relay`` processes, as the cluster failure tests run them.
    twistd = test_cluster_failures.KilledNodeTests.twistd
    start_node = test_cluster_failures.KilledNodeTests.start_node
    client = test_cluster_failures.KilledNodeTests.client

    async def test_a_killed_nodes_members_leave_the_list_within_the_ttl(self) -> None:
        redis = await RedisServer(self).start()
        _, doomed, doomed_port = await self.start_node(redis.url)
        _, _, survivor_port = await self.start_node(redis.url)
        on_doomed = await self.client(doomed_port)
        await on_doomed.hello(userId="doomed")
        await on_doomed.join("lobby")
        bob = await self.client(survivor_port)
        await bob.hello(userId="bob", features=["presence"])
        await bob.join("lobby")

        async def listed() -> list[str]:
            kind, body = await bob.request(PRESENCE, {"room": "lobby"})
            return [member["userId"] for member in body["members"]]

        self.assertEqual(await listed(), ["bob", "doomed"])
        killed = reactor.seconds()
        doomed.signalProcess("KILL")
        while (users := await listed()) != ["bob"]:
            self.assertEqual(users, ["bob", "doomed"])
            self.assertLess(reactor.seconds() - killed, 10, "the killed node outlived its TTL")
            await task.deferLater(reactor, 0.1, lambda: None)
        # The TTL is 2 s since the last refresh (at most 2/3 s before the kill).
        self.assertLess(reactor.seconds() - killed, 2 + 3)
