"""The yardsticks in benchmarks/ still run and report what they say they do.

``redis_reference.py`` runs against a real ``redis-server`` (skipped without
one, unless ``RELAY_REQUIRE_REDIS=1``); ``send_floor.py`` needs nothing.
Short runs: these check the tools, not the machine.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor, utils
from twisted.trial import unittest

from tests.cluster_support import RedisServer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


async def run_json(test: unittest.TestCase, script: str, *args: str) -> dict[str, Any]:
    """Run a benchmark script in a child process; the JSON line it printed."""
    env = dict(os.environ, PYTHONPATH=str(BENCHMARKS.parent))
    out, err, code = await utils.getProcessOutputAndValue(
        sys.executable, [str(BENCHMARKS / script), *args], env=env, reactor=reactor
    )
    test.assertEqual(code, 0, err.decode(errors="replace"))
    return json.loads(out.decode().strip().splitlines()[-1])


class RedisReferenceTests(unittest.TestCase):
    async def setUp(self) -> None:
        self.redis = await RedisServer(self).start()

    def options(self, *args: str) -> list[str]:
        port, pid = str(self.redis.port), str(self.redis.pid)
        return ["--port", port, "--server-pid", pid, "--duration", "1", "--warmup", "0.2", *args]

    async def test_a_paced_run_delivers_every_message_and_samples_latency(self) -> None:
        report = await run_json(self, "redis_reference.py", *self.options("--subscribers", "4", "--rate", "100"))
        # 100 messages a second to 4 subscribers, over one second.
        self.assertGreater(report["delivered_per_second"], 300)
        self.assertLess(report["delivered_per_second"], 500)
        self.assertGreater(report["latency_ms"]["samples"], 300)
        self.assertGreater(report["server_us_per_delivery"], 0)

    async def test_a_full_speed_run_in_two_rooms_delivers(self) -> None:
        report = await run_json(
            self, "redis_reference.py", *self.options("--subscribers", "4", "--rooms", "2", "--window", "50")
        )
        self.assertGreater(report["delivered_per_second"], 1000)
        self.assertNotIn("latency_ms", report)


class SendFloorTests(unittest.TestCase):
    async def test_it_reports_the_cpu_of_each_send(self) -> None:
        report = await run_json(
            self,
            "send_floor.py",
            *("--subscribers", "4", "--rate", "200", "--duration", "0.5", "--receiver-core", "0"),
        )
        self.assertGreater(report["sends_per_second"], 600)
        self.assertGreater(report["us_per_send"], 0)
        self.assertAlmostEqual(
            report["us_per_send"], report["user_us_per_send"] + report["system_us_per_send"], delta=0.02
        )
