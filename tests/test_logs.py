"""--log-format and --log-level: the observer, and the real ``twistd relay``."""

from __future__ import annotations

import io
import json
import os
import signal
import tempfile
from typing import Any

from twisted.internet import endpoints, error, reactor, task
from twisted.internet.protocol import connectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, Logger, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from relay.server.factory import RelayFactory
from relay.server.logs import event_as_json, make_observer
from relay.wire import MessageType, encode_json
from tests.support import FrameClient
from tests.test_service import TWISTD, ProcessWatcher, source_env


class ObserverTests(unittest.TestCase):
    def emit(self, format_: str, level: str, *events: tuple[LogLevel, str, dict[str, Any]]) -> str:
        out = io.StringIO()
        logger = Logger(namespace="relay.test", observer=make_observer(out, format_, level))
        for event_level, text, fields in events:
            logger.emit(event_level, text, **fields)
        return out.getvalue()

    def test_json_is_one_object_per_line_with_the_structured_fields(self) -> None:
        text = self.emit(
            "json", "info",
            (LogLevel.info, "{conn} joined {room}", {"conn": "c1", "room": "lobby"}),
            (LogLevel.warn, "odd\nline", {}),
        )
        lines = text.splitlines()
        self.assertEqual(len(lines), 2)
        first, second = map(json.loads, lines)
        self.assertEqual(
            {k: first[k] for k in ("level", "namespace", "message", "conn", "room")},
            {"level": "info", "namespace": "relay.test", "message": "c1 joined lobby",
             "conn": "c1", "room": "lobby"},
        )
        self.assertIsInstance(first["time"], float)
        self.assertEqual((second["level"], second["message"]), ("warn", "odd\nline"))

    def test_json_carries_the_traceback_of_a_failure(self) -> None:
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        record = json.loads(event_as_json({
            "log_format": "it broke", "log_level": LogLevel.critical, "log_failure": failure,
            "log_namespace": "n", "log_time": 1.0,
        }))
        self.assertEqual(record["message"], "it broke")
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_warn_level_drops_info_and_debug(self) -> None:
        text = self.emit(
            "text", "warn",
            (LogLevel.debug, "frame", {}),
            (LogLevel.info, "c1 connected", {}),
            (LogLevel.warn, "disk is full", {}),
            (LogLevel.error, "cannot write", {}),
        )
        self.assertNotIn("frame", text)
        self.assertNotIn("connected", text)
        self.assertIn("[relay.test#warn] disk is full", text)
        self.assertIn("cannot write", text)

    def test_default_text_format_is_twistds_line(self) -> None:
        text = self.emit("text", "info", (LogLevel.info, "hello {who}", {"who": "you"}))
        self.assertRegex(text, r"^\d{4}-\d\d-\d\dT\S+ \[relay.test#info\] hello you\n$")


class RepeatedEventTests(unittest.TestCase):
    """A client repeating a mistake is logged once per code, not once per frame."""

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_refusals_are_logged_once_per_code_per_connection(self) -> None:
        factory = RelayFactory()
        connection = factory.buildProtocol(None)
        transport = StringTransport()
        connection.makeConnection(transport)
        bad = encode_json(MessageType.MESSAGE, {"room": "nowhere", "content": 1})
        invalid = encode_json(MessageType.JOIN_ROOM, {"room": ""})
        connection.dataReceived(bad * 20 + invalid * 5)
        connection.dataReceived(bad * 20)
        refusals = [e for e in self.events if "refused a request" in e.get("log_format", "")]
        self.assertEqual([e["code"] for e in refusals], ["NOT_IN_ROOM", "INVALID_ROOM"])
        # Every refusal still answers the client, and is counted.
        self.assertEqual(transport.value().count(b"NOT_IN_ROOM"), 40)
        self.assertEqual(factory.stats.errors_sent["NOT_IN_ROOM"], 40)
        connection.connectionLost(connectionDone)

    def test_error_frames_from_a_client_are_logged_once_per_connection(self) -> None:
        factory = RelayFactory()
        connection = factory.buildProtocol(None)
        connection.makeConnection(StringTransport())
        connection.dataReceived(encode_json(MessageType.ERROR, {"code": "X"}) * 30)
        logged = [e for e in self.events if "sent an ERROR frame" in e.get("log_format", "")]
        self.assertEqual(len(logged), 1)
        self.assertEqual(factory.stats.frames_in_by_type[MessageType.ERROR], 30)
        connection.connectionLost(connectionDone)

    def test_a_long_refusal_message_is_bounded_in_the_log(self) -> None:
        factory = RelayFactory()
        connection = factory.buildProtocol(None)
        connection.makeConnection(StringTransport())
        connection.dataReceived(encode_json(MessageType.MESSAGE, {"room": "\x01" * 5000, "content": 1}))
        (refusal,) = [e for e in self.events if "refused a request" in e.get("log_format", "")]
        self.assertLess(len(refusal["message"]), 300)
        connection.connectionLost(connectionDone)


