"""Rooms across nodes: real redis-server, real nodes on loopback sockets."""

from __future__ import annotations

from twisted.trial import unittest

from relay.wire import Flags, MessageType, decode_binary_delivery, encode_binary_message, loads
from tests.cluster_support import ClusterNodes, RedisServer, connect, wait_until


class TwoNodeTests(unittest.TestCase):
    """Two nodes on one Redis share every room."""

    timeout = 60

    async def setUp(self) -> None:
        self.redis = await RedisServer(self).start()
        nodes = ClusterNodes(self, self.redis.url)
        self.a = await nodes.node()
        self.b = await nodes.node()

    async def member(self, node, user: str, room: str = "lobby", **hello):
        client = await connect(self, node)
        await client.hello(userId=user, **hello)
        await client.join(room)
        return client

    async def test_a_message_published_on_one_node_reaches_members_on_the_other(self) -> None:
        alice = await self.member(self.a, "alice")
        bob = await self.member(self.b, "bob")
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": {"text": "hi"}})
        type_, body = await bob.next_json()
        self.assertEqual(type_, MessageType.MESSAGE)
        self.assertEqual((body["room"], body["from"], body["content"]), ("lobby", "alice", {"text": "hi"}))

    async def test_members_in_the_join_ack_count_every_node(self) -> None:
        first = await connect(self, self.a)
        self.assertEqual((await first.join("count"))["members"], 1)
        second = await connect(self, self.b)
        self.assertEqual((await second.join("count"))["members"], 2)
        third = await connect(self, self.a)
        self.assertEqual((await third.join("count"))["members"], 3)
        # Joining again is counted once.
        self.assertEqual((await second.join("count"))["members"], 3)
        type_, _ = await second.request(MessageType.LEAVE_ROOM, {"room": "count"})
        self.assertEqual(type_, MessageType.LEAVE_ROOM)
        fourth = await connect(self, self.b)
        self.assertEqual((await fourth.join("count"))["members"], 3)
        first.transport.loseConnection()
        await first.closed
        await wait_until(lambda: len(self.a.factory.registry.get("count")) == 1, "the disconnect")
        fifth = await connect(self, self.b)
        self.assertEqual((await fifth.join("count"))["members"], 3)

    async def test_the_sender_is_excluded_on_every_node(self) -> None:
        alice = await self.member(self.a, "alice")
        bob = await self.member(self.b, "bob")
        carol = await self.member(self.a, "carol")
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": 1})
        for member in (bob, carol):
            self.assertEqual((await member.next_json())[1]["content"], 1)
        # Bob answers after he got it: alice's own envelope came back to her
        # node through Redis before his, and was not delivered to her.
        bob.send_json(MessageType.MESSAGE, {"room": "lobby", "content": 2})
        type_, body = await alice.next_json()
        self.assertEqual((type_, body["from"], body["content"]), (MessageType.MESSAGE, "bob", 2))

    async def test_echo_returns_the_message_once_to_its_sender(self) -> None:
        alice = await self.member(self.a, "alice", echo=True)
        bob = await self.member(self.b, "bob")
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "mine"})
        alice.send_json(MessageType.HEARTBEAT, None)
        self.assertEqual((await alice.next_json())[1]["content"], "mine")
        self.assertEqual((await alice.next_frame()).type, MessageType.HEARTBEAT)
        self.assertEqual((await bob.next_json())[1]["content"], "mine")
        # Bob answers after he got it: through Redis, alice's own envelope
        # came back to her node before his, and was not delivered twice.
        bob.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "reply"})
        self.assertEqual((await alice.next_json())[1]["content"], "reply")
        mine = [f for f in alice.frames if f.type == MessageType.MESSAGE and loads(f.payload)["from"] == "alice"]
        self.assertEqual(len(mine), 1)

    async def test_binary_messages_cross_nodes_byte_for_byte(self) -> None:
        alice = await self.member(self.a, "alice")
        bob = await self.member(self.b, "bob")
        data = bytes(range(256)) * 40
        alice.send_frame(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("lobby", data))
        frame = await bob.next_frame()
        self.assertEqual(frame.flags, Flags.BINARY)
        self.assertEqual(decode_binary_delivery(frame.payload), ("lobby", "alice", data))

    async def test_two_publishers_on_two_nodes_keep_their_order_without_duplicates(self) -> None:
        count = 1000
        readers = [await self.member(node, f"reader-{index}") for index, node in enumerate((self.a, self.b))]
        alice = await self.member(self.a, "alice")
        bob = await self.member(self.b, "bob")
        for publisher in (alice, bob):
            publisher.send(
                b"".join(
                    _message("lobby", {"n": n, "by": publisher_name(publisher)}) for n in range(count)
                )
            )
        for reader in readers:
            await wait_until(lambda: len(reader.frames) >= 2 * count + 2, "every delivery")
        for reader in readers + [alice, bob]:
            # A round trip: anything still in flight from Redis arrives before the echo.
            reader.send_json(MessageType.HEARTBEAT, None)
        for reader in readers:
            await wait_until(lambda: reader.frames[-1].type == MessageType.HEARTBEAT, "the echo")
            deliveries = [loads(f.payload) for f in reader.frames if f.type == MessageType.MESSAGE]
            self.assertEqual(len(deliveries), 2 * count)
            for name in ("alice", "bob"):
                self.assertEqual(
                    [d["content"]["n"] for d in deliveries if d["from"] == name], list(range(count))
                )
        # Each publisher got the other's messages, once each, in order, and none of its own.
        for publisher, other in ((alice, "bob"), (bob, "alice")):
            await wait_until(lambda: len(publisher.frames) >= count + 2, "the other's deliveries")
            deliveries = [loads(f.payload) for f in publisher.frames if f.type == MessageType.MESSAGE]
            self.assertEqual([d["content"]["n"] for d in deliveries if d["from"] == other], list(range(count)))
            self.assertEqual(len(deliveries), count)

    async def test_a_node_subscribes_to_a_room_only_while_it_has_members_there(self) -> None:
        backplane = self.b.factory.backplane
        self.assertEqual(backplane.subscribed_rooms, 0)
        bob = await self.member(self.b, "bob", room="only")
        self.assertEqual(backplane.subscribed_rooms, 1)
        self.assertEqual(await self.redis.command("PUBSUB", "CHANNELS", "*"), ["relay:room:only"])
        bob.send_json(MessageType.LEAVE_ROOM, {"room": "only"})
        await bob.next_json()
        self.assertEqual(backplane.subscribed_rooms, 0)
        # Redis handles the UNSUBSCRIBE on the node's connection, then redis-cli's query.
        channels = await self.redis.command("PUBSUB", "CHANNELS", "*")
        for _ in range(100):
            if not channels:
                break
            channels = await self.redis.command("PUBSUB", "CHANNELS", "*")
        self.assertEqual(channels, [])

    async def test_deliveries_from_another_node_share_one_write_per_read(self) -> None:
        # Many messages in one read on node A: node B's members get them
        # in few envelopes, not one per message.
        alice = await self.member(self.a, "alice")
        bob = await self.member(self.b, "bob")
        alice.send(b"".join(_message("lobby", n) for n in range(200)))
        await wait_until(lambda: len(bob.frames) >= 202, "the deliveries")
        stats = self.b.factory.backplane.stats
        self.assertEqual(stats.received_frames, 200)
        self.assertLess(stats.received_envelopes, 20)


