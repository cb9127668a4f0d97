"""Limits of a real ``twistd relay`` process: connection storms, file limits, memory.

Each test runs the server as users do, in a child process, and drives it
over loopback sockets.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet import endpoints, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from relay.server.limits import FILE_HEADROOM
from relay.wire import MessageType, encode, encode_json
from tests.support import FrameClient, wait_until
from tests.test_service import REPO, TWISTD, ProcessWatcher, source_env


def network_namespaces_work() -> bool:
    """Whether this machine lets us run a probe in a network namespace of its own."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    try:
        done = subprocess.run(
            ["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class ConnectionStormTests(unittest.TestCase):
    """2,000 clients reconnecting at once, as after a restart."""

    async def storm(self, *port_options: str) -> dict[str, Any]:
        probe = [sys.executable, "-m", "tests.storm_probe", "--count", "2000", *port_options]
        isolated = network_namespaces_work()
        if isolated:
            # Alone in its namespace, the kernel's overflow counters are the server's.
            command, args = "/usr/bin/unshare", ["-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *probe]
        else:
            command, args = probe[0], probe[1:]
        out, err, code = await getProcessOutputAndValue(command, args, env=source_env(), path=str(REPO))
        self.assertEqual(code, 0, err.decode(errors="replace")[-2000:])
        result = json.loads(out.decode().strip().splitlines()[-1])
        result["isolated"] = isolated
        return result

    async def test_two_thousand_connects_at_once_never_stall(self) -> None:
        result = await self.storm()
        self.assertEqual(result["connects"], 2000)
        self.assertGreaterEqual(result["backlog"], 1024)
        self.assertLess(result["max_ms"], 200, result)
        if result["isolated"]:
            self.assertEqual(result["listen_overflows"], 0, result)


class TwistdTestCase(unittest.TestCase):
    def twistd(self, *argv: str, open_files: int | None = None) -> ProcessWatcher:
        """``twistd relay`` in a child process, optionally under a lower file limit."""
        collector = ProcessWatcher()
        command = [TWISTD, "-n", "--pidfile=", "relay", *argv]
        if open_files is not None:
            limit = (
                "import os, resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({open_files}, {open_files})); "
                "os.execv(sys.argv[1], sys.argv[1:])"
            )
            command = [sys.executable, "-c", limit, *command]
        process = reactor.spawnProcess(collector, command[0], command, env=source_env(), path=tempfile.mkdtemp())

        def kill_if_running() -> Any:
            if process.pid is not None:
                process.signalProcess("KILL")
            return collector.ended

        self.addCleanup(kill_if_running)
        self.process = process
        return collector

    async def listening_port(self, server: ProcessWatcher) -> int:
        await server.wait_for(b"Listening on")
        return int(re.search(rb"Listening on .*?port=(\d+)", server.output).group(1))

    async def connect(self, port: int) -> FrameClient:
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client = await endpoints.connectProtocol(endpoint, FrameClient())
        self.addCleanup(lambda: client.connected and client.transport.abortConnection())
        return client


class FileLimitTests(TwistdTestCase):
    async def test_past_the_file_limit_clients_are_refused_not_reset(self) -> None:
        server = self.twistd("--port", "tcp:0:interface=127.0.0.1", open_files=300)
        port = await self.listening_port(server)
        await server.wait_for(b"max connections")
        expected = 300 - FILE_HEADROOM
        self.assertIn(f"Open file limit 300; max connections {expected}".encode(), server.output)
        # 50 past the limit: within the descriptors held in reserve, so every
        # one must be refused with an ERROR (past the reserve, the kernel
        # queue holds connections the process has no descriptor for).
        total = expected + 50
        clients = [await self.connect(port) for _ in range(total)]
        # The refused are told at once; write nothing to them first: a write
        # racing the server's close can end in a reset that hides the ERROR.
        await wait_until(lambda: sum(1 for c in clients if c.frames) >= total - expected, "the refusals arrived", 60)
        refused = [client for client in clients if client.frames]
        accepted = [client for client in clients if not client.frames]
        self.assertEqual((len(accepted), len(refused)), (expected, total - expected))
        for client in refused:
            self.assertIn(b"TOO_MANY_CONNECTIONS", client.frames[0].payload)
            await client.closed
        for client in accepted:
            client.send(encode(MessageType.HEARTBEAT))
            self.assertEqual((await client.next_frame()).type, MessageType.HEARTBEAT)


class WorstCaseMemoryTests(TwistdTestCase):
    """The server driven toward its documented worst case stays within it."""

    MAX_FRAME = 64 * 1024
    MAX_PENDING = 256 * 1024
    READ_SIZE = 16 * 1024
    CONNECTIONS = 150
    # docs/security.md: what one connection may hold at worst, its fixed
    # objects included.
    PER_CONNECTION = READ_SIZE + MAX_FRAME + MAX_PENDING + MAX_FRAME + 512 + 16 * 1024

    async def test_rss_stays_within_the_documented_bound(self) -> None:
        server = self.twistd(
            "--port", "tcp:0:interface=127.0.0.1",
            "--max-connections", str(self.CONNECTIONS),
            "--max-frame-size", str(self.MAX_FRAME),
            "--max-pending", str(self.MAX_PENDING),
            "--read-size", str(self.READ_SIZE),
            "--max-pending-total", "1GiB",
        )
        port = await self.listening_port(server)
        pid = self.process.pid
        baseline = rss_kib(pid)
        holders = []
        # A third hold a partial frame of the largest size.
        for _ in range(self.CONNECTIONS // 3):
            client = await self.connect(port)
            client.send(b"\x00\x01\x00\x00\x01\x04\x01" + b"[" * (self.MAX_FRAME - 8))
            holders.append(client)
        # The rest are pairs: a publisher and a member that never reads.
        pairs = []
        for number in range(self.CONNECTIONS // 3):
            publisher, reader = await self.connect(port), await self.connect(port)
            await publisher.join(f"room-{number}")
            await reader.join(f"room-{number}")
            reader.transport.pauseProducing()
            pairs.append((publisher, reader))
        content = "x" * (self.MAX_FRAME - 200)
        messages = [
            encode_json(MessageType.MESSAGE, {"room": f"room-{number}", "content": content})
            for number in range(len(pairs))
        ]
        # Enough to fill the kernel's buffers on both sides, then max-pending.
        for _ in range(24):
            for number, (publisher, _) in enumerate(pairs):
                if publisher.connected:
                    publisher.send(messages[number])
            await task.deferLater(reactor, 0.05, lambda: None)
        await task.deferLater(reactor, 0.5, lambda: None)
        self.assertTrue(all(publisher.connected for publisher, _ in pairs))
        peak = rss_kib(pid, "VmHWM")
        bound = self.CONNECTIONS * self.PER_CONNECTION // 1024
        growth = peak - baseline
        self.assertLess(growth, bound, f"RSS grew {growth} KiB; the documented bound is {bound} KiB")
        # The bound is not vacuous: the server did hold a good part of it.
        self.assertGreater(growth, bound // 10, f"RSS grew only {growth} KiB of {bound} KiB")

