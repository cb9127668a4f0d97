"""A cluster when things fail: Redis killed, restarted or hung; a node killed."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relay.wire import MessageType, encode_json, loads
from tests.cluster_support import ClusterNodes, OutputWatcher, RedisServer, connect, listening_ports, wait_until
from tests.support import FrameClient

REPO = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


class LogCapture:
    """Every log event's text while a test runs."""

    def __init__(self, test: unittest.TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self)
        test.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict) -> None:
        self.lines.append(formatEvent(event))

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)


async def member(test, node, user: str, room: str = "lobby") -> FrameClient:
    client = await connect(test, node)
    await client.hello(userId=user)
    await client.join(room)
    return client


class RedisOutageTests(unittest.TestCase):
    """Local delivery goes on without Redis; the cluster heals when it is back."""

    timeout = 90

    async def setUp(self) -> None:
        self.redis = await RedisServer(self).start()
        nodes = ClusterNodes(self, self.redis.url)
        self.a = await nodes.node()
        self.b = await nodes.node()
        self.alice = await member(self, self.a, "alice")
        self.carol = await member(self, self.a, "carol")
        self.bob = await member(self, self.b, "bob")

    def links(self) -> list[bool]:
        return [node.factory.backplane.link_up for node in (self.a, self.b)]

    async def assert_cross_node_delivery(self, content) -> None:
        self.alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": content})
        self.assertEqual((await self.bob.next_json())[1]["content"], content)
        self.assertEqual((await self.carol.next_json())[1]["content"], content)

    async def test_redis_restart_local_delivery_goes_on_and_the_cluster_heals(self) -> None:
        logs = LogCapture(self)
        await self.assert_cross_node_delivery("before")
        backplane = self.a.factory.backplane
        self.assertEqual(backplane.health()[0], True)
        self.assertIn(("relay_cluster_link_up", 1), [(m[0], m[3]) for m in backplane.metric_values()])
        await self.redis.kill()
        await wait_until(lambda: self.links() == [False, False], "both links down")
        # Degraded: for /healthz (503) and the metrics.
        ok, detail = backplane.health()
        self.assertEqual((ok, detail.startswith("Redis link down")), (False, True))
        metrics = {m[0]: m[3] for m in backplane.metric_values()}
        self.assertEqual((metrics["relay_cluster_link_up"], metrics["relay_cluster_link_losses_total"]), (0, 1))
        # Local members still get everything, at once.
        self.alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "during"})
        self.assertEqual((await self.carol.next_json())[1]["content"], "during")
        # A join while Redis is away is acked with this node's count.
        dave = await connect(self, self.a)
        self.assertEqual((await dave.join("lobby"))["members"], 3)

        restarted = reactor.seconds()
        await self.redis.start()
        await wait_until(lambda: self.links() == [True, True], "both links up again")
        healed = reactor.seconds() - restarted
        # The backoff is capped at 1 s; the bound here leaves room for a busy machine.
        self.assertLess(healed, 10)
        # "during" was held and sent on reconnect: bob has it if his node
        # had subscribed again by then.  What comes next arrives once.
        await self.assert_cross_node_delivery_eventually("after")
        # Membership was registered again in the new Redis: 3 on A, bob and a newcomer on B.
        erin = await connect(self, self.b)
        self.assertEqual((await erin.join("lobby"))["members"], 5)
        # The loss was logged once per node, not once per retry.
        self.assertEqual(logs.count("Redis link down"), 2)
        self.assertEqual(logs.count("Redis link up"), 2)
        self.assertEqual(logs.count("Redis unreachable"), 0)

    async def test_a_hung_redis_is_detected_and_delivery_resumes_after_it_wakes(self) -> None:
        self.redis.signal("STOP")
        self.addCleanup(self.redis.signal, "CONT")
        await wait_until(lambda: self.links() == [False, False], "the hang to be noticed")
        self.alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "during"})
        self.assertEqual((await self.carol.next_json())[1]["content"], "during")
        woke = reactor.seconds()
        self.redis.signal("CONT")
        await wait_until(lambda: self.links() == [True, True], "both links up again")
        self.assertLess(reactor.seconds() - woke, 10)
        # The held "during" reaches bob once the links are up, or not at all: drain it.
        await self.assert_cross_node_delivery_eventually("after")

    async def assert_cross_node_delivery_eventually(self, content) -> None:
        self.alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": content})
        await wait_until(
            lambda: any(loads(f.payload).get("content") == content for f in self.bob.frames), "the delivery"
        )
        contents = [loads(f.payload).get("content") for f in self.bob.frames]
        self.assertEqual(contents.count(content), 1)

    async def test_a_join_during_a_hang_is_acked_without_waiting_for_redis(self) -> None:
        self.redis.signal("STOP")
        self.addCleanup(self.redis.signal, "CONT")
        await wait_until(lambda: self.links() == [False, False], "the hang to be noticed")
        newcomer = await connect(self, self.b)
        self.assertEqual((await newcomer.join("lobby"))["members"], 2)


