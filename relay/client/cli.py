"""relay-client: a terminal client for Relay, and a tool scripts can trust.

Commands come one a line from standard input (typed at a terminal or piped
from a script) or from ``--exec`` options.  Whatever the source, the client
waits for the answer to every request before it exits, and its exit status
says how the run went (see ``EXIT_STATUS``).

At a terminal, everything is shown in one pane on standard output: news
lines (``*``), problems (``!`` from the server, ``?`` with what was typed)
and messages.  In a script, problems go to standard error as
``relay-client: ...`` lines.  The library's own log events are shown only
with ``--verbose``; the client's lines summarise them.
"""

from __future__ import annotations

import argparse
import base64
import functools
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, TextIO

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from twisted.internet import defer, stdio, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.client import DirectMessage, MemberList, Message, PresenceEvent, ReconnectingClient, RelayError
from relay.wire import dumps

DEFAULT_ENDPOINT = "tcp:host=127.0.0.1:port=4000"
DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0
# Standard output gets this long to take its last lines before the exit.
OUTPUT_CLOSE_SECONDS = 2.0
# Text from the server shown in one line (error messages, reasons) is cut here.
MAX_SHOWN_TEXT = 300
# A token file larger than this is not a token.
MAX_TOKEN_FILE = 64 * 1024

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2  # as argparse
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

EXIT_STATUS = """\
exit status (of a script: --exec, or commands piped to standard input):
  0    every request succeeded (and the --wait-for messages arrived)
  1    the server refused a request, a request was lost with its connection,
       or the server ended the session with an error reconnecting cannot fix
       (UNAUTHORIZED, INVALID_FRAME...); the error is printed on stderr
  2    usage: a bad option or endpoint, or a command that is not understood
  3    the server could not be reached within --connect-timeout, or cannot be
       trusted (TLS certificate or host name verification failed)
  4    --timeout passed before every reply (and --wait-for message) arrived
  130  interrupted (Ctrl-C) while requests were still unanswered
At a terminal, leaving (quit, Ctrl-D, Ctrl-C) exits 0, whatever was refused
on the way; a session that ends otherwise exits 1, 3 or 4 as above."""

HELP = """\
commands:
  join <room>          join a room; it becomes the current room
  leave [<room>]       leave a room (default: the current room)
  send <text>          send text to the current room
  send #<room> <text>  send text to another room you are in
  msg <user> <text>    send text to a user, wherever they are connected
  who [<room>]         list the members of a room (default: the current room)
  heartbeat            measure the round trip to the server
  rooms                list the rooms you are in
  help                 show this list
  quit, exit           leave (Ctrl-D and Ctrl-C too)"""

# C1 controls and DEL pass through JSON encoders unescaped; a terminal may act on them.
_TERMINAL_CONTROLS = re.compile("[\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters escaped, so peers cannot drive the terminal."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in text)


