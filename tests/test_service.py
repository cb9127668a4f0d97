"""The service as users run it: options, makeService, the twistd plugin, the wheel."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints, error, protocol, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python import usage
from twisted.trial import unittest

from relay.server.tap import Options, makeService
from relay.wire import ErrorCode, MessageType
from tests.support import FrameClient

REPO = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))


def source_env() -> dict[str, str]:
    """Environment for a subprocess that must find this checkout's plugin."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class OptionsTests(unittest.TestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        options = self.parse()
        self.assertEqual(options["ports"], ["tcp:4000"])
        config = options.config()
        self.assertEqual(
            (config.max_frame_size, config.idle_timeout, config.max_pending, config.max_rooms),
            (1024 * 1024, 60, 4 * 1024 * 1024, 64),
        )
        self.assertFalse(config.debug)
        self.assertEqual(config.read_size, 124 * 1024)

    def test_port_is_repeatable(self) -> None:
        options = self.parse("--port", "tcp:1", "-p", "unix:/tmp/x")
        self.assertEqual(options["ports"], ["tcp:1", "unix:/tmp/x"])

    def test_debug_from_the_environment(self) -> None:
        self.patch(os, "environ", {"RELAY_DEBUG": "1"})
        self.assertTrue(self.parse().config().debug)

    def test_limits_must_be_positive(self) -> None:
        for option in (
            "--max-frame-size",
            "--max-pending",
            "--max-rooms",
            "--max-connections",
            "--read-size",
        ):
            self.assertRaises(usage.UsageError, self.parse, option, "0")
            self.assertRaises(usage.UsageError, self.parse, option, "lots")


class MakeServiceTests(unittest.TestCase):
    def start(self, *argv: str) -> Any:
        options = Options()
        options.parseOptions(list(argv))
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    async def client(self, endpoint: Any) -> FrameClient:
        client = await endpoints.connectProtocol(endpoint, FrameClient())
        self.addCleanup(lambda: client.transport.loseConnection() or client.closed)
        return client

    async def test_tcp_and_unix_listeners_share_rooms_and_shut_down_cleanly(self) -> None:
        path = tempfile.mkdtemp()
        socket_path = os.path.join(path, "relay.sock")
        service = self.start("--port", "tcp:0:interface=127.0.0.1", "--port", f"unix:{socket_path}")
        tcp_port = service.listening_ports[0].getHost().port
        over_tcp = await self.client(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", tcp_port))
        over_unix = await self.client(endpoints.UNIXClientEndpoint(reactor, socket_path))
        await over_tcp.hello(userId="tcp")
        await over_unix.join("shared")
        await over_tcp.join("shared")
        over_tcp.send_json(MessageType.MESSAGE, {"room": "shared", "content": "hi"})
        self.assertEqual((await over_unix.next_json())[1]["from"], "tcp")

        stopped = service.stopService()
        for client in (over_tcp, over_unix):
            type_, body = await client.next_json()
            self.assertEqual((type_, body["code"], body["fatal"]), (6, "SERVER_SHUTDOWN", True))
            await client.closed
        await stopped
        self.assertEqual(service.factory.connections, set())

    async def test_read_size_becomes_each_socket_connections_buffer_size(self) -> None:
        socket_path = os.path.join(tempfile.mkdtemp(), "relay.sock")
        service = self.start(
            "--port", "tcp:0:interface=127.0.0.1", "--port", f"unix:{socket_path}",
            "--read-size", "12345",
        )
        tcp_port = service.listening_ports[0].getHost().port
        for endpoint in (
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", tcp_port),
            endpoints.UNIXClientEndpoint(reactor, socket_path),
        ):
            client = await self.client(endpoint)
            await client.hello()
        # A socket transport reads up to bufferSize bytes at once and pauses
        # its producer past that many unsent bytes.
        self.assertEqual(
            [connection.transport.bufferSize for connection in service.factory.connections],
            [12345, 12345],
        )

    def test_a_port_that_cannot_be_bound_stops_startup(self) -> None:
        taken = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        options = Options()
        options.parseOptions(["--port", f"tcp:{taken.getHost().port}:interface=127.0.0.1"])
        service = makeService(options, reactor=reactor)
        self.assertRaises(error.CannotListenError, service.startService)


class ProcessWatcher(protocol.ProcessProtocol):
    """Collects a child's output; tells when a marker shows up and how it ended."""

    def __init__(self) -> None:
        self.output = b""
        self._markers: list[tuple[bytes, defer.Deferred[None]]] = []
        self.ended: defer.Deferred[Any] = defer.Deferred()

    def wait_for(self, marker: bytes) -> defer.Deferred[None]:
        waiter: defer.Deferred[None] = defer.Deferred()
        self._markers.append((marker, waiter))
        self._check()
        return waiter

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self._check()

    errReceived = outReceived

    def _check(self) -> None:
        for marker, waiter in list(self._markers):
            if marker in self.output:
                self._markers.remove((marker, waiter))
                waiter.callback(None)

    def processEnded(self, reason: Any) -> None:
        for _, waiter in self._markers:
            waiter.errback(AssertionError(self.output.decode(errors="replace")))
        self._markers = []
        self.ended.callback(reason.value)


class TwistdPluginTests(unittest.TestCase):
    """The real ``twistd relay`` in a child process."""

    def twistd(self, *argv: str) -> ProcessWatcher:
        collector = ProcessWatcher()
        cwd = tempfile.mkdtemp()
        process = reactor.spawnProcess(
            collector,
            TWISTD,
            [TWISTD, "-n", "--pidfile=", "relay", *argv],
            env=source_env(),
            path=cwd,
        )

        def kill_if_running() -> Any:
            if process.pid is not None:
                process.signalProcess("KILL")
            return collector.ended

        self.addCleanup(kill_if_running)
        return collector

    async def test_help_lists_every_option_with_its_default(self) -> None:
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["relay", "--help"], env=source_env(), path=tempfile.mkdtemp()
        )
        self.assertEqual(code, 0, err)
        out = b" ".join(out.split())  # usage wraps a long help line anywhere
        for expected in (
            b"--port",
            b"tcp:4000",
            b"--max-frame-size",
            b"1048576",
            b"--idle-timeout",
            b"[default: 60]",
            b"--max-pending",
            b"4194304",
            b"--max-rooms",
            b"[default: 64]",
            b"--debug",
            b"RELAY_DEBUG",
            b"--metrics",
            b"--log-format",
            b"[default: text]",
            b"--log-level",
            b"[default: info]",
        ):
            self.assertIn(expected, out)

    async def test_serves_then_shuts_down_on_sigterm(self) -> None:
        socket_path = os.path.join(tempfile.mkdtemp(), "relay.sock")
        server = self.twistd("--port", f"unix:{socket_path}")
        await server.wait_for(b"Listening on")
        client = await endpoints.connectProtocol(
            endpoints.UNIXClientEndpoint(reactor, socket_path), FrameClient()
        )
        await client.hello(userId="u")
        self.assertEqual((await client.join("r"))["members"], 1)

        os.kill(self.pid_of(server), signal.SIGTERM)
        type_, body = await client.next_json()
        self.assertEqual((type_, body["code"]), (MessageType.ERROR, ErrorCode.SERVER_SHUTDOWN))
        await client.closed
        # twistd exits by re-raising the signal it stopped for.
        ended = await server.ended
        self.assertEqual((ended.exitCode, ended.signal), (None, signal.SIGTERM))
        self.assertIn(b"Relay stopped after ", server.output)
        self.assertIn(b"connections 1 (peak 1)", server.output)

    async def test_port_in_use_stops_startup_with_one_clear_line(self) -> None:
        taken = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        server = self.twistd("--port", f"tcp:{port}:interface=127.0.0.1")
        self.assertEqual((await server.ended).exitCode, 1)
        (line,) = [line for line in server.output.splitlines() if b"listen" in line]
        self.assertIn(b"Relay cannot start: Couldn't listen on 127.0.0.1:%d" % port, line)
        self.assertIn(b"Address already in use", line)
        self.assertNotIn(b"Traceback", server.output)

    async def test_metrics_port_in_use_stops_startup_too(self) -> None:
        taken = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = taken.getHost().port
        server = self.twistd(
            "--port", "tcp:0:interface=127.0.0.1", "--metrics", f"tcp:{port}:interface=127.0.0.1"
        )
        self.assertEqual((await server.ended).exitCode, 1)
        self.assertIn(b"Relay cannot start: Couldn't listen on 127.0.0.1:%d" % port, server.output)
        self.assertNotIn(b"Traceback", server.output)

    @staticmethod
    def pid_of(collector: ProcessWatcher) -> int:
        return collector.transport.pid


