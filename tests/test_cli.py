"""Tests for the terminal client: real ``relay-client`` processes against a
real server on loopback, driven through pipes as a script would, or through
a pseudo-terminal as a person would (Ctrl-C and Ctrl-D are the terminal's
own keys there)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile

import trustme
from twisted.internet import defer, endpoints, reactor, ssl
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest

import relay
from relay.client import Message
from relay.client.cli import clip, format_message, message_json, printable
from relay.server.factory import RelayFactory
from relay.wire import (
    ErrorCode,
    Flags,
    MessageType,
    encode_binary_message,
    encode_error,
)
from tests.support import IntegrationTestCase, wait_until

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(relay.__file__)))
STAMPED_LINE = r"^\[\d\d:\d\d:\d\d\] "
CTRL_C = b"\x03"
CTRL_D = b"\x04"
# Port 1 on loopback: nothing listens there, connections are refused.
NOWHERE = "tcp:host=127.0.0.1:port=1"
# What must never reach the terminal: crashes, and the library's own log lines.
NOISE = re.compile(r"Traceback|reentrant|#critical|\[relay\.client|\[twisted")


class ClientProcess(ProcessProtocol):
    """One ``relay-client`` process: feed it lines, wait for lines from it.

    On a pseudo-terminal both output streams arrive as ``out``, with the
    terminal's echo of what was typed.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self._partial = {"out": b"", "err": b""}
        self._waiters: list[tuple[str, re.Pattern[str], defer.Deferred[str]]] = []
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.running = True

    @property
    def out(self) -> str:
        return "\n".join(self.lines["out"])

    @property
    def err(self) -> str:
        return "\n".join(self.lines["err"])

    def outReceived(self, data: bytes) -> None:
        self._received("out", data)

    def errReceived(self, data: bytes) -> None:
        self._received("err", data)

    def _received(self, stream: str, data: bytes) -> None:
        *complete, self._partial[stream] = (self._partial[stream] + data).split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8").rstrip("\r")
            self.lines[stream].append(line)
            for waiter in list(self._waiters):
                wanted, pattern, found = waiter
                if wanted == stream and pattern.search(line):
                    self._waiters.remove(waiter)
                    found.callback(line)

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        for stream in ("out", "err"):  # a last line without its newline
            if self._partial[stream]:
                self._received(stream, b"\n")
        waiters, self._waiters = self._waiters, []
        for _, pattern, found in waiters:
            found.errback(AssertionError(
                f"{self.name} exited before printing /{pattern.pattern}/; output:\n"
                f"{self.out}\nstderr:\n{self.err}"
            ))
        self.ended.callback(reason.value.exitCode)

    def wait_for(self, pattern: str, stream: str = "out") -> defer.Deferred[str]:
        """Fires with the first line so far, or to come, that matches ``pattern``."""
        compiled = re.compile(pattern)
        for line in self.lines[stream]:
            if compiled.search(line):
                return defer.succeed(line)
        found: defer.Deferred[str] = defer.Deferred()
        if not self.running:
            found.errback(AssertionError(f"{self.name} has exited: {self.lines}"))
        else:
            self._waiters.append((stream, compiled, found))
        return found

    def type(self, line: str) -> None:
        self.transport.write(line.encode("utf-8") + b"\n")

    def press(self, key: bytes) -> None:
        self.transport.write(key)

    def assert_quiet(self, test: unittest.TestCase) -> None:
        """No traceback, no log line of the library or Twisted, anywhere."""
        for stream in ("out", "err"):
            noisy = [line for line in self.lines[stream] if NOISE.search(line)]
            test.assertEqual(noisy, [], f"{self.name} {stream}:\n{self.out}\n{self.err}")


