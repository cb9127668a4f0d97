"""relay-client: a terminal client for Relay.

Reads commands from standard input, one a line, so it works on a terminal
and scripted through a pipe alike.  Output goes to standard output; the
library's own warnings go to standard error.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

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

from relay.client import Message, ReconnectingClient, RelayError
from relay.wire import dumps

DEFAULT_ENDPOINT = "tcp:host=127.0.0.1:port=4000"
# After end of input, replies still in flight get this long to arrive.
DRAIN_TIMEOUT_SECONDS = 10.0
EXIT_OK = 0
EXIT_GAVE_UP = 1
EXIT_USAGE = 2  # as argparse

HELP = """\
commands:
  join <room>          join a room; it becomes the current room
  leave [<room>]       leave a room (default: the current room)
  send <text>          send text to the current room
  send #<room> <text>  send text to another room you are in
  heartbeat            measure the round trip to the server
  rooms                list the rooms you are in
  help                 show this list
  quit, exit           leave (Ctrl-D and Ctrl-C too)"""


def printable(text: str) -> str:
    """``text`` with control characters escaped, so peers cannot drive the terminal."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in text)


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


def describe_failure(failure: Failure) -> str:
    """A one-line account of why a request or connection failed."""
    if failure.check(RelayError):
        return f"{failure.value.code}: {failure.value.message}"
    return failure.getErrorMessage()


