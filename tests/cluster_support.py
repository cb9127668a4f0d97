"""Real parts for the cluster tests: a redis-server process on a free loopback
port, and Relay nodes (in-process services or ``twistd relay`` processes)
sharing it.

Without ``redis-server`` on the PATH the cluster tests are skipped, unless
``RELAY_REQUIRE_REDIS=1`` (set by CI), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import tempfile
from typing import Any, Callable

from twisted.internet import defer, endpoints, protocol, reactor, task, utils
from twisted.trial import unittest

from relay.server.tap import Options, makeService
from tests.support import FrameClient

REDIS_SERVER = shutil.which("redis-server")
# Bounded waits: generous, since other test suites share the machine.
WAIT_SECONDS = 15.0
POLL_SECONDS = 0.02


def require_redis(test: unittest.TestCase) -> None:
    """Skip ``test`` without redis-server, or fail if CI requires it."""
    if REDIS_SERVER is not None:
        return
    if os.environ.get("RELAY_REQUIRE_REDIS", "") not in ("", "0"):
        test.fail("redis-server is not installed, and RELAY_REQUIRE_REDIS is set")
    raise unittest.SkipTest("redis-server is not installed (apt-get install redis-server)")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_until(condition: Callable[[], Any], what: str, seconds: float = WAIT_SECONDS) -> None:
    """Poll ``condition`` on the reactor until it is true; fail after ``seconds``."""
    deadline = reactor.seconds() + seconds
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await task.deferLater(reactor, POLL_SECONDS, lambda: None)


class OutputWatcher(protocol.ProcessProtocol):
    """Collects a child's output; ``wait_for(marker)`` fires once it shows up."""

    def __init__(self) -> None:
        self.output = b""
        self._markers: list[tuple[bytes, int, defer.Deferred[None]]] = []
        self.ended: defer.Deferred[Any] = defer.Deferred()
        self.running = True

    def wait_for(self, marker: bytes, after: int = 0) -> defer.Deferred[None]:
        """Fires when ``marker`` appears in the output past offset ``after``."""
        waiter: defer.Deferred[None] = defer.Deferred()
        self._markers.append((marker, after, waiter))
        self._check()
        return waiter

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self._check()

    errReceived = outReceived

    def _check(self) -> None:
        for entry in list(self._markers):
            marker, after, waiter = entry
            if marker in self.output[after:]:
                self._markers.remove(entry)
                waiter.callback(None)

    def processEnded(self, reason: Any) -> None:
        self.running = False
        for _, _, waiter in self._markers:
            waiter.errback(AssertionError(self.output.decode(errors="replace")[-4000:]))
        self._markers = []
        self.ended.callback(reason.value)


def listening_ports(output: bytes) -> list[int]:
    """The ports a twistd relay process said it listens on, in order."""
    return [int(port) for port in re.findall(rb"Listening on IPv4Address\(type='TCP', host='[^']*', port=(\d+)\)", output)]


class PortTaken(Exception):
    """redis-server could not bind its port."""


class RedisServer:
    """A ``redis-server`` child process on 127.0.0.1, without persistence.

    ``extra`` are more command-line arguments (``--requirepass``, TLS...);
    ``{port}`` in them is its port.
    """

    def __init__(
        self,
        test: unittest.TestCase,
        *,
        unix_socket: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.test = test
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="relay-redis-")
        self.socket_path = os.path.join(self.directory, "redis.sock") if unix_socket else None
        self.extra = extra
        self.process: Any = None
        self.watcher: OutputWatcher | None = None
        self.started_once = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    async def start(self) -> RedisServer:
        """Start it; on a port another process took meanwhile, on a new one
        (first start only: a restart keeps its port)."""
        require_redis(self.test)
        for _ in range(3):
            try:
                await self._start()
                return self
            except PortTaken:
                if self.started_once:
                    raise
                self.port = free_port()
        raise AssertionError("no free port for redis-server")

    async def _start(self) -> None:
        args = [
            REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port),
            "--save", "", "--appendonly", "no", "--dir", self.directory,
        ]
        if self.socket_path:
            args += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        args += [arg.format(port=self.port) for arg in self.extra]
        self.watcher = OutputWatcher()
        self.process = reactor.spawnProcess(self.watcher, REDIS_SERVER, args, env=dict(os.environ))
        self.test.addCleanup(self.kill)
        ready = self.watcher.wait_for(b"Ready to accept connections")
        ready.addTimeout(WAIT_SECONDS, reactor)
        try:
            await ready
        except AssertionError:
            if b"Address already in use" in self.watcher.output:
                raise PortTaken() from None
            raise
        self.started_once = True

    async def command(self, *args: str) -> list[str]:
        """Run one command with redis-cli; its output lines."""
        cli = shutil.which("redis-cli") or "redis-cli"
        out = await utils.getProcessOutput(cli, ["-h", "127.0.0.1", "-p", str(self.port), *args], env=dict(os.environ))
        return [line for line in out.decode().splitlines() if line]

    def signal(self, name: str) -> None:
        """Send SIG``name`` (STOP, CONT, KILL...) to the server."""
        os.kill(self.pid, getattr(signal, f"SIG{name}"))

    async def kill(self) -> None:
        """SIGKILL it, if it runs, and wait for it to be gone."""
        watcher = self.watcher
        if watcher is not None and watcher.running:
            self.signal("CONT")
            self.signal("KILL")
            await watcher.ended


class ClusterNodes:
    """In-process Relay nodes (``makeService``) on loopback ports, one Redis."""

    def __init__(self, test: unittest.TestCase, redis_url: str, *options: str) -> None:
        self.test = test
        self.redis_url = redis_url
        self.options = options

    async def node(self, *options: str, wait: bool = True) -> Any:
        """A started node's service; with ``wait``, once its link is up."""
        parsed = Options()
        parsed.parseOptions(
            ["--port", "tcp:0:interface=127.0.0.1", "--redis", self.redis_url, *self.options, *options]
        )
        service = makeService(parsed, reactor=reactor)
        service.startService()
        self.test.addCleanup(lambda: service.running and service.stopService())
        if wait:
            await wait_until(lambda: service.factory.backplane.link_up, "the node's Redis link")
        return service


async def connect(test: unittest.TestCase, service: Any) -> FrameClient:
    """A FrameClient connected to a node's first listener, closed at cleanup."""
    port = service.listening_ports[0].getHost().port
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    client = await endpoints.connectProtocol(endpoint, FrameClient())

    def close() -> defer.Deferred[None]:
        if client.connected:
            client.transport.abortConnection()
        return client.closed

    test.addCleanup(close)
    return client

