"""Stopping a real ``twistd --logfile ... relay`` under load never hangs.

The signal handler does no I/O (relay.server.signals); each run here logs
every frame (--debug) to a log file while a publisher floods a room, and is
sent SIGTERM (or SIGINT) in the middle of it.  Every run must end within the
shutdown grace, with SERVER_SHUTDOWN sent to the clients and the summary in
the log file.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from relay.server.factory import SHUTDOWN_GRACE_SECONDS
from relay.wire import ErrorCode, MessageType, loads
from tests.support import FrameClient
from tests.test_logs import _connect_when_listening
from tests.test_service import TWISTD, ProcessWatcher, source_env

RUNS = 12
# Seconds from the signal to the exit: the grace, plus the time a loaded
# machine takes to start the shutdown and end the process.
EXIT_LIMIT = SHUTDOWN_GRACE_SECONDS + 8
# A run that has not ended by then has hung: it is killed and the test fails.
HANG_LIMIT = 60


class SignalUnderLoadTests(unittest.TestCase):
    timeout = 600

    async def run_once(self, signum: int) -> float:
        """One server, flooded and logging every frame, stopped by ``signum``;
        returns the seconds it took to exit."""
        directory = tempfile.mkdtemp()
        log_path = os.path.join(directory, "relay.log")
        socket_path = os.path.join(directory, "relay.sock")
        watcher = ProcessWatcher()
        process = reactor.spawnProcess(
            watcher, TWISTD,
            [TWISTD, "-n", "--pidfile=", "--logfile", log_path, "relay", "--debug", "--port", f"unix:{socket_path}"],
            env=source_env(), path=directory,
        )
        try:
            subscriber = await _connect_when_listening(socket_path, watcher)
            publisher = await _connect_when_listening(socket_path, watcher)
            await subscriber.join("flood")
            await publisher.join("flood")
            flood = task.LoopingCall(self.publish, publisher)
            flood.start(0.002)
            try:
                await self.until(lambda: len(subscriber.frames) > 200)
                started = time.monotonic()
                os.kill(process.pid, signum)
                ended = await watcher.ended.addTimeout(HANG_LIMIT, reactor)
                elapsed = time.monotonic() - started
            finally:
                flood.stop()
        finally:
            if process.pid is not None:
                process.signalProcess("KILL")
                await watcher.ended
        self.assertEqual((ended.exitCode, ended.signal), (None, signum))
        for client in (subscriber, publisher):
            await client.closed
            last = client.frames[-1]
            self.assertEqual(
                (last.type, loads(last.payload)["code"]), (MessageType.ERROR, ErrorCode.SERVER_SHUTDOWN)
            )
        with open(log_path, encoding="utf-8", errors="replace") as log_file:
            logged = log_file.read()
        self.assertIn(f"Received {signal.Signals(signum).name}, shutting down.", logged)
        self.assertIn("Relay stopped after", logged)
        self.assertIn(" in type=MESSAGE", logged)  # it was logging every frame
        return elapsed

    @staticmethod
    def publish(publisher: FrameClient) -> None:
        if publisher.connected:
            for _ in range(20):
                publisher.send_json(MessageType.MESSAGE, {"room": "flood", "content": "x" * 200})

    @staticmethod
    async def until(condition: Any, limit: float = 60) -> None:
        deadline = time.monotonic() + limit
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("the traffic never got going")
            await task.deferLater(reactor, 0.01, lambda: None)

    async def test_sigterm_under_debug_logging_always_exits_within_the_grace(self) -> None:
        for _ in range(RUNS):
            elapsed = await self.run_once(signal.SIGTERM)
            self.assertLess(elapsed, EXIT_LIMIT)

    async def test_sigint_does_the_same(self) -> None:
        for _ in range(2):
            self.assertLess(await self.run_once(signal.SIGINT), EXIT_LIMIT)

    async def test_a_second_signal_during_the_drain_is_ignored(self) -> None:
        await defer.succeed(None)
        directory = tempfile.mkdtemp()
        socket_path = os.path.join(directory, "relay.sock")
        watcher = ProcessWatcher()
        process = reactor.spawnProcess(
            watcher, TWISTD, [TWISTD, "-n", "--pidfile=", "relay", "--port", f"unix:{socket_path}"],
            env=source_env(), path=directory,
        )
        self.addCleanup(lambda: (process.pid is not None and process.signalProcess("KILL")) or watcher.ended)
        client = await _connect_when_listening(socket_path, watcher)
        await client.join("r")
        client.transport.pauseProducing()  # keeps the drain going until the grace ends
        os.kill(process.pid, signal.SIGTERM)
        await watcher.wait_for(b"Received SIGTERM")
        os.kill(process.pid, signal.SIGTERM)
        ended = await watcher.ended.addTimeout(HANG_LIMIT, reactor)
        self.assertEqual(ended.signal, signal.SIGTERM)
        self.assertEqual(watcher.output.count(b"Received SIGTERM"), 1)
        self.assertNotIn(b"Traceback", watcher.output)
        self.assertIn(b"Relay stopped after", watcher.output)
        client.transport.resumeProducing()
        await client.closed


class FakeReactor:
    """Records what the handler asks of the reactor."""

    def __init__(self) -> None:
        self.from_thread: list[tuple[Any, tuple[Any, ...]]] = []
        self.stopped_by: list[int] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.from_thread.append((f, args))

    def sigTerm(self, number: int, frame: Any = None) -> None:
        self.stopped_by.append(number)

    sigInt = sigTerm


class StopSignalsTests(unittest.TestCase):
    """The handler only hands the signal to the reactor; it never logs."""

    def test_the_handler_defers_everything_to_the_reactor(self) -> None:
        from twisted.logger import globalLogPublisher

        from relay.server.signals import StopSignals

        events: list[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        fake = FakeReactor()
        signals = StopSignals(fake)
        signals._handle(signal.SIGTERM, None)
        signals._handle(signal.SIGINT, None)  # a second signal changes nothing
        self.assertEqual(events, [])
        self.assertEqual(fake.stopped_by, [])
        self.assertEqual(len(fake.from_thread), 1)
        callable_, args = fake.from_thread[0]
        callable_(*args)  # what the reactor runs between events
        self.assertEqual(fake.stopped_by, [signal.SIGTERM])

    def test_install_and_uninstall_restore_the_previous_handlers(self) -> None:
        from relay.server.signals import StopSignals

        before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        signals = StopSignals(FakeReactor())
        signals.install()
        try:
            self.assertEqual(signal.getsignal(signal.SIGTERM), signals._handle)
        finally:
            signals.uninstall()
        self.assertEqual((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)), before)