def clip(text: str, limit: int = MAX_SHOWN_TEXT) -> str:
    """``text`` cut to ``limit`` characters, so one line stays one line."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_message(message: Message) -> str:
    """One incoming message as ``[HH:MM:SS] [room] user: text``."""
    seconds = message.timestamp / 1000 if message.timestamp is not None else time.time()
    stamp = time.strftime("%H:%M:%S", time.localtime(seconds))
    if message.binary:
        text = f"<{len(message.data or b'')} bytes of binary data>"
    elif isinstance(message.content, str):
        text = message.content
    else:
        text = dumps(message.content).decode()
    return f"[{stamp}] [{printable(message.room)}] {printable(message.sender)}: {printable(text)}"


def format_direct(message: DirectMessage) -> str:
    """One direct message as ``[HH:MM:SS] (direct) user: text``."""
    seconds = message.timestamp / 1000 if message.timestamp is not None else time.time()
    stamp = time.strftime("%H:%M:%S", time.localtime(seconds))
    text = message.content if isinstance(message.content, str) else dumps(message.content).decode()
    return f"[{stamp}] (direct) {printable(message.sender)}: {printable(text)}"


def direct_json(message: DirectMessage) -> str:
    """One direct message as a JSON line: ``to``, ``from``, ``content``, ``"direct": true``."""
    record: dict[str, Any] = {"direct": True, "to": message.to, "from": message.sender,
                              "content": message.content}
    if message.timestamp is not None:
        record["timestamp"] = message.timestamp
    line = dumps(record).decode("utf-8")
    return _TERMINAL_CONTROLS.sub(lambda match: f"\\u{ord(match.group()):04x}", line)


def format_presence(event: PresenceEvent) -> str:
    """A join or leave as ``* carol joined lobby`` / ``* carol left lobby``."""
    verb = "joined" if event.event == "join" else "left"
    return f"* {printable(event.user_id)} {verb} {printable(event.room)}"


def format_members(members: MemberList) -> str:
    """A member list as ``* lobby: alice, bob (2 connections) - 2 users``."""
    names = ", ".join(
        printable(user) + (f" ({connections} connections)" if connections > 1 else "")
        for user, connections in members.members
    )
    noun = "user" if members.count == 1 else "users"
    more = f", {members.count - len(members.members)} more not listed" if members.truncated else ""
    return f"* {printable(members.room)}: {names or 'nobody'} - {members.count} {noun}{more}"


def message_json(message: Message) -> str:
    """One incoming message as a JSON line: ``room``, ``from``, and ``content``
    (JSON messages) or ``data`` in base64 with ``"binary": true``."""
    record: dict[str, Any] = {"room": message.room, "from": message.sender}
    if message.binary:
        record["binary"] = True
        record["data"] = base64.b64encode(message.data or b"").decode("ascii")
    else:
        record["content"] = message.content
    if message.timestamp is not None:
        record["timestamp"] = message.timestamp
    if message.seq is not None:
        record["seq"] = message.seq
    if message.replayed:
        record["replayed"] = True
    line = dumps(record).decode("utf-8")
    # Such characters only occur inside JSON strings, where \\u escapes mean the same.
    return _TERMINAL_CONTROLS.sub(lambda match: f"\\u{ord(match.group()):04x}", line)


def describe_failure(failure: Failure) -> str:
    """A one-line account of why a request or connection failed."""
    value = failure.value
    if isinstance(value, RelayError):
        return f"{printable(str(value.code))}: {printable(clip(value.message))}"
    cause = getattr(value, "reason", None)  # ConnectionLost keeps the transport's reason
    if isinstance(cause, Failure):
        tls = _describe_tls_failure(cause)
        if tls is not None:
            return tls
    return printable(clip(failure.getErrorMessage()))


def _describe_tls_failure(failure: Failure) -> str | None:
    if failure.check(VerificationError, CertificateError):
        return "TLS: the server's certificate is not valid for this host name"
    if failure.check(SSL.Error):
        errors = failure.value.args[0] if failure.value.args else []
        reasons = [str(entry[-1]) for entry in errors if isinstance(entry, tuple) and entry]
        return "TLS: " + printable(clip(", ".join(reasons) or "handshake failed"))
    return None


class BlockingOutput:
    """Standard output written at once, line by line, as most tools do.

    A script's two streams often end up in one log: written synchronously
    like standard error, its lines keep their order there.  ``on_lost`` is
    called once nobody reads any more.
    """

    def __init__(self, stream: BinaryIO, on_lost: Callable[[], None]) -> None:
        self._stream = stream
        self._on_lost = on_lost

    def write(self, data: bytes) -> None:
        try:
            self._stream.write(data)
            self._stream.flush()
        except BrokenPipeError:
            # What is left in the buffer goes nowhere, not into a complaint at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
            self._on_lost()


class Console:
    """Where each kind of line goes.

    Interactive: everything to standard output, problems marked ``!`` (from
    the server) or ``?`` (with what was typed).  In a script, problems go to
    standard error as ``relay-client: ...``; with ``json_lines`` standard
    output carries only the messages, and news goes to standard error too.
    ``stdout`` takes bytes: the terminal's transport, or a ``BlockingOutput``.
    """

    def __init__(self, interactive: bool, json_lines: bool, stderr: TextIO) -> None:
        self.interactive = interactive
        self.json_lines = json_lines
        self.stderr = stderr
        self.stdout: Any = None

    def news(self, line: str) -> None:
        if self.json_lines:
            self._to_stderr(line)
        else:
            self._to_stdout(line)

    def message(self, message: Message) -> None:
        self._to_stdout(message_json(message) if self.json_lines else format_message(message))

    def direct(self, message: DirectMessage) -> None:
        self._to_stdout(direct_json(message) if self.json_lines else format_direct(message))

    def error(self, text: str) -> None:
        """A request refused or failed, or the session ending badly."""
        self._problem("!", text)

    def usage(self, text: str) -> None:
        """Something typed that is not a valid command."""
        self._problem("?", text)

    def _problem(self, mark: str, text: str) -> None:
        if self.interactive:
            self._to_stdout(f"{mark} {text}")
        else:
            self._to_stderr(f"relay-client: {text}")

    def _to_stdout(self, line: str) -> None:
        if self.stdout is not None:
            self.stdout.write(line.encode("utf-8", "replace") + b"\n")

    def _to_stderr(self, line: str) -> None:
        self.stderr.write(line + "\n")
        self.stderr.flush()


@dataclass(frozen=True)
class Settings:
    """How a session runs; see ``parse_args`` for each option."""

    interactive: bool
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS  # 0: keep trying
    timeout: float = 0.0  # 0: no limit
    wait_for: int = 0
    ca_file: str | None = None


@implementer(IHalfCloseableProtocol)
class ChatSession(LineReceiver):
    """The command loop on standard input/output, driving a ReconnectingClient.

    ``finished`` fires with the exit code once the session is over: when
    input has ended (end of file, ``quit``, the last ``--exec`` command, or
    the ``--wait-for`` messages received) and every request is answered, or
    earlier when the server cannot be reached, the run times out, it is
    interrupted, or the client gives up.
    """

    delimiter = b"\n"

    def __init__(self, client: ReconnectingClient, clock: Any, console: Console,
                 settings: Settings) -> None:
        self.client = client
        self.clock = clock
        self.console = console
        self.settings = settings
        self.current_room: str | None = None
        self.finished: defer.Deferred[int] = defer.Deferred()
        self._outstanding: set[defer.Deferred[Any]] = set()
        self._barrier: defer.Deferred[Any] | None = None
        self._input_ended = False
        self._requests_made = False
        self._ever_connected = False
        self._failures = 0
        self._usage_errors = 0
        self._received = 0
        self._last_problem: Failure | None = None
        self._reach_call: Any = None
        self._timeout_call: Any = None
        self._output_open = True
        self._output_waiters: list[defer.Deferred[None]] = []
        self._commands: dict[str, Callable[[str], None]] = {
            "join": self.do_join,
            "leave": self.do_leave,
            "send": self.do_send,
            "msg": self.do_msg,
            "who": self.do_who,
            "heartbeat": self.do_heartbeat,
            "rooms": self.do_rooms,
            "help": self.do_help,
            "quit": self.do_quit,
            "exit": self.do_quit,
        }
        client.on_connected = self._connected
        client.on_disconnected = self._disconnected
        client.on_reconnecting = self._reconnecting
        client.on_gave_up = self._gave_up
        client.on_message = self._message
        client.on_error = self._refused
        client.on_recovered = self._recovered
        client.on_presence = self._presence
        client.on_direct = self._message

    @property
    def script(self) -> bool:
        return not self.settings.interactive

    def start(self) -> None:
        """The client has started connecting: the --connect-timeout clock runs."""
        self._update_reach_timer()

    # Standard input and output

    def connectionMade(self) -> None:
        if self.settings.interactive:  # one pane: in order with what is typed
            self.console.stdout = self.transport
        else:
            self.console.stdout = BlockingOutput(sys.stdout.buffer, self._output_lost)

    def lineReceived(self, raw: bytes) -> None:
        self.run_command(raw.decode("utf-8", "replace"))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._usage(f"line too long (more than {self.MAX_LENGTH} bytes); ignored")

    def readConnectionLost(self) -> None:
        """End of input (Ctrl-D, or the end of a piped script)."""
        self.end_input()

    def writeConnectionLost(self) -> None:
        # Nobody reads our output any more: stop.
        self._output_lost()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._output_lost()

    def _output_lost(self) -> None:
        self.console.stdout = None
        if self._output_open:
            self._output_open = False
            waiters, self._output_waiters = self._output_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        self._finish(self._outcome())

    def close_output(self) -> defer.Deferred[None]:
        """Flush and close standard output; fires once done, or after
        ``OUTPUT_CLOSE_SECONDS`` if nobody reads it."""
        if not self._output_open:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._output_waiters.append(waiter)
        self.transport.loseConnection()
        waiter.addTimeout(OUTPUT_CLOSE_SECONDS, self.clock)
        return waiter.addErrback(lambda failure: failure.trap(defer.TimeoutError))

    # Commands

    def run_command(self, line: str) -> None:
        """Run one command line, as typed."""
        line = line.strip()
        if not line or self._input_ended:  # nothing after quit is a command
            return
        name, _, argument = line.partition(" ")
        command = self._commands.get(name.lower())
        if command is None:
            self._usage(f"unknown command {printable(clip(name, 40))!r}; type 'help' for the list")
            return
        command(argument.strip())

    def do_join(self, argument: str) -> None:
        if not argument:
            self._usage("usage: join <room>")
            return
        previous, self.current_room = self.current_room, argument
        joining = self.client.join(argument)

        def joined(ack: dict[str, Any]) -> None:
            room = str(ack.get("room", argument))
            if self.current_room == argument:
                self.current_room = room
            members = ack.get("members", "?")
            noun = "member" if members == 1 else "members"
            self.console.news(f"* joined {printable(room)} ({members} {noun})")

        def refused(failure: Failure) -> Failure:
            if self.current_room == argument:
                self.current_room = previous
            return failure

        self._track(joining.addCallbacks(joined, refused))

    def do_leave(self, argument: str) -> None:
        room = argument or self.current_room
        if not room:
            self._usage("usage: leave <room>")
            return
        if self.current_room == room:
            remaining = [name for name in self.client.rooms if name != room]
            self.current_room = remaining[-1] if remaining else None
        leaving = self.client.leave(room)
        leaving.addCallback(lambda ack: self.console.news(f"* left {printable(str(ack.get('room', room)))}"))
        self._track(leaving)

    def do_send(self, argument: str) -> None:
        room = self.current_room
        if argument.startswith("#"):
            target, _, argument = argument.partition(" ")
            room = target[1:]
            argument = argument.strip()
        if not argument or not room:
            self._usage("usage: send <text> (after join <room>), or send #<room> <text>")
            return
        self._track(self.client.send(room, argument).addCallback(self._sent, room))

    def _sent(self, seq: int | None, room: str) -> None:
        # Without the acks extension (an older server) there is nothing to confirm.
        if seq is not None:
            self.console.news(f"✓ {printable(room)} #{seq}")

    def do_msg(self, argument: str) -> None:
        user, _, text = argument.partition(" ")
        text = text.strip()
        if not user or not text:
            self._usage("usage: msg <user> <text>")
            return
        sending = self.client.send_direct(user, text)
        self._track(sending.addCallback(lambda _: self.console.news(f"✓ @{printable(user)}")))

    def do_who(self, argument: str) -> None:
        room = argument or self.current_room
        if not room:
            self._usage("usage: who <room> (or join a room first)")
            return
        listing = self.client.who(room)
        self._track(listing.addCallback(lambda members: self.console.news(format_members(members))))

    def do_heartbeat(self, argument: str) -> None:
        pinging = self.client.heartbeat()
        pinging.addCallback(lambda rtt: self.console.news(f"* heartbeat round trip {rtt * 1000:.2f} ms"))
        self._track(pinging)

    def do_rooms(self, argument: str) -> None:
        rooms = list(self.client.rooms)
        if not rooms:
            self.console.news("* you are in no rooms")
            return
        listed = ", ".join(printable(room) for room in rooms)
        current = f" (current: {printable(self.current_room)})" if self.current_room else ""
        self.console.news(f"* rooms: {listed}{current}")

    def do_help(self, argument: str) -> None:
        self.console.news(HELP)

    def do_quit(self, argument: str) -> None:
        self.end_input()

    def _usage(self, text: str) -> None:
        self._usage_errors += 1
        self.console.usage(text)

    # Requests in flight

    def _track(self, request: defer.Deferred[Any]) -> None:
        self._requests_made = True
        self._outstanding.add(request)
        request.addErrback(self._request_failed)
        request.addBoth(self._settled, request)

    def _request_failed(self, failure: Failure) -> None:
        if failure.check(defer.CancelledError):  # we are stopping
            return
        self._failures += 1
        self.console.error(describe_failure(failure))

    def _settled(self, result: Any, request: defer.Deferred[Any]) -> None:
        self._outstanding.discard(request)
        self._maybe_finish()

    def _unanswered(self) -> int:
        return len(self._outstanding - {self._barrier})

    # The end of a run

    def end_input(self) -> None:
        """No more commands: finish once every request is answered."""
        if self._input_ended or self.finished.called:
            return
        self._input_ended = True
        self.pauseProducing()
        # In a script, a last round trip proves that the server was reached
        # and has handled every command: it answers in order.
        if self.script or self._requests_made:
            self._barrier = self.client.heartbeat()
            self._track(self._barrier)
        self._update_reach_timer()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._input_ended and not self._outstanding and self._received >= self.settings.wait_for:
            self._finish(self._outcome())

    def _outcome(self) -> int:
        if self.settings.interactive:
            return EXIT_OK  # each problem was shown, and dealt with, as it came
        if self._usage_errors:
            return EXIT_USAGE
        if self._failures:
            return EXIT_FAILED
        return EXIT_OK

    def interrupt(self) -> None:
        """Ctrl-C (or SIGTERM): stop now, whatever is in flight."""
        if self.finished.called:
            return
        unanswered = self._unanswered()
        if self.script and unanswered:
            self.console.error(f"interrupted with {_requests(unanswered)} unanswered")
            self._finish(EXIT_INTERRUPTED)
        else:
            self._finish(self._outcome())

    def _finish(self, code: int) -> None:
        for call in (self._reach_call, self._timeout_call):
            if call is not None and call.active():
                call.cancel()
        if not self.finished.called:
            self.finished.callback(code)

    # Time limits

    def _update_reach_timer(self) -> None:
        """Run the --connect-timeout clock while the server needs reaching: before
        the first connection, and in a script or once input ended, always."""
        limit = self.settings.connect_timeout
        needed = (
            limit > 0
            and not self.finished.called
            and not self.client.connected
            and (self.script or self._input_ended or not self._ever_connected)
        )
        running = self._reach_call is not None and self._reach_call.active()
        if needed and not running:
            self._reach_call = self.clock.callLater(limit, self._unreachable)
        elif running and not needed:
            self._reach_call.cancel()

    def _unreachable(self) -> None:
        why = f": {describe_failure(self._last_problem)}" if self._last_problem is not None else ""
        self.console.error(
            f"cannot reach {printable(self.client.description)} "
            f"within {self.settings.connect_timeout:g} s{why}"
        )
        self._finish(EXIT_UNREACHABLE)

    def _start_timeout(self) -> None:
        if self.settings.timeout > 0 and self._timeout_call is None:
            self._timeout_call = self.clock.callLater(self.settings.timeout, self._timed_out)

    def _timed_out(self) -> None:
        missing = []
        if self._unanswered():
            missing.append(f"{_requests(self._unanswered())} unanswered")
        if self._received < self.settings.wait_for:
            missing.append(f"{self._received} of {self.settings.wait_for} messages received")
        detail = f": {', '.join(missing)}" if missing else ""
        self.console.error(f"timed out after {self.settings.timeout:g} s{detail}")
        self._finish(EXIT_TIMEOUT)

    # Client hooks

    def _connected(self, client: Any) -> None:
        self._ever_connected = True
        self._update_reach_timer()
        self._start_timeout()
        rooms = ", ".join(printable(room) for room in self.client.rooms)
        rejoined = f"; in {rooms}" if rooms else ""
        self.console.news(
            f"* connected to {printable(self.client.description)} "
            f"as {printable(client.user_id or '?')}{rejoined}"
        )

    def _disconnected(self, reason: Failure) -> None:
        if self.finished.called:  # our own goodbye is no news
            return
        self._last_problem = reason
        self.console.news(f"* disconnected: {describe_failure(reason)}")
        self._update_reach_timer()

    def _reconnecting(self, attempt: int, delay: float, reason: Failure | None) -> None:
        if self.finished.called:
            return
        why = ""
        if reason is not None and reason is not self._last_problem:  # not said yet
            self._last_problem = reason
            why = f": {describe_failure(reason)}"
        self.console.news(f"* reconnecting in {delay:.1f} s (attempt {attempt}){why}")

    def _gave_up(self, reason: Failure) -> None:
        if self.finished.called:
            return
        hint = ""
        if "TLS:" in describe_failure(reason) and self.settings.ca_file is None:
            hint = " (--ca-file trusts a private certificate authority)"
        self.console.error(f"cannot continue: {describe_failure(reason)}{hint}")
        self._finish(EXIT_FAILED if reason.check(RelayError) else EXIT_UNREACHABLE)

    def _message(self, message: Message | DirectMessage) -> None:
        wanted = self.settings.wait_for
        if wanted and self._received >= wanted:
            return  # the run is ending: exactly the messages asked for are shown
        self._received += 1
        if isinstance(message, DirectMessage):
            self.console.direct(message)
        else:
            self.console.message(message)
        if wanted and self._received == wanted:
            self.end_input()
        self._maybe_finish()

    def _recovered(self, room: str, recovered: bool, missed: int) -> None:
        if recovered:
            noun = "missed message" if missed == 1 else "missed messages"
            self.console.news(f"* recovered {missed} {noun} in {printable(room)}")
        else:
            self.console.news(f"* could not recover {printable(room)}: history lost")
    def _presence(self, event: PresenceEvent) -> None:
        if not self.finished.called:
            self.console.news(format_presence(event))

    def _refused(self, relay_error: RelayError) -> None:
        # A refusal no request was waiting for: a message sent without acks,
        # or a room the server no longer accepts after a reconnection.
        self._failures += 1
        self.console.error(describe_failure(Failure(relay_error)))


def _requests(count: int) -> str:
    return f"{count} request" if count == 1 else f"{count} requests"


def _positive_seconds(value: str) -> float:
    seconds = float(value)
    if not seconds >= 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds")
    return seconds


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a count")
    return number


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="relay-client",
        description=(
            "Chat through a Relay server: type 'help' once connected. Commands come "
            "from standard input, one a line, or from --exec; the client waits for "
            "every reply before it exits."
        ),
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "endpoint", nargs="?", default=DEFAULT_ENDPOINT,
        help=f"client endpoint (tcp:..., tls:..., unix:...) or ws:// URL [default: {DEFAULT_ENDPOINT}]",
    )
    parser.add_argument("--user", help="user id to ask for")
    credentials = parser.add_mutually_exclusive_group()
    credentials.add_argument("--token", help="authentication token (visible to other local users "
                                             "in the process list: prefer --token-file)")
    credentials.add_argument("--token-file", metavar="FILE",
                             help="read the token from FILE before every connection, so a file "
                                  "kept fresh by its issuer renews the login")
    parser.add_argument("--echo", action="store_true", help="also show your own messages")
    parser.add_argument(
        "--compress", action="store_true",
        help="ask for the compression extension: large messages travel zlib-compressed both ways",
    )
    parser.add_argument("--ca-file", help="PEM certificates to trust for tls: and wss://")
    parser.add_argument("--client-cert", help="PEM client certificate with its private key")
    parser.add_argument(
        "-c", "--exec", action="append", default=[], metavar="COMMAND",
        help="run this command (repeatable, in order) instead of reading standard input",
    )
    parser.add_argument(
        "--connect-timeout", type=_positive_seconds, default=DEFAULT_CONNECT_TIMEOUT_SECONDS,
        metavar="S",
        help="give up (exit 3) when the server cannot be reached for S seconds: at start, "
             "and in a script or after the input ended, after a disconnection too; "
             f"0 keeps trying [default: {DEFAULT_CONNECT_TIMEOUT_SECONDS:g}]",
    )
    parser.add_argument(
        "--wait-for", type=_count, default=0, metavar="N",
        help="exit once N messages have arrived (since the start) and the commands "
             "are answered; only those N are printed",
    )
    parser.add_argument(
        "--timeout", type=_positive_seconds, default=0.0, metavar="S",
        help="once connected, give up (exit 4) after S seconds if replies or "
             "--wait-for messages are still missing [default: no limit]",
    )
    parser.add_argument("--json", action="store_true",
                        help="print messages as JSON lines; other lines go to standard error")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the client library's log on standard error")
    parser.add_argument("--debug", action="store_true",
                        help="show the library's log in detail (implies --verbose)")
    return parser.parse_args(argv)


def start_logging(verbose: bool, debug: bool) -> None:
    """Library log events go to standard error, only when asked for: at a
    terminal they would land in the middle of the chat.  Critical events
    (bugs) are always shown."""
    if debug:
        level = LogLevel.debug
    elif verbose:
        level = LogLevel.info
    else:
        level = LogLevel.critical
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _stdout_descriptor(interactive: bool) -> int:
    """Standard output for the stdio transport; a script writes its own."""
    return 1 if interactive else os.open(os.devnull, os.O_WRONLY)


def _stdin_descriptor(options: argparse.Namespace) -> int:
    """Standard input, or an empty one: with --exec, or when it is closed."""
    if not options.exec:
        try:
            os.fstat(0)
            return 0
        except OSError:
            pass
    return os.open(os.devnull, os.O_RDONLY)


def read_token_file(path: str) -> str:
    """The token in ``path``, without surrounding white space."""
    with open(path, "rb") as file:
        data = file.read(MAX_TOKEN_FILE + 1)
    if len(data) > MAX_TOKEN_FILE:
        raise ValueError(f"{path} is larger than {MAX_TOKEN_FILE} bytes: not a token")
    token = data.decode("utf-8").strip()
    if not token:
        raise ValueError(f"{path} is empty")
    return token


def _token_provider(options: argparse.Namespace) -> Callable[[], str] | None:
    """Reads ``--token-file`` before each connection; checked once now, so
    that a missing file is a usage error rather than a retry."""
    if options.token_file is None:
        return None
    try:
        read_token_file(options.token_file)
    except (OSError, ValueError) as problem:
        sys.stderr.write(f"relay-client: --token-file: {problem}\n")
        raise SystemExit(EXIT_USAGE) from None
    return functools.partial(read_token_file, options.token_file)


def _build_client(reactor: Any, options: argparse.Namespace) -> ReconnectingClient:
    provider = _token_provider(options)
    try:
        return ReconnectingClient(
            reactor, options.endpoint, user=options.user, token=options.token, echo=options.echo,
            ca_file=options.ca_file, client_cert=options.client_cert, acks=True, history=True,
            compression=options.compress, presence=True, direct=True,
            token_provider=provider,
        )
    except Exception as problem:  # a bad description, an unreadable PEM file...
        sys.stderr.write(f"relay-client: cannot use {options.endpoint!r}: {problem}\n")
        raise SystemExit(EXIT_USAGE) from None


async def run(reactor: Any, options: argparse.Namespace) -> int:
    """Run one session; returns the exit code (raises SystemExit for others)."""
    client = _build_client(reactor, options)
    interactive = not options.exec and os.isatty(0)
    console = Console(interactive, options.json, sys.stderr)
    settings = Settings(
        interactive=interactive, connect_timeout=options.connect_timeout,
        timeout=options.timeout, wait_for=options.wait_for, ca_file=options.ca_file,
    )
    session = ChatSession(client, reactor, console, settings)
    stdio.StandardIO(session, stdin=_stdin_descriptor(options),
                     stdout=_stdout_descriptor(interactive), reactor=reactor)
    over: defer.Deferred[None] = defer.Deferred()
    # Ctrl-C (or SIGTERM) stops the reactor: leave cleanly on the way out.
    reactor.addSystemEventTrigger("before", "shutdown", _interrupted, session, over)
    console.news(f"* connecting to {printable(options.endpoint)}; type 'help' for commands")
    client.start()
    session.start()
    for command in options.exec:
        session.run_command(command)
    if options.exec:
        session.end_input()
    try:
        code = await session.finished
        await client.stop()
        await session.close_output()
    finally:
        over.callback(None)
    if code != EXIT_OK:
        raise SystemExit(code)
    return code


def _interrupted(session: ChatSession, over: defer.Deferred[None]) -> defer.Deferred[None]:
    # A second Ctrl-C would only make the reactor complain that it is stopping.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    session.interrupt()
    return over


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``relay-client``."""
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
        start_logging(options.verbose, options.debug)
        task.react(lambda reactor: defer.ensureDeferred(run(reactor, options)))
    except KeyboardInterrupt:  # Ctrl-C before the reactor took over the signal
        raise SystemExit(EXIT_INTERRUPTED) from None


if __name__ == "__main__":
    main()