class HeldBroadcastTests(unittest.TestCase):
    """What is published while the link is down is held up to --redis-queue bytes."""

    timeout = 60

    async def test_broadcasts_past_the_queue_are_dropped_and_counted_the_rest_sent_on_reconnect(self) -> None:
        redis = await RedisServer(self).start()
        node = await ClusterNodes(self, redis.url).node("--redis-queue", "2000")
        backplane = node.factory.backplane
        alice = await member(self, node, "alice")
        carol = await member(self, node, "carol")
        await redis.kill()
        await wait_until(lambda: not backplane.link_up, "the link down")
        alice.send(b"".join(encode_json(MessageType.MESSAGE, {"room": "lobby", "content": "x" * 100}) for _ in range(3)))
        await wait_until(lambda: len(carol.frames) == 5, "local delivery")
        # One read, one envelope: 3 deliveries of ~160 bytes.
        held = backplane.held_bytes
        self.assertGreater(held, 400)
        for _ in range(10):  # ten more reads, each an envelope of its own
            alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "y" * 300})
            alice.send_json(MessageType.HEARTBEAT, None)
            await alice.next_frame()
        self.assertLessEqual(backplane.held_bytes, 2000)
        self.assertGreater(backplane.stats.dropped_frames, 0)
        kept = backplane.stats.dropped_frames
        await redis.start()
        await wait_until(lambda: backplane.link_up and backplane.held_bytes == 0, "the held broadcasts sent")
        # Sent is not yet confirmed: wait for Redis to answer every PUBLISH.
        stats = backplane.stats
        await wait_until(
            lambda: stats.published_frames + stats.unconfirmed_frames + kept >= 3 + 10, "the publishes answered"
        )
        self.assertEqual(backplane.stats.published_frames + kept, 3 + 10)
        self.assertEqual(backplane.stats.unconfirmed_frames, 0)


class KilledNodeTests(unittest.TestCase):
    """Real ``twistd relay`` processes: a node killed with SIGKILL stops being
    counted once its membership TTL runs out, with nobody's help."""

    timeout = 90

    def twistd(self, *argv: str) -> tuple[OutputWatcher, object]:
        watcher = OutputWatcher()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        process = reactor.spawnProcess(
            watcher, TWISTD, [TWISTD, "-n", "--pidfile=", "relay", *argv], env=env, path=tempfile.mkdtemp()
        )

        def kill():
            if watcher.running:
                process.signalProcess("KILL")
            return watcher.ended

        self.addCleanup(kill)
        return watcher, process

    async def start_node(self, redis_url: str) -> tuple[OutputWatcher, object, int]:
        watcher, process = self.twistd(
            "--port", "tcp:0:interface=127.0.0.1", "--redis", redis_url, "--membership-ttl", "2"
        )
        await watcher.wait_for(b"Redis link up")
        (port,) = listening_ports(watcher.output)
        return watcher, process, port

    async def client(self, port: int) -> FrameClient:
        from twisted.internet import endpoints

        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client = await endpoints.connectProtocol(endpoint, FrameClient())
        self.addCleanup(lambda: client.connected and client.transport.abortConnection())
        return client

    async def test_a_killed_nodes_members_stop_counting_within_the_ttl(self) -> None:
        redis = await RedisServer(self).start()
        _, doomed, doomed_port = await self.start_node(redis.url)
        _, _, survivor_port = await self.start_node(redis.url)
        on_doomed = [await self.client(doomed_port) for _ in range(2)]
        for client in on_doomed:
            await client.join("lobby")
        bob = await self.client(survivor_port)
        await bob.hello(userId="bob")
        self.assertEqual((await bob.join("lobby"))["members"], 3)
        # Across real processes, the other way round too.
        on_doomed[0].send_json(MessageType.MESSAGE, {"room": "lobby", "content": "hi"})
        self.assertEqual((await bob.next_json())[1]["content"], "hi")

        killed = reactor.seconds()
        doomed.signalProcess("KILL")
        probe = await self.client(survivor_port)

        async def members() -> int:
            count = (await probe.join("lobby"))["members"]
            await probe.request(MessageType.LEAVE_ROOM, {"room": "lobby"})
            return count

        self.assertEqual(await members(), 4)  # the killed node's share lives on for now
        while (count := await members()) != 2:
            self.assertEqual(count, 4)
            self.assertLess(reactor.seconds() - killed, 10, "the share outlived its TTL")
            from twisted.internet import task

            await task.deferLater(reactor, 0.1, lambda: None)
        # The TTL is 2 s since the last refresh (at most 2/3 s before the kill).
        self.assertLess(reactor.seconds() - killed, 2 + 3)