class PackagingTests(unittest.TestCase):
    """A plain, non-editable ``pip install .`` must expose the plugin to twistd.

    It builds a second virtualenv, which takes longer than the rest of the
    suite: it runs where RELAY_TEST_WHEEL=1, as in CI (``.ci/run``).
    """

    if os.environ.get("RELAY_TEST_WHEEL") != "1":
        skip = "builds a virtualenv from a wheel; run it with RELAY_TEST_WHEEL=1 (.ci/run sets it)"

    timeout = 600

    async def test_wheel_installs_the_twistd_plugin(self) -> None:
        venv = os.path.join(tempfile.mkdtemp(), "venv")
        await self.run_ok(sys.executable, "-m", "venv", venv)
        await self.run_ok(
            os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check", str(REPO)
        )
        out = await self.run_ok(os.path.join(venv, "bin", "twistd"), "relay", "--help")
        self.assertIn(b"--max-pending", out)
        # The wheel adds its plugin module and never replaces Twisted's packages.
        (record,) = Path(venv).glob("lib/python*/site-packages/relay-*.dist-info/RECORD")
        files = {line.split(",")[0] for line in record.read_text().splitlines()}
        self.assertIn("twisted/plugins/relay_plugin.py", files)
        # Twisted finds the relay-tls endpoint parsers, server and client, in the wheel.
        found = await self.run_ok(
            os.path.join(venv, "bin", "python"), "-c",
            "from twisted.internet import interfaces as i; from twisted.plugin import getPlugins; "
            "kinds = i.IStreamServerEndpointStringParser, i.IStreamClientEndpointStringParserWithReactor; "
            "print(*[p.prefix for kind in kinds for p in getPlugins(kind) if 'relay' in p.prefix])",
        )
        self.assertEqual(found.split(), [b"relay-tls", b"relay-tls"])
        self.assertNotIn("twisted/plugins/__init__.py", files)
        self.assertNotIn("twisted/__init__.py", files)

    async def run_ok(self, executable: str, *args: str) -> bytes:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        out, err, code = await getProcessOutputAndValue(
            executable, args, env=env, path=tempfile.mkdtemp()
        )
        self.assertEqual(code, 0, (out + err).decode(errors="replace"))
        return out