def spawn(test: unittest.TestCase, *arguments: str, name: str = "client",
          terminal: bool = False, merged: bool = False) -> ClientProcess:
    """Start ``relay-client`` with ``arguments``, killed at cleanup if still running.

    ``merged`` sends its standard error into its standard output, as a CI log does.
    """
    process = ClientProcess(name)
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [PROJECT_ROOT, environment.get("PYTHONPATH")])
    )
    command = [sys.executable, "-m", "relay.client.cli", *arguments]
    if merged:
        command = ["/bin/sh", "-c", 'exec "$@" 2>&1', "sh", *command]
    reactor.spawnProcess(
        process, command[0], command, env=environment, path=PROJECT_ROOT, usePTY=terminal,
    )

    async def reap() -> None:
        if process.running:
            process.transport.signalProcess("KILL")
        await process.ended

    test.addCleanup(reap)
    return process


class CLITestCase(IntegrationTestCase):
    # Process start-up included; every wait is for an event, so this only
    # bounds a broken run.
    timeout = 60

    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port.getHost().port}"

    def run_script(self, *commands: str, options: tuple[str, ...] = ()) -> ClientProcess:
        """A client running ``commands`` with --exec."""
        arguments = [argument for command in commands for argument in ("--exec", command)]
        return spawn(self, self.endpoint(), *options, *arguments, name="script")

    async def user(self, name: str, *options: str, terminal: bool = False) -> ClientProcess:
        process = spawn(self, self.endpoint(), "--user", name, *options, name=name, terminal=terminal)
        await process.wait_for(rf"^\* connected to .* as {name}")
        return process


class ScriptExitStatusTests(CLITestCase):
    """What a script or CI job sees: the exit status and standard error."""

    async def test_every_request_answered_exits_0_with_the_sends_acknowledged(self) -> None:
        script = self.run_script("join lobby", "send hi", "send #lobby again", "leave lobby",
                                 options=("--user", "ci"))
        self.assertEqual(await script.ended, 0)
        self.assertRegex(script.out, r"\* joined lobby \(1 member\)")
        self.assertRegex(script.out, r"(?m)^✓ lobby #1$")
        self.assertRegex(script.out, r"(?m)^✓ lobby #2$")
        self.assertRegex(script.out, r"\* left lobby")
        self.assertEqual(script.err, "")

    async def test_readme_pipe_example_exits_0_once_the_server_has_answered(self) -> None:
        # The whole script and its end arrive before the client has even connected.
        script = spawn(self, self.endpoint(), "--user", "ci", name="pipe")
        script.type("join lobby")
        script.type("send deploy done")
        script.transport.closeStdin()
        self.assertEqual(await script.ended, 0)
        self.assertRegex(script.out, r"(?m)^✓ lobby #1$")

    async def test_refused_request_exits_1_with_the_error_on_stderr(self) -> None:
        script = self.run_script("join lobby", "send #nowhere lost", "send still here")
        self.assertEqual(await script.ended, 1)
        self.assertIn("relay-client: NOT_IN_ROOM: not a member of room 'nowhere'", script.lines["err"])
        # The commands after the refusal still ran.
        self.assertRegex(script.out, r"(?m)^✓ lobby #1$")
        script.assert_quiet(self)

    async def test_errors_keep_their_place_among_the_other_lines_of_a_log(self) -> None:
        script = spawn(self, self.endpoint(), "-c", "join lobby", "-c", "send #kitchen hi",
                       "-c", "send hi", merged=True)
        self.assertEqual(await script.ended, 1)
        self.assertEqual(script.lines["out"][-3:], [
            "* joined lobby (1 member)",
            "relay-client: NOT_IN_ROOM: not a member of room 'kitchen'",
            "✓ lobby #1",
        ])

    async def test_invalid_room_exits_1(self) -> None:
        script = self.run_script("join " + "x" * 65)
        self.assertEqual(await script.ended, 1)
        self.assertRegex(script.err, r"^relay-client: INVALID_ROOM: ")

    async def test_unknown_command_exits_2(self) -> None:
        script = spawn(self, self.endpoint(), name="typo")
        script.type("jion lobby")
        script.transport.closeStdin()
        self.assertEqual(await script.ended, 2)
        self.assertIn("relay-client: unknown command 'jion'; type 'help' for the list",
                      script.lines["err"])

    async def test_send_before_join_is_a_usage_error(self) -> None:
        script = self.run_script("send hello?")
        self.assertEqual(await script.ended, 2)
        self.assertRegex(script.err, r"relay-client: usage: send <text>")

    async def test_bad_option_exits_2(self) -> None:
        script = spawn(self, self.endpoint(), "--wait-for", "many")
        self.assertEqual(await script.ended, 2)
        self.assertIn("--wait-for", script.err)

    async def test_unusable_endpoint_is_a_usage_error(self) -> None:
        script = spawn(self, "carrier-pigeon:coop=1", name="confused")
        self.assertEqual(await script.ended, 2)
        self.assertIn("cannot use 'carrier-pigeon:coop=1'", script.err)
        script.assert_quiet(self)

    async def test_empty_script_proves_the_server_answers(self) -> None:
        script = spawn(self, self.endpoint(), name="probe")
        script.transport.closeStdin()
        self.assertEqual(await script.ended, 0)
        self.assertEqual(self.factory.stats.connections_total, 1)

    async def test_lost_server_mid_script_exits_3_after_the_connect_timeout(self) -> None:
        script = self.run_script("join lobby", options=("--wait-for", "1", "--connect-timeout", "1"))
        await script.wait_for(r"^\* joined lobby")
        await self.stop_server()
        self.assertEqual(await script.ended, 3)
        self.assertRegex(script.out, r"(?m)^\* disconnected: SERVER_SHUTDOWN: ")
        self.assertRegex(script.err, r"relay-client: cannot reach tcp:.* within 1 s: ")
        script.assert_quiet(self)


