"""relay-chaos: short runs against real servers, and its checker catching a broken one."""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from relay.server.rooms import Room
from relay.tools import chaos
from tests.support import LoopbackServerMixin
from tests.test_limits_service import TwistdTestCase
from tests.test_service import REPO, source_env


def options(port: int, *argv: str) -> Any:
    return chaos.parse_options(
        ["--endpoint", f"tcp:host=127.0.0.1:port={port}", "--quiet", "--seed", "7", *argv]
    )


class ChaosRunTests(LoopbackServerMixin, unittest.TestCase):
    """In-process runs: the server and relay-chaos share this reactor."""

    def setUp(self) -> Any:
        # Short timeouts, so tricklers and silent clients end within the run.
        return self.start_server(hello_timeout=1.0, idle_timeout=2, max_pending=256 * 1024)

    async def run_chaos(self, *argv: str) -> tuple[int, dict[str, Any]]:
        run = chaos.ChaosRun(reactor, options(self.port.getHost().port, *argv))
        code = await run.run()
        return code, run.summary()

    async def test_a_short_chaos_run_keeps_every_invariant(self) -> None:
        code, summary = await self.run_chaos(
            "--preset", "chaos", "--duration", "3", "--clients", "20", "--trickle-interval", "0.3"
        )
        self.assertEqual(code, 0, summary["invariants"])
        self.assertGreater(summary["acknowledged"], 0)
        ended = summary["clients_ended"]
        # The misbehaving ones were met with the server's verdicts.
        self.assertTrue(any(kind.startswith("oversize:FRAME_TOO_LARGE") for kind in ended), ended)
        self.assertTrue(any(kind.startswith("garbage:") and not kind.endswith(":closed") for kind in ended), ended)
        self.assertTrue(any(kind.startswith("trickle:HEARTBEAT_TIMEOUT") for kind in ended), ended)

    async def test_the_fragmentation_preset_splits_every_frame_and_still_passes(self) -> None:
        code, summary = await self.run_chaos("--preset", "fragmentation", "--duration", "2")
        self.assertEqual(code, 0, summary["invariants"])
        self.assertGreater(summary["delivered"], 0)

    async def test_the_load_preset_passes(self) -> None:
        code, summary = await self.run_chaos("--preset", "load", "--duration", "2", "--members", "10", "--publishers", "5")
        self.assertEqual(code, 0, summary["invariants"])
        self.assertEqual(summary["acknowledged"], summary["published"])
        # Ten members each, and publishers sharing a room hear each other too.
        self.assertGreaterEqual(summary["delivered"], summary["acknowledged"] * 10)

    async def test_a_server_that_loses_deliveries_fails_the_run(self) -> None:
        original = Room.broadcast
        dropped = []

        def lossy(room: Room, frame: bytes, *args: Any) -> None:
            if len(dropped) < 3 and b'"n":5,' in frame:
                dropped.append(frame)
                return
            original(room, frame, *args)

        self.patch(Room, "broadcast", lossy)
        code, summary = await self.run_chaos("--preset", "load", "--duration", "1", "--members", "3", "--publishers", "2")
        self.assertEqual(code, 1)
        verdict = summary["invariants"]["acknowledged messages delivered once, in order"]
        self.assertFalse(verdict["ok"])
        self.assertIn("acknowledged not delivered", verdict["detail"])


class CheckerTests(unittest.TestCase):
    def test_delivery_problems_name_each_broken_property(self) -> None:
        connection = chaos.ChaosConnection(None, "stable-member", "m")  # type: ignore[arg-type]
        member = chaos.Member(connection, {"p"}, reactor)
        publisher = chaos.Publisher(chaos.ChaosConnection(None, "stable-publisher", "p"), "r")  # type: ignore[arg-type]
        publisher.sent = [1, 2, 3]
        publisher.acknowledged = [1, 2]
        check = chaos.ChaosRun.delivery_problems
        self.assertEqual(check(member, publisher, [1, 2, 3]), [])
        self.assertEqual(check(member, publisher, [1, 2]), [])
        self.assertIn("out of order", check(member, publisher, [2, 1])[0])
        self.assertIn("duplicates", check(member, publisher, [1, 1, 2])[0])
        self.assertIn("never sent", check(member, publisher, [1, 2, 9])[0])
        self.assertIn("acknowledged not delivered", check(member, publisher, [1])[0])

    def test_mix_and_metrics_parsing(self) -> None:
        self.assertEqual(chaos.parse_mix("rst=3, garbage"), {"rst": 3, "garbage": 1})
        self.assertRaises(Exception, chaos.parse_mix, "teleport=1")
        text = '# HELP x\nrelay_connections{transport="tcp"} 3\nrelay_connections{transport="ws"} 2\nother 1.5\n'
        self.assertEqual(chaos.parse_metrics(text), {"relay_connections": 5.0, "other": 1.5})

    def test_presets_fill_what_the_command_line_leaves(self) -> None:
        parsed = chaos.parse_options(["--preset", "load", "--members", "3"])
        self.assertEqual((parsed.members, parsed.publishers, parsed.clients), (3, 20, 0))
        self.assertEqual(chaos.parse_options(["--preset", "fragmentation"]).fragment, True)


class ChaosCommandTests(TwistdTestCase):
    async def test_relay_chaos_against_twistd_relay_prints_one_json_object(self) -> None:
        server = self.twistd("--port", "tcp:0:interface=127.0.0.1", "--hello-timeout", "1", "--idle-timeout", "2")
        port = await self.listening_port(server)
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "relay.tools.chaos", "--endpoint", f"tcp:host=127.0.0.1:port={port}", "--duration", "3",
             "--clients", "12", "--trickle-interval", "0.3", "--server-pid", str(self.process.pid), "--json", "--quiet"],
            env=source_env(),
            path=str(REPO),
        )
        self.assertEqual(code, 0, (out[-2000:], err[-2000:]))
        summary = json.loads(out.decode().strip().splitlines()[-1])
        self.assertTrue(summary["ok"], summary["invariants"])
        self.assertIn("server RSS drift", summary["invariants"])
        self.assertGreater(summary["rss_kib"]["end"], 10_000)
