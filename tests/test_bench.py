"""Smoke test of relay-bench: a short fan-out run against a loopback server."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial import unittest

from relay.tools.bench import (
    JSON_DELIVERY_MARKER,
    Bench,
    BenchConfig,
    LengthWalker,
    MarkerCounter,
    Tracker,
    json_message,
    parse_args,
    stamp,
)
from relay.wire import (
    Flags,
    MessageType,
    encode,
    encode_binary_delivery,
    encode_json,
    loads,
)
from tests.support import LoopbackServerMixin


def _counter(kind: type) -> MarkerCounter | LengthWalker:
    counter = kind("sub", "room", lambda connection: None)
    counter.joined = True
    return counter


class CountingTests(unittest.TestCase):
    """Subscribers count deliveries without decoding them, across any split."""

    def _deliveries(self) -> bytes:
        frames = [
            encode_json(
                MessageType.MESSAGE,
                {"room": "r", "from": "p", "content": "x" * size, "timestamp": 1, "seq": size},
            )
            for size in range(0, 300, 7)
        ]
        return b"".join(frames)

    def test_marker_appears_once_per_json_delivery(self) -> None:
        data = self._deliveries()
        self.assertEqual(data.count(JSON_DELIVERY_MARKER), 43)

    def test_marker_counter_counts_across_every_split(self) -> None:
        data = self._deliveries()
        for step in (1, 2, 3, 5, 8, 64, 1000):
            counter = _counter(MarkerCounter)
            for start in range(0, len(data), step):
                counter.dataReceived(data[start : start + step])
            self.assertEqual(counter.count, 43, f"split every {step} bytes")

    def test_length_walker_counts_binary_deliveries_across_every_split(self) -> None:
        frame = encode(
            MessageType.MESSAGE,
            Flags.BINARY,
            encode_binary_delivery("r", "p", bytes(range(256)) * 3),
        )
        data = frame * 9
        for step in (1, 3, 4, 7, 100, len(frame), 10_000):
            counter = _counter(LengthWalker)
            for start in range(0, len(data), step):
                counter.dataReceived(data[start : start + step])
            self.assertEqual(counter.count, 9, f"split every {step} bytes")


class TrackerTests(unittest.TestCase):
    """The tracker counts like the others and reads send stamps in place."""

    def test_tracker_counts_and_samples_across_every_split(self) -> None:
        sent = 1000.25
        delivery = encode_json(
            MessageType.MESSAGE,
            {"room": "r", "from": "p", "content": stamp(sent).decode() + "x" * 40, "seq": 1},
        )
        data = delivery * 12
        for step in (1, 5, 7, 50, len(delivery), 4096):
            tracker = Tracker(
                "t", "r", lambda c: None, sample_every=4, clock=lambda: sent + 0.5,
                on_progress=lambda: None,
            )
            tracker.joined = tracker.sampling = True
            for start in range(0, len(data), step):
                tracker.dataReceived(data[start : start + step])
            self.assertEqual(tracker.count, 12, f"split every {step} bytes")
            # Samples whose head was cut by a read are skipped, never misread.
            self.assertTrue(all(latency == 0.5 for latency in tracker.latencies))
            if step >= len(delivery):
                self.assertEqual(len(tracker.latencies), 3)

    def test_publisher_message_layout_is_valid_json_with_the_stamp_first(self) -> None:
        before, after = json_message("room-1", 64)
        frame = before + stamp(12.5) + after
        body = frame[7:]
        self.assertEqual(int.from_bytes(frame[:4], "big"), len(frame) - 4)
        content = loads(body)["content"]
        self.assertEqual(len(content), 64)
        self.assertEqual(float(content[:17]), 12.5)


class CommandLineTests(unittest.TestCase):
    def test_options_become_a_config(self) -> None:
        config, as_json = parse_args(
            ["--subscribers", "7", "--rooms", "2", "--size", "16384", "--binary", "--json"]
        )
        self.assertEqual((config.subscribers, config.rooms, config.size), (7, 2, 16384))
        self.assertTrue(config.binary)
        self.assertTrue(as_json)


class BenchSmokeTests(LoopbackServerMixin, unittest.TestCase):
    """A one-second run delivers messages and loses none."""

    def setUp(self):
        return self.start_server()

    async def _bench(self, **overrides: object) -> dict:
        config = BenchConfig(
            endpoint=f"tcp:host=127.0.0.1:port={self.port.getHost().port}",
            subscribers=4,
            publishers=1,
            rooms=1,
            duration=1.0,
            warmup=0.2,
            # The drain ends once everything has arrived: a long limit costs
            # nothing, and a loaded machine cannot turn lateness into loss.
            drain=30.0,
            progress=False,
        )
        for name, value in overrides.items():
            setattr(config, name, value)
        return await Bench(config, reactor).run()

    async def test_fan_out_run_delivers_without_loss(self) -> None:
        report = await self._bench()
        self.assertGreater(report["received"], 0)
        self.assertEqual(report["lost"], 0)
        self.assertEqual(report["duplicated"], 0)
        self.assertEqual(report["lost_connections"], 0)
        self.assertGreater(report["latency_ms"]["samples"], 0)

    async def test_binary_run_at_a_fixed_rate_delivers_without_loss(self) -> None:
        report = await self._bench(binary=True, rate=200.0, size=1024, rooms=2, publishers=2)
        self.assertGreater(report["received"], 0)
        self.assertEqual(report["lost"], 0)
        self.assertEqual(report["duplicated"], 0)