class UnreachableServerTests(unittest.TestCase):
    timeout = 60

    async def test_readme_example_without_a_server_exits_3(self) -> None:
        script = spawn(self, NOWHERE, "--user", "ci", "--connect-timeout", "1")
        script.type("join lobby")
        script.type("send deploy done")
        script.transport.closeStdin()
        self.assertEqual(await script.ended, 3)
        self.assertRegex(script.err, r"^relay-client: cannot reach tcp:host=127.0.0.1:port=1 "
                                     r"within 1 s: .*refused")
        script.assert_quiet(self)

    async def test_interrupted_script_with_requests_unanswered_exits_130(self) -> None:
        script = spawn(self, NOWHERE, "--connect-timeout", "0", "--exec", "join lobby")
        await script.wait_for(r"^\* reconnecting in ")
        script.transport.signalProcess("INT")
        self.assertEqual(await script.ended, 130)
        self.assertIn("relay-client: interrupted with 1 request unanswered", script.lines["err"])
        script.assert_quiet(self)

    async def test_quit_at_a_terminal_before_connecting_leaves_at_once(self) -> None:
        lonely = spawn(self, NOWHERE, "--connect-timeout", "0", terminal=True)
        await lonely.wait_for(r"^\* reconnecting in .*refused")
        lonely.type("quit")
        self.assertEqual(await lonely.ended, 0)
        lonely.assert_quiet(self)


class WaitForTests(CLITestCase):
    async def test_wait_for_prints_json_lines_and_exits_0(self) -> None:
        watcher = self.run_script("join lobby", options=("--wait-for", "2", "--json", "--timeout", "30"))
        # With --json, standard output carries the messages only.
        await watcher.wait_for(r"^\* joined lobby", stream="err")
        publisher = await self.connect()
        await publisher.hello(userId="deployer")
        await publisher.join("lobby")
        publisher.send_json(MessageType.MESSAGE, {"room": "lobby", "content": {"status": "done", "n": 1}})
        publisher.send_frame(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("lobby", b"\x00\xff"))
        publisher.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "a third, not waited for"})
        self.assertEqual(await watcher.ended, 0)
        first, second = (json.loads(line) for line in watcher.lines["out"])
        self.assertEqual(
            {key: first[key] for key in ("room", "from", "content", "seq")},
            {"room": "lobby", "from": "deployer", "content": {"status": "done", "n": 1}, "seq": 1},
        )
        self.assertIsInstance(first["timestamp"], int)
        self.assertEqual(second, {"room": "lobby", "from": "deployer", "binary": True, "data": "AP8="})

    async def test_timeout_before_the_messages_arrive_exits_4(self) -> None:
        watcher = self.run_script("join lobby", options=("--wait-for", "1", "--timeout", "1"))
        self.assertEqual(await watcher.ended, 4)
        self.assertIn("relay-client: timed out after 1 s: 0 of 1 messages received",
                      watcher.lines["err"])


