"""The history extension across nodes: real redis-server, real nodes on loopback."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import endpoints, reactor
from twisted.trial import unittest

from relay.wire import MessageType
from tests.cluster_support import ClusterNodes, OutputWatcher, RedisServer, connect, listening_ports, wait_until
from tests.support import FrameClient

REPO = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


class TwoNodeHistoryTests(unittest.TestCase):
    """Two nodes on one Redis, started with --history."""

    timeout = 90

    async def setUp(self) -> None:
        self.redis = await RedisServer(self).start()
        self.nodes = ClusterNodes(self, self.redis.url, "--history", "50")
        self.a = await self.nodes.node()
        self.b = await self.nodes.node()

    async def member(self, node: Any, user: str, room: str = "lobby", since: Any = None, **hello: Any):
        client = await connect(self, node)
        await client.hello(userId=user, features=["history"], **hello)
        join: dict[str, Any] = {"room": room}
        if since is not None:
            join["since"] = since
        replayed = []
        client.send_json(MessageType.JOIN_ROOM, join)
        while True:
            type_, body = await client.next_json()
            if type_ == MessageType.JOIN_ROOM:
                return client, replayed, body
            replayed.append(body)

    async def test_a_client_away_recovers_what_the_other_node_published(self) -> None:
        alice, _, _ = await self.member(self.a, "alice")
        bob, _, ack = await self.member(self.b, "bob")
        epoch = ack["epoch"]
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": 1})
        _, first = await bob.next_json()
        self.assertEqual((first["content"], first["seq"], first["epoch"]), (1, 1, epoch))
        bob.transport.loseConnection()
        await bob.closed
        for content in (2, 3, 4):
            alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": content})
        await wait_until(lambda: self.a.factory.registry.get("lobby").seq == 4, "the publishes")
        _, replayed, ack = await self.member(self.b, "bob", since={"seq": 1, "epoch": epoch})
        self.assertEqual([(m["content"], m["seq"], m["replayed"]) for m in replayed],
                         [(2, 2, True), (3, 3, True), (4, 4, True)])
        self.assertEqual((ack["recovered"], ack["replayed"], ack["seq"], ack["epoch"]), (True, 3, 4, epoch))

    async def test_concurrent_publishers_on_two_nodes_give_every_member_one_gap_free_sequence(self) -> None:
        publishers = [(await self.member(node, f"pub-{i}"))[0] for i, node in enumerate((self.a, self.b))]
        watchers = [(await self.member(node, f"watch-{i}"))[0] for i, node in enumerate((self.a, self.b, self.a))]
        plain = await connect(self, self.b)
        await plain.hello(userId="plain")
        await plain.join("lobby")
        count = 200
        for index in range(count):
            for number, publisher in enumerate(publishers):
                publisher.send_json(MessageType.MESSAGE, {"room": "lobby", "content": [number, index]})
        total = 2 * count
        for watcher in watchers + [plain]:
            seqs = []
            while len(seqs) < total:
                type_, body = await watcher.next_json()
                self.assertEqual(type_, MessageType.MESSAGE)
                seqs.append(body["seq"])
            self.assertEqual(seqs, list(range(1, total + 1)))
        for number, publisher in enumerate(publishers):
            # Each publisher gets the other's messages only, in the same order.
            seqs = []
            while len(seqs) < count:
                _, body = await publisher.next_json()
                self.assertNotEqual(body["from"], f"pub-{number}")
                seqs.append(body["seq"])
            self.assertEqual(seqs, sorted(seqs))

    async def test_history_lives_in_redis_with_a_ttl(self) -> None:
        alice, _, ack = await self.member(self.a, "alice")
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "kept"})
        await wait_until(lambda: self.a.factory.registry.get("lobby").seq == 1, "the publish")
        self.assertEqual(await self.redis.command("HGET", "relay:history:lobby", "epoch"), [ack["epoch"]])
        self.assertEqual(await self.redis.command("XLEN", "relay:history:lobby:log"), ["1"])
        ttl = int((await self.redis.command("TTL", "relay:history:lobby:log"))[0])
        self.assertTrue(0 < ttl <= 300, ttl)

    async def test_a_lost_history_has_a_new_epoch_and_is_not_recovered(self) -> None:
        alice, _, ack = await self.member(self.a, "alice")
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "gone"})
        await wait_until(lambda: self.a.factory.registry.get("lobby").seq == 1, "the publish")
        await self.redis.command("DEL", "relay:history:lobby", "relay:history:lobby:log")
        _, replayed, again = await self.member(self.b, "bob", since={"seq": 0, "epoch": ack["epoch"]})
        self.assertEqual(replayed, [])
        self.assertFalse(again["recovered"])
        self.assertNotEqual(again["epoch"], ack["epoch"])

    async def test_a_node_without_redis_delivers_locally_under_its_own_epoch(self) -> None:
        alice, _, _ = await self.member(self.a, "alice")
        carol, _, ack = await self.member(self.a, "carol")
        await self.redis.kill()
        await wait_until(lambda: not self.a.factory.backplane.link_up, "the link loss")
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "offline"})
        _, body = await carol.next_json()
        self.assertEqual(body["content"], "offline")
        self.assertNotEqual(body["epoch"], ack["epoch"])
        late, replayed, late_ack = await self.member(self.a, "late", since={"seq": 0, "epoch": ack["epoch"]})
        self.assertEqual((replayed, late_ack["recovered"]), ([], False))


class TwistdHistoryTests(unittest.TestCase):
    """Real ``twistd relay --history`` processes on one Redis."""

    timeout = 120

    async def setUp(self) -> None:
        self.redis = await RedisServer(self).start()

    async def twistd_node(self) -> tuple[OutputWatcher, Any, int]:
        watcher = OutputWatcher()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        process = reactor.spawnProcess(
            watcher, TWISTD,
            [TWISTD, "-n", "--pidfile=", "relay", "--redis", self.redis.url, "--history", "20",
             "--port", "tcp:0:interface=127.0.0.1"],
            env=env, path=tempfile.mkdtemp(),
        )

        def kill() -> Any:
            if watcher.running:
                process.signalProcess("KILL")
            return watcher.ended

        self.addCleanup(kill)
        await wait_until(lambda: b"Redis link up" in watcher.output, "the node's Redis link")
        return watcher, process, listening_ports(watcher.output)[0]

    async def client(self, port: int, user: str) -> FrameClient:
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client = await endpoints.connectProtocol(endpoint, FrameClient())
        self.addCleanup(lambda: client.connected and client.transport.abortConnection())
        await client.hello(userId=user, features=["history"])
        return client

    async def test_a_client_recovers_across_a_restart_of_its_node(self) -> None:
        _, _, port_a = await self.twistd_node()
        watcher_b, process_b, port_b = await self.twistd_node()
        alice = await self.client(port_a, "alice")
        epoch = (await alice.join("lobby"))["epoch"]
        bob = await self.client(port_b, "bob")
        await bob.join("lobby")
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "before"})
        self.assertEqual((await bob.next_json())[1]["seq"], 1)
        process_b.signalProcess("KILL")
        await watcher_b.ended
        for content in ("while", "away"):
            alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": content})
        alice.send_json(MessageType.HEARTBEAT, None)
        await alice.next_frame()
        _, _, port_b = await self.twistd_node()
        bob = await self.client(port_b, "bob")
        bob.send_json(MessageType.JOIN_ROOM, {"room": "lobby", "since": {"seq": 1, "epoch": epoch}})
        frames = [await bob.next_json() for _ in range(3)]
        self.assertEqual([(t, b.get("content"), b.get("replayed")) for t, b in frames[:2]],
                         [(MessageType.MESSAGE, "while", True), (MessageType.MESSAGE, "away", True)])
        self.assertEqual(frames[2][0], MessageType.JOIN_ROOM)
        ack = frames[2][1]
        self.assertEqual((ack["recovered"], ack["replayed"], ack["seq"], ack["epoch"]), (True, 2, 3, epoch))
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "after"})
        self.assertEqual((await bob.next_json())[1]["seq"], 4)
