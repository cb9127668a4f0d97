"""Tests for the terminal client: real ``relay-client`` processes, driven
through their standard input as a user (or a script) would, against a real
server on loopback."""

from __future__ import annotations

import os
import re
import sys
from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

import relay
from relay.client.cli import format_message, printable
from relay.client import Message
from relay.server.factory import RelayFactory
from tests.support import IntegrationTestCase

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(relay.__file__)))
STAMPED_LINE = r"^\[\d\d:\d\d:\d\d\] "


class ClientProcess(ProcessProtocol):
    """One ``relay-client`` process: feed it lines, wait for lines from it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.stderr = b""
        self._partial = b""
        self._waiters: list[tuple[re.Pattern[str], defer.Deferred[str]]] = []
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.running = True

    def outReceived(self, data: bytes) -> None:
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8")
            self.lines.append(line)
            for waiter in list(self._waiters):
                pattern, found = waiter
                if pattern.search(line):
                    self._waiters.remove(waiter)
                    found.callback(line)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        waiters, self._waiters = self._waiters, []
        for pattern, found in waiters:
            found.errback(AssertionError(
                f"{self.name} exited before printing /{pattern.pattern}/; output:\n"
                + "\n".join(self.lines) + "\nstderr:\n" + self.stderr.decode(errors="replace")
            ))
        self.ended.callback(reason.value.exitCode)

    def wait_for(self, pattern: str) -> defer.Deferred[str]:
        """Fires with the first line so far, or to come, that matches ``pattern``."""
        compiled = re.compile(pattern)
        for line in self.lines:
            if compiled.search(line):
                return defer.succeed(line)
        found: defer.Deferred[str] = defer.Deferred()
        if not self.running:
            found.errback(AssertionError(f"{self.name} has exited: {self.lines}"))
        else:
            self._waiters.append((compiled, found))
        return found

    def type(self, line: str) -> None:
        self.transport.write(line.encode("utf-8") + b"\n")


class TerminalClientTests(IntegrationTestCase):
    # Process start-up included; every wait is for an event, so this only
    # bounds a broken run.
    timeout = 60

    def spawn(self, *arguments: str, name: str = "client") -> ClientProcess:
        process = ClientProcess(name)
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [PROJECT_ROOT, environment.get("PYTHONPATH")])
        )
        reactor.spawnProcess(
            process, sys.executable, [sys.executable, "-m", "relay.client.cli", *arguments],
            env=environment, path=PROJECT_ROOT,
        )
        self.addCleanup(self._reap, process)
        return process

    async def _reap(self, process: ClientProcess) -> None:
        if process.running:
            process.transport.signalProcess("KILL")
        await process.ended

    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port.getHost().port}"

    async def user(self, name: str, *options: str) -> ClientProcess:
        process = self.spawn(self.endpoint(), "--user", name, *options, name=name)
        await process.wait_for(rf"^\* connected to .* as {name}$")
        return process

    async def test_two_clients_chat_in_a_room(self) -> None:
        alice = await self.user("alice")
        bob = await self.user("bob")
        alice.type("join lobby")
        await alice.wait_for(r"^\* joined lobby \(1 member\)$")
        bob.type("join lobby")
        await bob.wait_for(r"^\* joined lobby \(2 members\)$")
        alice.type("send hello bob")
        await bob.wait_for(STAMPED_LINE + r"\[lobby\] alice: hello bob$")
        bob.type("send hi alice, nice to see you")
        await alice.wait_for(STAMPED_LINE + r"\[lobby\] bob: hi alice, nice to see you$")
        alice.type("quit")
        self.assertEqual(await alice.ended, 0)
        bob.transport.closeStdin()  # Ctrl-D
        self.assertEqual(await bob.ended, 0)
        self.assertFalse(any(re.search(STAMPED_LINE, line) for line in alice.lines
                             if "alice:" in line), "no echo without --echo")
        self.assertNotIn(b"Traceback", alice.stderr + bob.stderr)

    async def test_bad_commands_get_help_not_tracebacks(self) -> None:
        carol = await self.user("carol")
        carol.type("frobnicate now")
        await carol.wait_for(r"^\? unknown command 'frobnicate'; type 'help' for the list$")
        carol.type("join")
        await carol.wait_for(r"^\? usage: join <room>$")
        carol.type("send nobody hears this")
        await carol.wait_for(r"^\? usage: send <text>")
        carol.type("help")
        await carol.wait_for(r"^  heartbeat ")
        carol.type("send #nowhere hello?")
        await carol.wait_for(r"^! NOT_IN_ROOM: not a member of room 'nowhere'$")
        carol.type("join \t")
        carol.type("join " + "x" * 65)
        await carol.wait_for(r"^! INVALID_ROOM: ")
        carol.type("rooms")
        await carol.wait_for(r"^\* you are in no rooms$")
        carol.type("heartbeat")
        await carol.wait_for(r"^\* heartbeat round trip \d+\.\d\d ms$")
        carol.type("exit")
        self.assertEqual(await carol.ended, 0)
        self.assertNotIn(b"Traceback", carol.stderr)

    async def test_piped_script_gets_every_reply_before_exiting(self) -> None:
        # The whole script and its end arrive before the client has even connected.
        script = self.spawn(self.endpoint(), "--user", "script", "--echo", name="script")
        for line in ("join lobby", "join side", "send hello", "send #lobby first", "rooms",
                     "send #nowhere lost", "leave side"):
            script.type(line)
        script.transport.closeStdin()
        self.assertEqual(await script.ended, 0)
        output = "\n".join(script.lines)
        for expected in (r"\* joined lobby", r"\* joined side", r"\[side\] script: hello",
                         r"\[lobby\] script: first", r"! NOT_IN_ROOM: .*'nowhere'", r"\* left side"):
            self.assertRegex(output, expected)

    async def test_echo_option_shows_own_messages(self) -> None:
        dave = await self.user("dave", "--echo")
        dave.type("join lobby")
        dave.type("send talking to myself")
        await dave.wait_for(STAMPED_LINE + r"\[lobby\] dave: talking to myself$")
        dave.type("quit")
        self.assertEqual(await dave.ended, 0)

    async def test_ctrl_c_exits_cleanly(self) -> None:
        erin = await self.user("erin")
        erin.transport.signalProcess("INT")
        self.assertEqual(await erin.ended, 0)
        self.assertNotIn(b"Traceback", erin.stderr)

    async def test_server_restart_is_announced_and_rooms_rejoined(self) -> None:
        port_number = self.port.getHost().port
        frank = await self.user("frank")
        frank.type("join lobby")
        await frank.wait_for(r"^\* joined lobby")
        await self.port.stopListening()
        await self.factory.shutdown()
        await frank.wait_for(r"^\* disconnected: SERVER_SHUTDOWN: ")
        await frank.wait_for(r"^\* reconnecting in \d+\.\d s \(attempt 1\)")
        factory = RelayFactory(reactor=reactor)
        port = await endpoints.TCP4ServerEndpoint(
            reactor, port_number, interface="127.0.0.1"
        ).listen(factory)
        self.addCleanup(factory.wait_closed)
        self.addCleanup(port.stopListening)
        await frank.wait_for(r"^\* connected to .* as frank; in lobby$")
        self.assertEqual(len(factory.registry.get("lobby")), 1)
        frank.type("quit")
        self.assertEqual(await frank.ended, 0)


class UnreachableServerTests(unittest.TestCase):
    timeout = 60

    async def test_quit_while_unable_to_connect_exits_at_once(self) -> None:
        process = ClientProcess("lonely")
        environment = dict(os.environ, PYTHONPATH=PROJECT_ROOT)
        # Port 1 on loopback: nothing listens there.
        reactor.spawnProcess(
            process, sys.executable,
            [sys.executable, "-m", "relay.client.cli", "tcp:host=127.0.0.1:port=1"],
            env=environment, path=PROJECT_ROOT,
        )
        await process.wait_for(r"^\* reconnecting in .*(refused|Connection)")
        process.type("quit")
        self.assertEqual(await process.ended, 0)


    async def test_unusable_endpoint_is_a_usage_error(self) -> None:
        process = ClientProcess("confused")
        reactor.spawnProcess(
            process, sys.executable, [sys.executable, "-m", "relay.client.cli", "carrier-pigeon:coop=1"],
            env=dict(os.environ, PYTHONPATH=PROJECT_ROOT), path=PROJECT_ROOT,
        )
        self.assertEqual(await process.ended, 2)
        self.assertIn(b"cannot use 'carrier-pigeon:coop=1'", process.stderr)
        self.assertNotIn(b"Traceback", process.stderr)


class FormattingTests(unittest.TestCase):
    def test_message_line_has_time_room_sender_and_text(self) -> None:
        line = format_message(Message(room="lobby", sender="bob", content="hi", timestamp=0))
        self.assertRegex(line, STAMPED_LINE + r"\[lobby\] bob: hi$")

    def test_json_content_is_shown_as_json(self) -> None:
        line = format_message(Message(room="r", sender="s", content={"a": [1, None]}, timestamp=0))
        self.assertTrue(line.endswith('s: {"a":[1,null]}'))

    def test_binary_content_is_summarised(self) -> None:
        line = format_message(Message(room="r", sender="s", data=b"\x00" * 3, binary=True))
        self.assertTrue(line.endswith("s: <3 bytes of binary data>"))

    def test_control_characters_cannot_reach_the_terminal(self) -> None:
        self.assertEqual(printable("a\x1b[2Jb\n"), "a\\x1b[2Jb\\x0a")