class RefusingServer(Protocol):
    """Answers the first frame with a fatal error, as an auth server would."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.attempts += 1
        self.transport.write(encode_error(self.factory.code, "go away"))
        self.transport.loseConnection()


class PermanentFailureTests(unittest.TestCase):
    """Failures that reconnecting cannot fix end the run at once."""

    timeout = 60

    def setUp(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        self.ca = trustme.CA()
        self.ca_file = os.path.join(directory, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)

    async def refusing_server(self, code: ErrorCode) -> tuple[str, Factory]:
        factory = Factory.forProtocol(RefusingServer)
        factory.attempts = 0
        factory.code = code
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return f"tcp:host=127.0.0.1:port={port.getHost().port}", factory

    async def tls_server(self) -> tuple[str, RelayFactory]:
        pem = self.ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.bytes()
        factory = RelayFactory(reactor=reactor)
        port = await endpoints.SSL4ServerEndpoint(
            reactor, 0, ssl.PrivateCertificate.loadPEM(pem).options(), interface="127.0.0.1"
        ).listen(factory)
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.wait_closed)
        return f"tls:host=127.0.0.1:port={port.getHost().port}", factory

    async def test_unauthorized_exits_1_after_one_attempt(self) -> None:
        description, server = await self.refusing_server(ErrorCode.UNAUTHORIZED)
        script = spawn(self, description, "--token", "wrong", "--exec", "join lobby")
        self.assertEqual(await script.ended, 1)
        self.assertIn("relay-client: cannot continue: UNAUTHORIZED: go away", script.lines["err"])
        self.assertEqual(server.attempts, 1)

    async def test_invalid_frame_is_not_retried(self) -> None:
        description, server = await self.refusing_server(ErrorCode.INVALID_FRAME)
        script = spawn(self, description, "--exec", "heartbeat")
        self.assertEqual(await script.ended, 1)
        self.assertIn("relay-client: cannot continue: INVALID_FRAME: go away", script.lines["err"])
        self.assertEqual(server.attempts, 1)

    async def test_untrusted_certificate_exits_3_in_a_script(self) -> None:
        description, server = await self.tls_server()
        script = spawn(self, description, "--exec", "join lobby")
        self.assertEqual(await script.ended, 3)
        self.assertRegex(script.err, r"^relay-client: cannot continue: TLS: certificate verify failed "
                                     r"\(--ca-file trusts a private certificate authority\)$")
        self.assertEqual(server.stats.connections_total, 1)
        script.assert_quiet(self)

    async def test_untrusted_certificate_stops_an_interactive_session(self) -> None:
        description, server = await self.tls_server()
        session = spawn(self, description, "--user", "alice", terminal=True)
        self.assertEqual(await session.ended, 3)
        self.assertRegex(session.out, r"(?m)^! cannot continue: TLS: certificate verify failed")
        self.assertNotRegex(session.out, r"reconnecting")
        self.assertEqual(server.stats.connections_total, 1)
        session.assert_quiet(self)

    async def test_trusted_certificate_connects(self) -> None:
        description, _ = await self.tls_server()
        script = spawn(self, description, "--ca-file", self.ca_file, "--exec", "join secure")
        self.assertEqual(await script.ended, 0)
        self.assertRegex(script.out, r"\* joined secure \(1 member\)")


class TerminalTests(CLITestCase):
    """A person at a terminal: one pane, Ctrl-C and Ctrl-D."""

    async def test_ctrl_c_after_join_leaves_cleanly(self) -> None:
        erin = await self.user("erin", terminal=True)
        erin.type("join lobby")
        await erin.wait_for(r"^\* joined lobby")
        erin.press(CTRL_C)
        self.assertEqual(await erin.ended, 0)
        erin.assert_quiet(self)
        await self.factory.wait_closed()
        self.assertEqual(len(self.factory.registry), 0)

    async def test_ctrl_c_after_send_leaves_cleanly(self) -> None:
        erin = await self.user("erin", terminal=True)
        erin.type("join lobby")
        erin.type("send hello")
        await erin.wait_for(r"^✓ lobby #1$")
        erin.press(CTRL_C)
        self.assertEqual(await erin.ended, 0)
        erin.assert_quiet(self)

    async def test_ctrl_c_while_reconnecting_leaves_cleanly(self) -> None:
        erin = await self.user("erin", terminal=True)
        erin.type("join lobby")
        await erin.wait_for(r"^\* joined lobby")
        await self.stop_server()
        await erin.wait_for(r"^\* reconnecting in \d+\.\d s \(attempt 1\)")
        erin.type("send waiting for a connection")
        erin.press(CTRL_C)
        self.assertEqual(await erin.ended, 0)
        erin.assert_quiet(self)

    async def test_ctrl_d_waits_for_the_answers_in_flight(self) -> None:
        erin = await self.user("erin", terminal=True)
        erin.type("join lobby")
        erin.type("send last words")
        erin.press(CTRL_D)
        self.assertEqual(await erin.ended, 0)
        self.assertRegex(erin.out, r"(?m)^✓ lobby #1$")
        erin.assert_quiet(self)

    async def test_mistakes_are_shown_in_the_pane_and_do_not_end_the_session(self) -> None:
        carol = await self.user("carol", terminal=True)
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
        carol.type("join " + "x" * 65)
        await carol.wait_for(r"^! INVALID_ROOM: ")
        carol.type("rooms")
        await carol.wait_for(r"^\* you are in no rooms$")
        carol.type("heartbeat")
        await carol.wait_for(r"^\* heartbeat round trip \d+\.\d\d ms$")
        carol.type("exit")
        self.assertEqual(await carol.ended, 0)
        carol.assert_quiet(self)

    async def test_server_restart_is_announced_once_and_rooms_rejoined(self) -> None:
        frank = await self.user("frank", terminal=True)
        frank.type("join lobby")
        await frank.wait_for(r"^\* joined lobby")
        await self.stop_server()
        await frank.wait_for(r"^\* disconnected: SERVER_SHUTDOWN: the server is shutting down$")
        await frank.wait_for(r"^\* reconnecting in \d+\.\d s \(attempt 1\)")
        factory = await self.start_server_again()
        await frank.wait_for(r"^\* connected to .* as frank; in lobby$")
        self.assertEqual(len(factory.registry.get("lobby")), 1)
        frank.type("quit")
        self.assertEqual(await frank.ended, 0)
        # The library's own account of the shutdown stays out of the pane.
        frank.assert_quiet(self)
        self.assertEqual(len([line for line in frank.lines["out"] if "SERVER_SHUTDOWN" in line]), 1)

    async def test_verbose_shows_the_library_log_on_stderr(self) -> None:
        frank = await self.user("frank", "--verbose")
        await self.stop_server()
        await frank.wait_for(r"Relay server closed the connection: SERVER_SHUTDOWN", stream="err")
        await frank.wait_for(r"^\* disconnected: SERVER_SHUTDOWN")
        self.assertNotRegex(frank.out, r"\[relay\.client")


class ChatTests(CLITestCase):
    async def test_two_clients_chat_in_a_room(self) -> None:
        alice = await self.user("alice", terminal=True)
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
        bob.transport.closeStdin()
        self.assertEqual(await bob.ended, 0)
        self.assertFalse(re.search(STAMPED_LINE + r"\[lobby\] alice:", alice.out, re.M),
                         "no echo without --echo")
        alice.assert_quiet(self)
        bob.assert_quiet(self)

    async def test_echo_option_shows_own_messages(self) -> None:
        dave = await self.user("dave", "--echo")
        dave.type("join lobby")
        dave.type("send talking to myself")
        await dave.wait_for(STAMPED_LINE + r"\[lobby\] dave: talking to myself$")
        dave.type("quit")
        self.assertEqual(await dave.ended, 0)


class PresenceAndDirectTests(CLITestCase):
    """Joins and leaves, who, and direct messages, between real clients."""

    async def test_joins_and_leaves_are_shown(self) -> None:
        alice = await self.user("alice", terminal=True)
        alice.type("join lobby")
        await alice.wait_for(r"^\* joined lobby \(1 member\)$")

        async def shown(line: str, times: int) -> None:
            await wait_until(lambda: alice.lines["out"].count(line) == times, f"{line!r} {times} times")

        carol = await self.user("carol")
        carol.type("join lobby")
        await shown("* carol joined lobby", 1)
        carol.type("leave lobby")
        await shown("* carol left lobby", 1)
        carol.type("join lobby")
        await shown("* carol joined lobby", 2)
        carol.transport.signalProcess("KILL")  # a dropped client is a leave too
        await shown("* carol left lobby", 2)
        alice.type("quit")
        self.assertEqual(await alice.ended, 0)
        alice.assert_quiet(self)

    async def test_who_lists_the_members_of_a_room(self) -> None:
        bob = await self.user("bob")
        bob.type("join lobby")
        await bob.wait_for(r"^\* joined lobby")
        script = self.run_script("join lobby", "who", "who lobby")
        self.assertEqual(await script.ended, 0)
        listed = re.findall(r"^\* lobby: (.*) - 2 users$", script.out, re.M)
        self.assertEqual(len(listed), 2, script.out)
        names = listed[0].split(", ")
        self.assertEqual(names[1], "bob")
        self.assertTrue(names[0].startswith("anon-"), names)  # the script's own anonymous id

    async def test_who_of_a_room_not_joined_exits_1(self) -> None:
        script = self.run_script("who nowhere")
        self.assertEqual(await script.ended, 1)
        self.assertIn("NOT_IN_ROOM", script.err)

    async def test_msg_sends_a_direct_message_shown_distinctly(self) -> None:
        dave = await self.user("dave", terminal=True)
        erin = await self.user("erin")
        erin.type("msg dave just between us")
        await erin.wait_for(r"^✓ @dave$")
        await dave.wait_for(STAMPED_LINE + r"\(direct\) erin: just between us$")
        dave.type("quit")
        self.assertEqual(await dave.ended, 0)
        dave.assert_quiet(self)

    async def test_msg_to_a_user_offline_exits_1_with_user_offline(self) -> None:
        script = self.run_script("msg nobody hello?")
        self.assertEqual(await script.ended, 1)
        self.assertIn("USER_OFFLINE", script.err)

    async def test_wait_for_counts_direct_messages_as_json_lines(self) -> None:
        waiting = spawn(self, self.endpoint(), "--user", "frank", "--json", "--wait-for", "1", name="frank")
        await waiting.wait_for(r"^\* connected", stream="err")
        sender = self.run_script("msg frank {}")
        self.assertEqual(await sender.ended, 0)
        self.assertEqual(await waiting.ended, 0)
        record = json.loads(waiting.lines["out"][-1])
        self.assertEqual((record["direct"], record["to"], record["from"], record["content"]),
                         (True, "frank", record["from"], "{}"))


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

    def test_json_lines_escape_terminal_controls_and_stay_json(self) -> None:
        message = Message(room="r", sender="s\x9b", content="\x1b[2J\x7f", timestamp=5, seq=2)
        line = message_json(message)
        self.assertNotRegex(line, "[\x00-\x1f\x7f-\x9f]")
        self.assertEqual(json.loads(line), {"room": "r", "from": "s\x9b", "content": "\x1b[2J\x7f",
                                            "timestamp": 5, "seq": 2})

    def test_long_server_text_is_clipped_to_one_line(self) -> None:
        self.assertEqual(len(clip("x" * 10_000)), 300)
        self.assertEqual(clip("short"), "short")