def publisher_name(client) -> str:
    return loads(client.frames[0].payload)["userId"]


def _message(room: str, content) -> bytes:
    from relay.wire import encode_json

    return encode_json(MessageType.MESSAGE, {"room": room, "content": content})


class RedisServerHelperTests(unittest.TestCase):
    """The tests' own Redis: a port taken between choosing and binding it is replaced."""

    async def test_a_taken_port_is_replaced_on_the_first_start(self) -> None:
        from twisted.internet import protocol, reactor

        taken = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        redis = RedisServer(self)
        redis.port = taken.getHost().port
        await redis.start()
        self.assertNotEqual(redis.port, taken.getHost().port)
        self.assertEqual(await redis.command("PING"), ["PONG"])


class WebSocketNodeTests(unittest.TestCase):
    """A member connected over WebSocket (the client library) to one node
    talks with a TCP member of another."""

    timeout = 60

    async def test_websocket_and_tcp_members_on_two_nodes_share_a_room(self) -> None:
        from twisted.internet import reactor

        from relay.client import connect as connect_relay

        redis = await RedisServer(self).start()
        nodes = ClusterNodes(self, redis.url)
        a = await nodes.node()
        b = await nodes.node("--websocket", "tcp:0:interface=127.0.0.1")
        web_port = b.listening_ports[1].getHost().port
        web = await connect_relay(reactor, f"ws://127.0.0.1:{web_port}/relay", user="web")
        self.addCleanup(web.disconnect)
        received = []
        web.on_message = received.append
        self.assertEqual((await web.join("lobby"))["members"], 1)
        tcp = await connect(self, a)
        await tcp.hello(userId="tcp")
        self.assertEqual((await tcp.join("lobby"))["members"], 2)
        tcp.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "to the browser"})
        await wait_until(lambda: received, "the delivery over WebSocket")
        self.assertEqual((received[0].sender, received[0].content), ("tcp", "to the browser"))
        await web.send("lobby", "back")
        self.assertEqual((await tcp.next_json())[1]["content"], "back")