class TwistdLogTests(unittest.TestCase):
    """The options as twistd runs them: stdout with -n."""

    def twistd(self, *argv: str) -> tuple[ProcessWatcher, str]:
        socket_path = os.path.join(tempfile.mkdtemp(), "relay.sock")
        watcher = ProcessWatcher()
        process = reactor.spawnProcess(
            watcher, TWISTD, [TWISTD, "-n", "--pidfile=", "relay", "--port", f"unix:{socket_path}", *argv],
            env=source_env(), path=tempfile.mkdtemp(),
        )
        self.addCleanup(lambda: (process.pid is not None and process.signalProcess("KILL")) or watcher.ended)
        return watcher, socket_path

    async def session(self, watcher: ProcessWatcher, socket_path: str) -> None:
        """Connect, join, get refused twice, then stop the server with SIGTERM."""
        client = await _connect_when_listening(socket_path, watcher)
        await client.hello(userId="u")
        await client.join("r")
        for _ in range(2):
            await client.request(MessageType.MESSAGE, {"room": "elsewhere", "content": 1})
        os.kill(watcher.transport.pid, signal.SIGTERM)
        await client.closed
        await watcher.ended

    async def test_json_format_writes_only_json_lines_and_a_summary_object(self) -> None:
        watcher, socket_path = self.twistd("--log-format", "json")
        await self.session(watcher, socket_path)
        records = [json.loads(line) for line in watcher.output.decode().splitlines()]
        (summary,) = [r for r in records if r["message"].startswith("Relay stopped after")]
        self.assertEqual((summary["connections_total"], summary["rooms_peak"]), (1, 1))
        self.assertIn("uptime", summary)
        self.assertEqual(len([r for r in records if "refused a request" in r["message"]]), 1)
        self.assertTrue(any(r["message"] == "Received SIGTERM, shutting down." for r in records))

    async def test_warn_level_silences_per_connection_lines(self) -> None:
        watcher, socket_path = self.twistd("--log-level", "warn")
        await self.session(watcher, socket_path)
        output = watcher.output.decode()
        for noise in ("connected from", "joined r", "refused a request", "disconnected"):
            self.assertNotIn(noise, output)

    async def test_default_is_text_at_info(self) -> None:
        watcher, socket_path = self.twistd()
        await self.session(watcher, socket_path)
        output = watcher.output.decode()
        self.assertIn("connected from", output)
        self.assertIn("joined r", output)
        self.assertRegex(output, r"\[relay.server.tap#info\] Relay stopped after [\d.]+ s: connections 1 \(peak 1\)")


async def _connect_when_listening(path: str, watcher: ProcessWatcher) -> FrameClient:
    """Connect once the server listens (with --log-level warn it says nothing)."""
    endpoint = endpoints.UNIXClientEndpoint(reactor, path)
    for _ in range(600):  # up to a minute on a loaded machine
        if watcher.ended.called:
            raise AssertionError(watcher.output.decode(errors="replace"))
        try:
            return await endpoints.connectProtocol(endpoint, FrameClient())
        except (error.ConnectError, OSError):
            await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"nothing listens on {path}")


class LogOptionTests(unittest.TestCase):
    def test_bad_values_are_refused_by_name(self) -> None:
        from twisted.python import usage

        from relay.server.tap import Options

        for argv in (["--log-format", "xml"], ["--log-level", "loud"]):
            with self.assertRaises(usage.UsageError) as caught:
                Options().parseOptions(argv)
            self.assertIn(argv[0].lstrip("-"), str(caught.exception))
