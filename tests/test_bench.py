"""Smoke test of relay-bench: a short fan-out run against a loopback server."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr

from twisted.internet import reactor
from twisted.trial import unittest

from relay.tools.bench import (
    JSON_DELIVERY_MARKER,
    Bench,
    BenchConfig,
    LengthWalker,
    MarkerCounter,
    Tracker,
    format_report,
    json_message,
    parse_args,
    plural,
    stamp,
)
from relay.server.tap import Options, makeService
from relay.tools.bench_workers import socket_address
from relay.wire import Flags, MessageType, encode, encode_binary_delivery, encode_json, loads

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
        self.assertFalse(config.compress)
        self.assertTrue(parse_args(["--compress"])[0].compress)

    def test_a_rate_spaces_messages_evenly_unless_burst_is_asked_for(self) -> None:
        config, _ = parse_args(["--rate", "750"])
        self.assertTrue(config.even)
        config, _ = parse_args(["--rate", "750", "--spacing", "burst"])
        self.assertFalse(config.even)
        config, _ = parse_args([])
        self.assertFalse(config.even)

    def test_many_rooms_per_connection_become_a_config(self) -> None:
        config, _ = parse_args(
            ["--rooms", "10000", "--rooms-per-connection", "50", "--rate", "1", "--processes", "2"]
        )
        self.assertEqual((config.rooms, config.rooms_per_connection, config.processes), (10000, 50, 2))

    def test_even_spacing_publishes_from_plain_tcp_or_unix_sockets(self) -> None:
        self.assertEqual(socket_address("tcp:host=127.0.0.1:port=4100")[1], ("127.0.0.1", 4100))
        self.assertEqual(socket_address("tcp:127.0.0.1:4100")[1], ("127.0.0.1", 4100))
        self.assertEqual(socket_address("unix:path=/tmp/relay.sock")[1], "/tmp/relay.sock")
        with self.assertRaises(ValueError):
            socket_address("tls:host=127.0.0.1:port=4100")


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

    async def test_the_tracker_joins_its_room_after_every_other_subscriber(self) -> None:
        # Rooms write to their members in join order: joining last, the
        # tracker samples each broadcast's slowest delivery.
        registry = self.factory.registry
        joins: list[str] = []
        join = registry.join

        def recording_join(member, name):
            joins.append(member.user_id)
            return join(member, name)

        registry.join = recording_join
        await self._bench(subscribers=6)
        subscribers = [user for user in joins if user.startswith("bench-sub-")]
        self.assertEqual(len(subscribers), 6)
        self.assertEqual(subscribers[-1], "bench-sub-0")  # the room's tracker

    async def test_compressed_run_delivers_compressed_frames_without_loss(self) -> None:
        report = await self._bench(compress=True, size=16384)
        self.assertGreater(report["received"], 0)
        self.assertEqual((report["lost"], report["duplicated"]), (0, 0))
        self.assertGreater(report["latency_ms"]["samples"], 0)  # stamps read through zlib
        # Each broadcast compressed once, and what was written is far smaller.
        compressor = self.factory.compressor
        self.assertEqual(compressor.compressions, self.factory.stats.messages_published)
        self.assertLess(compressor.bytes_after * 20, compressor.bytes_before)

    async def test_binary_run_at_a_fixed_rate_delivers_without_loss(self) -> None:
        report = await self._bench(binary=True, rate=200.0, size=1024, rooms=2, publishers=2)
        self.assertGreater(report["received"], 0)
        self.assertEqual(report["lost"], 0)
        self.assertEqual(report["duplicated"], 0)
        self.assertEqual(report["config"]["spacing"], "even")
        self.assertIn("publisher_lateness", report)

    async def test_burst_spacing_at_a_fixed_rate_delivers_without_loss(self) -> None:
        report = await self._bench(rate=200.0, spacing="burst")
        self.assertGreater(report["received"], 0)
        self.assertEqual(report["lost"], 0)
        self.assertEqual(report["duplicated"], 0)
        self.assertEqual(report["config"]["spacing"], "burst")
        self.assertNotIn("publisher_lateness", report)

    async def test_connections_in_several_rooms_get_every_room_s_messages(self) -> None:
        # 6 subscribers and 2 publishers in 3 of the 6 rooms each: 3
        # subscribers and 1 publisher per room.
        report = await self._bench(
            rooms=6, subscribers=6, publishers=2, rooms_per_connection=3, rate=50.0, processes=2
        )
        self.assertGreater(report["published_total"], 0)
        self.assertEqual(report["expected"], 3 * report["published_total"])
        self.assertEqual(report["received"], report["expected"])
        self.assertEqual(report["lost_connections"], 0)
        self.assertGreater(report["latency_ms"]["samples"], 0)

    async def test_server_cpu_per_delivery_is_reported(self) -> None:
        report = await self._bench(server_pids=(os.getpid(),))
        self.assertGreater(report["server_us_per_delivery"], 0)
        per_second = report["delivered_per_server_cpu_second"]
        self.assertLess(abs(report["server_us_per_delivery"] * per_second / 1e6 - 1), 0.01)
        self.assertIn("us of server CPU each", format_report(report))


class ReportWordingTests(unittest.TestCase):
    """The human-readable report shows only what was measured, in plain words."""

    def report(self, **changes: object) -> dict:
        report = {
            "published_per_second": 0, "delivered_per_second": 0, "payload_mb_per_second": 0.0,
            "latency_ms": {"p50": None, "p90": None, "p99": None, "max": None, "samples": 0},
            "expected": 0, "received": 0, "lost": 0, "lost_connections": 1,
            "bench_cpu_percent": 3.0, "server_cpu_percent": None, "published_total": 0,
        }
        report.update(changes)
        return report

    def test_no_deliveries_and_no_server_pid_print_no_placeholder(self) -> None:
        text = format_report(self.report())
        for placeholder in ("None", "nan", "server None%"):
            self.assertNotIn(placeholder, text)
        self.assertIn("no samples", text)
        self.assertIn("(1 connection lost)", text)
        self.assertIn("0 of 0 deliveries to subscribers", text)

    def test_counts_are_singular_or_plural(self) -> None:
        self.assertEqual((plural(1, "connection"), plural(2, "connection")), ("1 connection", "2 connections"))
        self.assertEqual(plural(0, "delivery", "deliveries"), "0 deliveries")

    def test_server_metrics_are_reported_beside_the_bench_counts(self) -> None:
        text = format_report(self.report(
            server_cpu_percent=50.0, published_total=10, received=40,
            server_metrics={"messages_published": 10, "deliveries": 40, "frames_out": 48,
                            "bytes_out": 6_400_000, "slow_consumers": 0},
        ))
        self.assertIn("server 50.0%", text)
        self.assertIn("server      published 10  deliveries 40  frames out 48  bytes out 6.4 MB  slow consumers 0", text)
        self.assertIn("bench       published 10  received 40", text)

    def test_bad_arguments_are_named(self) -> None:
        for argv, named in (
            (["--rooms", "0"], "--rooms"),
            (["--subscribers", "-1"], "--subscribers"),
            (["--duration", "0"], "--duration"),
            (["--rate", "fast"], "--rate"),
            (["--window", "-5"], "--window"),
            (["--warmup", "nan"], "--warmup"),
            (["--metrics-url", "localhost:9100"], "--metrics-url"),
            (["--spacing", "even"], "--spacing"),
            (["--spacing", "sometimes", "--rate", "5"], "--spacing"),
            (["--rooms", "4", "--rooms-per-connection", "2"], "--rooms-per-connection"),
            (["--rooms", "4", "--rooms-per-connection", "2", "--rate", "5", "--spacing", "burst"], "--rooms-per-connection"),
            (["--rooms", "4", "--rooms-per-connection", "5", "--rate", "5"], "--rooms-per-connection"),
            (["--processes", "0"], "--processes"),
        ):
            stderr = io.StringIO()
            with redirect_stderr(stderr), self.assertRaises(SystemExit):
                parse_args(argv)
            self.assertIn(f"argument {named}", stderr.getvalue(), argv)


class BenchMetricsURLTests(unittest.TestCase):
    """--metrics-url reads the server's own counts of the run."""

    async def test_server_counts_match_the_bench_counts(self) -> None:
        options = Options()
        options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--metrics", "tcp:0:interface=127.0.0.1"])
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        config = BenchConfig(
            endpoint=f"tcp:host=127.0.0.1:port={service.listening_ports[0].getHost().port}",
            subscribers=3, publishers=1, rooms=1, duration=1.0, warmup=0.2, drain=5.0, rate=200.0,
            progress=False,
            metrics_url=f"http://127.0.0.1:{service.metrics_ports[0].getHost().port}/metrics",
        )
        report = await Bench(config, reactor).run()
        server = report["server_metrics"]
        self.assertEqual(report["lost"], 0)
        self.assertGreater(report["published_total"], 0)
        self.assertEqual(server["messages_published"], report["published_total"])
        self.assertEqual(server["deliveries"], report["received"])
        self.assertEqual(server["slow_consumers"], 0)
        self.assertGreater(server["bytes_out"], 0)
        # HELLO and JOIN acks are frames out too, one each per connection.
        self.assertEqual(server["frames_out"], report["received"] + 2 * 4)
        self.assertIn("(its /metrics, whole run)", format_report(report))
