"""The cluster's link in /metrics and /healthz: a real redis-server, a real node."""

from __future__ import annotations

import orjson
from twisted.trial import unittest

from tests.cluster_support import ClusterNodes, RedisServer, connect, wait_until
from tests.scrape import base_url, http_get, scrape


class ClusterMetricsTests(unittest.TestCase):
    timeout = 60

    async def setUp(self) -> None:
        self.redis = await RedisServer(self).start()
        self.node = await ClusterNodes(self, self.redis.url).node(
            "--metrics", "tcp:0:interface=127.0.0.1"
        )
        self.base = base_url(self.node.metrics_ports[0])

    async def test_link_up_and_what_crossed_it_are_scraped(self) -> None:
        client = await connect(self, self.node)
        await client.join("lobby")
        client.send_json(0x04, {"room": "lobby", "content": "hi"})
        await wait_until(
            lambda: self.node.factory.backplane.stats.published_frames >= 1, "the publish to Redis"
        )
        metrics = await scrape(self.base)
        self.assertEqual(metrics.value("relay_cluster_link_up"), 1)
        self.assertEqual(metrics.value("relay_cluster_subscribed_rooms"), 1)
        self.assertGreaterEqual(metrics.value("relay_cluster_published_frames_total"), 1)
        status, _, body = await http_get(self.base + "healthz")
        self.assertEqual(status, 200)
        self.assertTrue(orjson.loads(body)["checks"]["cluster"]["ok"])

    async def test_healthz_is_503_while_redis_is_down(self) -> None:
        await self.redis.kill()
        await wait_until(lambda: not self.node.factory.backplane.link_up, "the link to drop")
        status, _, body = await http_get(self.base + "healthz")
        self.assertEqual(status, 503)
        self.assertFalse(orjson.loads(body)["checks"]["cluster"]["ok"])
        self.assertEqual((await scrape(self.base)).value("relay_cluster_link_up"), 0)


class WorkersAndMetricsTests(unittest.TestCase):
    def test_metrics_with_workers_is_a_usage_error(self) -> None:
        from twisted.python import usage

        from relay.server.tap import Options

        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(
                ["--workers", "2", "--redis", "redis://127.0.0.1:1/0", "--metrics", "tcp:9100"]
            )
        self.assertIn("--metrics", str(caught.exception))
