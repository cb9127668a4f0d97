"""relay-bench across a cluster: publishers on one node, subscribers on another."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.trial import unittest

from relay.tools.bench import Bench, BenchConfig, format_report, parse_args
from tests.cluster_support import ClusterNodes, RedisServer


class ClusterBenchTests(unittest.TestCase):
    timeout = 60

    def test_publisher_endpoint_and_several_server_pids_on_the_command_line(self) -> None:
        config, _ = parse_args(
            ["--publisher-endpoint", "tcp:host=127.0.0.1:port=2", "--server-pid", "10", "--server-pid", "11"]
        )
        self.assertEqual((config.publisher_endpoint, config.server_pids), ("tcp:host=127.0.0.1:port=2", (10, 11)))

    async def test_publishers_on_another_node_reach_every_subscriber_without_loss(self) -> None:
        redis = await RedisServer(self).start()
        nodes = ClusterNodes(self, redis.url)
        a, b = await nodes.node(), await nodes.node()
        address = "tcp:host=127.0.0.1:port={}"
        config = BenchConfig(
            endpoint=address.format(b.listening_ports[0].getHost().port),
            publisher_endpoint=address.format(a.listening_ports[0].getHost().port),
            subscribers=4,
            publishers=2,
            rooms=2,
            duration=1.0,
            warmup=0.2,
            drain=5.0,
            server_pids=(os.getpid(), redis.pid),
            progress=False,
        )
        report = await Bench(config, reactor).run()
        self.assertGreater(report["received"], 0)
        self.assertEqual((report["lost"], report["duplicated"], report["lost_connections"]), (0, 0, 0))
        # Every delivery crossed Redis: node A has no subscriber.
        self.assertEqual(b.factory.backplane.stats.received_frames * 2, report["received"])
        self.assertEqual(set(report["server_cpu_percent_by_pid"]), {str(os.getpid()), str(redis.pid)})
        self.assertIn(f"pid {redis.pid}", format_report(report))