@implementer(IHalfCloseableProtocol)
class ChatSession(LineReceiver):
    """The command loop on standard input/output, driving a ReconnectingClient.

    ``finished`` fires with the exit code once the session is over.
    """

    delimiter = b"\n"

    def __init__(self, client: ReconnectingClient, clock: Any) -> None:
        self.client = client
        self.clock = clock
        self.current_room: str | None = None
        self.finished: defer.Deferred[int] = defer.Deferred()
        self._outstanding: set[defer.Deferred[Any]] = set()
        self._input_ended = False
        self._requests_made = False
        self._drain_call: Any = None
        self._output_closed: defer.Deferred[None] = defer.Deferred()
        self._commands: dict[str, Callable[[str], None]] = {
            "join": self.do_join,
            "leave": self.do_leave,
            "send": self.do_send,
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
        client.on_message = lambda message: self.say(format_message(message))
        client.on_error = lambda relay_error: self.say(f"! {relay_error.code}: {relay_error.message}")

    def say(self, line: str) -> None:
        """Write one line to standard output."""
        if self.transport is not None and not self._output_closed.called:
            self.transport.write(line.encode("utf-8", "replace") + b"\n")

    # Input

    def lineReceived(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            return
        name, _, argument = line.partition(" ")
        command = self._commands.get(name.lower())
        if command is None:
            self.say(f"? unknown command {printable(name)!r}; type 'help' for the list")
            return
        command(argument.strip())

    def lineLengthExceeded(self, line: bytes) -> None:
        self.say(f"? line too long (more than {self.MAX_LENGTH} bytes); ignored")

    def readConnectionLost(self) -> None:
        """End of input (Ctrl-D, or the end of a piped script)."""
        self._end_input()

    def writeConnectionLost(self) -> None:
        # Nobody is reading our output any more: stop.
        if not self._output_closed.called:
            self._output_closed.callback(None)
        self._finish(EXIT_OK)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self._output_closed.called:
            self._output_closed.callback(None)
        self._finish(EXIT_OK)

    # Commands

    def do_join(self, argument: str) -> None:
        if not argument:
            self.say("? usage: join <room>")
            return
        previous, self.current_room = self.current_room, argument
        joining = self.client.join(argument)

        def joined(ack: dict[str, Any]) -> None:
            room = ack.get("room", argument)
            if self.current_room == argument:
                self.current_room = room
            members = ack.get("members", "?")
            noun = "member" if members == 1 else "members"
            self.say(f"* joined {printable(room)} ({members} {noun})")

        def refused(failure: Failure) -> Failure:
            if self.current_room == argument:
                self.current_room = previous
            return failure

        self._track(joining.addCallbacks(joined, refused))

    def do_leave(self, argument: str) -> None:
        room = argument or self.current_room
        if not room:
            self.say("? usage: leave <room>")
            return
        if self.current_room == room:
            remaining = [name for name in self.client.rooms if name != room]
            self.current_room = remaining[-1] if remaining else None
        leaving = self.client.leave(room)
        leaving.addCallback(lambda ack: self.say(f"* left {printable(ack.get('room', room))}"))
        self._track(leaving)

    def do_send(self, argument: str) -> None:
        room = self.current_room
        if argument.startswith("#"):
            target, _, argument = argument.partition(" ")
            room = target[1:]
            argument = argument.strip()
        if not argument or not room:
            self.say("? usage: send <text> (after join <room>), or send #<room> <text>")
            return
        self._track(self.client.send(room, argument))

    def do_heartbeat(self, argument: str) -> None:
        pinging = self.client.heartbeat()
        pinging.addCallback(lambda rtt: self.say(f"* heartbeat round trip {rtt * 1000:.2f} ms"))
        self._track(pinging)

    def do_rooms(self, argument: str) -> None:
        rooms = list(self.client.rooms)
        if not rooms:
            self.say("* you are in no rooms")
            return
        listed = ", ".join(printable(room) for room in rooms)
        current = f" (current: {printable(self.current_room)})" if self.current_room else ""
        self.say(f"* rooms: {listed}{current}")

    def do_help(self, argument: str) -> None:
        self.say(HELP)

    def do_quit(self, argument: str) -> None:
        self._end_input()

    # Requests in flight

    def _track(self, request: defer.Deferred[Any]) -> None:
        self._requests_made = True
        self._outstanding.add(request)
        request.addErrback(self._request_failed)
        request.addBoth(self._settled, request)

    def _request_failed(self, failure: Failure) -> None:
        if not failure.check(defer.CancelledError):  # cancelled: we are stopping
            self.say(f"! {describe_failure(failure)}")

    def _settled(self, result: Any, request: defer.Deferred[Any]) -> None:
        self._outstanding.discard(request)
        if self._input_ended and not self._outstanding:
            self._finish(EXIT_OK)

    def _end_input(self) -> None:
        """No more commands: quit once every outstanding request is settled."""
        if self._input_ended:
            return
        self._input_ended = True
        # Lines after "quit" are not commands any more.
        self.pauseProducing()
        if self._requests_made:
            self._add_barrier()
        if not self._outstanding:
            self._finish(EXIT_OK)
            return
        self._drain_call = self.clock.callLater(DRAIN_TIMEOUT_SECONDS, self._drain_expired)

    def _add_barrier(self) -> None:
        # The server answers in order: once this echo is back, every reply
        # and ERROR for the commands before it (sends included) is in.
        barrier = self.client.heartbeat()
        self._outstanding.add(barrier)
        barrier.addErrback(lambda failure: None)
        barrier.addBoth(self._settled, barrier)

    def _drain_expired(self) -> None:
        self._drain_call = None
        self.say(f"! {len(self._outstanding)} requests still unanswered; quitting")
        self._finish(EXIT_OK)

    def _finish(self, code: int) -> None:
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        if not self.finished.called:
            self.finished.callback(code)

    def close_output(self) -> defer.Deferred[None]:
        """Flush and close standard output; fires once done."""
        if not self._output_closed.called and self.transport is not None:
            self.transport.loseConnection()
        return self._output_closed

    # Client hooks

    def _connected(self, client: Any) -> None:
        rooms = ", ".join(printable(room) for room in self.client.rooms)
        rejoined = f"; in {rooms}" if rooms else ""
        self.say(f"* connected to {self.client.description} as {printable(client.user_id or '?')}{rejoined}")

    def _disconnected(self, reason: Failure) -> None:
        if not self.finished.called:  # our own goodbye is no news
            self.say(f"* disconnected: {describe_failure(reason)}")

    def _reconnecting(self, attempt: int, delay: float, reason: Failure | None) -> None:
        why = f": {describe_failure(reason)}" if reason is not None else ""
        self.say(f"* reconnecting in {delay:.1f} s (attempt {attempt}){why}")

    def _gave_up(self, reason: Failure) -> None:
        self.say(f"! giving up: {describe_failure(reason)}")
        self._finish(EXIT_GAVE_UP)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="relay-client",
        description="Chat through a Relay server. Type 'help' once connected.",
    )
    parser.add_argument(
        "endpoint", nargs="?", default=DEFAULT_ENDPOINT,
        help=f"client endpoint (tcp:..., tls:..., unix:...) or ws:// URL [default: {DEFAULT_ENDPOINT}]",
    )
    parser.add_argument("--user", help="user id to ask for")
    parser.add_argument("--token", help="authentication token")
    parser.add_argument("--echo", action="store_true", help="also show your own messages")
    parser.add_argument("--ca-file", help="PEM certificates to trust for tls: and wss://")
    parser.add_argument("--client-cert", help="PEM client certificate with its private key")
    parser.add_argument("--debug", action="store_true", help="log the library's details to stderr")
    return parser.parse_args(argv)


def start_logging(debug: bool) -> None:
    """Send log events to standard error, keeping standard output for the chat."""
    level = LogLevel.debug if debug else LogLevel.warn
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


async def run(reactor: Any, options: argparse.Namespace) -> int:
    """Run one chat session; returns the exit code."""
    try:
        client = ReconnectingClient(
            reactor, options.endpoint, user=options.user, token=options.token, echo=options.echo,
            ca_file=options.ca_file, client_cert=options.client_cert,
        )
    except Exception as problem:  # a bad description, an unreadable PEM file...
        sys.stderr.write(f"relay-client: cannot use {options.endpoint!r}: {problem}\n")
        raise SystemExit(EXIT_USAGE) from None
    session = ChatSession(client, reactor)
    stdio.StandardIO(session, reactor=reactor)
    # Ctrl-C stops the reactor: say goodbye to the server on the way out.
    reactor.addSystemEventTrigger("before", "shutdown", client.stop)
    session.say(f"* connecting to {options.endpoint}; type 'help' for commands")
    client.start()
    code = await session.finished
    await client.stop()
    await session.close_output()
    if code != EXIT_OK:
        raise SystemExit(code)
    return code


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``relay-client``."""
    options = parse_args(sys.argv[1:] if argv is None else argv)
    start_logging(options.debug)
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, options)))


if __name__ == "__main__":
    main()
