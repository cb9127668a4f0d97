"""Clients of a server that requires tokens: the library, relay-client, relay-bench.

The server's clock is a ``task.Clock`` while its sockets are real, so a test
moves a token past its expiry at the instant it chooses.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from twisted.internet import defer, endpoints, reactor, task
from twisted.python.failure import Failure
from twisted.trial import unittest

from relay.client import ReconnectingClient, RelayClientProtocol, connect
from relay.server.auth import Authenticator, JwtVerifier
from relay.server.factory import RelayConfig, RelayFactory
from relay.tools.bench import Bench, BenchConfig, parse_args
from relay.wire import ErrorCode
from tests.authkeys import OTHER_SECRET, KeyFiles, claims, mint
from tests.support import wait_until
from tests.test_cli import spawn

NOW = 1_000_000.0
TTL = 30


class ClockedServerTestCase(unittest.TestCase):
    """A server requiring JWTs, on real loopback sockets, its time on a Clock."""

    timeout = 60

    async def setUp(self) -> None:
        self.files = KeyFiles(self)
        self.clock = task.Clock()
        self.clock.advance(NOW)
        authenticator = Authenticator(jwt_verifier=JwtVerifier(self.files.secret(), leeway=0))
        self.factory = RelayFactory(RelayConfig(), reactor=self.clock, auth=authenticator)
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = await endpoint.listen(self.factory)
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self.factory.wait_closed)
        self.address = f"tcp:host=127.0.0.1:port={self.port.getHost().port}"

    def token(self, sub: str = "alice", ttl: float = TTL, **fields: Any) -> str:
        """A token valid for ``ttl`` seconds from the server's now."""
        return mint(claims(sub=sub, now=self.clock.seconds(), ttl=ttl, **fields))

    def expire(self) -> None:
        """Move the server's clock past every token issued so far."""
        self.clock.advance(TTL + 1)

    def reconnecting(self, **options: Any) -> ReconnectingClient:
        client = ReconnectingClient(reactor, self.address, retry_policy=lambda attempt: 0.01, **options)
        self.addCleanup(client.stop)
        return client


class ConnectTests(ClockedServerTestCase):
    async def connected(self, **options: Any) -> RelayClientProtocol:
        client = await connect(reactor, self.address, **options)
        self.addCleanup(client.disconnect)
        return client

    async def test_a_token_authenticates(self) -> None:
        client = await self.connected(token=self.token())
        self.assertEqual(client.user_id, "alice")

    async def test_a_token_provider_may_answer_now_or_later(self) -> None:
        now = await self.connected(token_provider=lambda: self.token(sub="now"))
        later = await self.connected(token_provider=lambda: task.deferLater(reactor, 0, self.token, "later"))
        self.assertEqual((now.user_id, later.user_id), ("now", "later"))

    async def test_a_provider_must_give_a_string(self) -> None:
        await self.assertFailure(connect(reactor, self.address, token_provider=lambda: 42), TypeError)
        self.assertRaises(ValueError, connect, reactor, self.address, token="t", token_provider=str)
        self.assertRaises(ValueError, ReconnectingClient, reactor, self.address, token="t",
                          token_provider=str)

    async def test_the_server_ends_the_connection_at_expiry(self) -> None:
        client = await self.connected(token=self.token())
        self.expire()
        await client.when_closed()
        self.assertEqual((client.close_reason.value.code, client.close_reason.value.message),
                         (ErrorCode.UNAUTHORIZED, "token expired"))


class Events:
    """Records a ReconnectingClient's hooks; ``next(kind)`` waits for one.

    A hook's Failure is recorded as its exception.
    """

    def __init__(self, client: ReconnectingClient) -> None:
        self.seen: dict[str, list[Any]] = {"connected": [], "gave_up": [], "reconnecting": []}
        self._waiters: dict[str, list[defer.Deferred[Any]]] = {kind: [] for kind in self.seen}
        client.on_connected = self._recorder("connected")
        client.on_gave_up = self._recorder("gave_up")
        client.on_reconnecting = self._recorder("reconnecting")

    def _recorder(self, kind: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            value = args[0] if len(args) == 1 else args
            if isinstance(value, Failure):  # a Deferred would take it for an error
                value = value.value
            self.seen[kind].append(value)
            waiters, self._waiters[kind] = self._waiters[kind], []
            for waiter in waiters:
                waiter.callback(value)

        return record

    def next(self, kind: str) -> defer.Deferred[Any]:
        waiter: defer.Deferred[Any] = defer.Deferred()
        self._waiters[kind].append(waiter)
        return waiter


class ReconnectingTokenTests(ClockedServerTestCase):
    async def test_a_provider_is_asked_before_every_connection_and_renews_an_expired_login(self) -> None:
        issued: list[str] = []

        def provider() -> defer.Deferred[str]:
            issued.append(self.token(sub=f"alice-{len(issued) + 1}"))
            return defer.succeed(issued[-1])

        client = self.reconnecting(token_provider=provider)
        events = Events(client)
        client.start()
        first = await events.next("connected")
        await client.join("team-a")
        self.assertEqual(first.user_id, "alice-1")

        renewed = events.next("connected")
        self.expire()
        second = await renewed
        self.assertEqual(first.close_reason.value.code, ErrorCode.UNAUTHORIZED)
        self.assertEqual((second.user_id, len(issued)), ("alice-2", 2))
        self.assertNotEqual(issued[0], issued[1])
        # The rooms came back with the new login, and nobody gave up.
        await wait_until(lambda: "team-a" in self.factory.registry, "team-a re-joined")
        self.assertEqual(events.seen["gave_up"], [])
        self.assertEqual(events.seen["reconnecting"][0][2].value.message, "token expired")

    async def test_a_fresh_token_refused_stops_reconnecting_and_says_why(self) -> None:
        issued: list[str] = []

        def provider() -> str:
            good = not issued
            issued.append(self.token() if good else mint(claims(now=self.clock.seconds()), OTHER_SECRET))
            return issued[-1]

        client = self.reconnecting(token_provider=provider)
        events = Events(client)
        client.start()
        await events.next("connected")
        gave_up = events.next("gave_up")
        self.expire()
        reason = await gave_up
        self.assertEqual((reason.code, reason.message),
                         (ErrorCode.UNAUTHORIZED, "invalid token: bad signature"))
        await wait_until(lambda: client.stopped, "the client stops once the hook returns")
        self.assertEqual(len(issued), 2)
        self.assertEqual(self.factory.stats.connections_total, 2)

    async def test_a_fixed_token_that_expires_is_not_retried(self) -> None:
        client = self.reconnecting(token=self.token())
        events = Events(client)
        client.start()
        await events.next("connected")
        gave_up = events.next("gave_up")
        self.expire()
        reason = await gave_up
        self.assertEqual(reason.message, "token expired")
        self.assertEqual(self.factory.stats.connections_total, 1)

    async def test_a_provider_that_fails_is_asked_again_after_a_delay(self) -> None:
        calls: list[int] = []

        def provider() -> str:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("the issuer is down")
            return self.token()

        client = self.reconnecting(token_provider=provider)
        events = Events(client)
        client.start()
        connection = await events.next("connected")
        self.assertEqual((connection.user_id, len(calls)), ("alice", 2))
        self.assertIsInstance(events.seen["reconnecting"][0][2].value, RuntimeError)


class TerminalClientTests(ClockedServerTestCase):
    """relay-client --token-file, a real process against the real server."""

    def token_file(self, token: str) -> str:
        return self.files.write("alice.token", token + "\n")

    async def test_a_token_file_logs_in_and_grants_rooms(self) -> None:
        path = self.token_file(self.token(rooms=["team-*"]))
        script = spawn(self, self.address, "--token-file", path, "-c", "join team-a", "-c", "send hi",
                       "-c", "join kitchen")
        self.assertEqual(await script.ended, 1)
        self.assertRegex(script.out, r"\* connected to .* as alice")
        self.assertRegex(script.out, r"(?m)^✓ team-a #1$")
        self.assertIn("relay-client: FORBIDDEN: room 'kitchen' is not granted to this connection",
                      script.lines["err"])
        script.assert_quiet(self)

    async def test_a_refused_token_file_stops_at_once(self) -> None:
        path = self.token_file(mint(claims(now=self.clock.seconds()), OTHER_SECRET))
        script = spawn(self, self.address, "--token-file", path, "-c", "join team-a")
        self.assertEqual(await script.ended, 1)
        self.assertIn("relay-client: cannot continue: UNAUTHORIZED: invalid token: bad signature",
                      script.lines["err"])
        self.assertEqual(self.factory.stats.connections_total, 1)

    async def test_a_missing_token_file_or_two_credentials_are_usage_errors(self) -> None:
        missing = spawn(self, self.address, "--token-file", self.files.directory.child("none").path,
                        "-c", "heartbeat")
        self.assertEqual(await missing.ended, 2)
        self.assertRegex(missing.err, r"relay-client: --token-file: .*No such file")
        both = spawn(self, self.address, "--token", "t", "--token-file", "f", "-c", "heartbeat")
        self.assertEqual(await both.ended, 2)
        self.assertEqual(self.factory.stats.connections_total, 0)

    async def test_the_token_file_is_read_again_for_each_connection(self) -> None:
        path = self.token_file(self.token(sub="alice"))
        script = spawn(self, self.address, "--token-file", path, "-c", "join team-a",
                       "--wait-for", "1", "--timeout", "50", "--json")
        await script.wait_for(r"\* joined team-a", "err")
        # The issuer refreshes the file; the server ends the old login.
        self.files.replace(path, self.token(sub="alice-renewed", ttl=3 * TTL))
        self.expire()
        await script.wait_for(r"\* connected to .* as alice-renewed; in team-a", "err")
        sender = await connect(reactor, self.address, token=self.token(sub="bob"))
        self.addCleanup(sender.disconnect)
        await sender.join("team-a")
        await sender.send("team-a", "welcome back")
        self.assertEqual(await script.ended, 0)
        self.assertEqual(json.loads(script.lines["out"][-1])["content"], "welcome back")


class BenchTokenTests(ClockedServerTestCase):
    """relay-bench logs every connection in with the token it was given."""

    async def test_a_run_with_a_token_delivers_and_never_reports_the_token(self) -> None:
        token = self.token(sub="bench", rooms=["bench-*"])
        path = self.files.write("bench.token", token + "\n")
        config, _ = parse_args(["--endpoint", self.address, "--token-file", path, "--subscribers", "3",
                                "--duration", "0.5", "--warmup", "0.1", "--drain", "30", "--quiet"])
        self.assertEqual(config.token, token)
        report = await Bench(config, reactor).run()
        self.assertGreater(report["received"], 0)
        self.assertEqual((report["lost"], report["lost_connections"]), (0, 0))
        self.assertNotIn(token, json.dumps(report))
        self.assertNotIn(token, repr(config))
        self.assertEqual(report["config"]["token"], "(given)")

    async def test_without_a_token_the_bench_is_refused(self) -> None:
        config = BenchConfig(endpoint=self.address, subscribers=1, publishers=0, duration=0.1,
                             warmup=0, drain=0, progress=False)
        failure = await self.assertFailure(defer.ensureDeferred(Bench(config, reactor).run()), Exception)
        self.assertIn("UNAUTHORIZED", str(failure))


class TokenFileTests(unittest.TestCase):
    def test_a_token_file_is_read_without_white_space(self) -> None:
        from relay.client.cli import MAX_TOKEN_FILE, read_token_file

        files = KeyFiles(self)
        self.assertEqual(read_token_file(files.write("t", "  abc.def \n\n")), "abc.def")
        self.assertRaises(ValueError, read_token_file, files.write("empty", "\n"))
        self.assertRaises(ValueError, read_token_file, files.write("big", "x" * (MAX_TOKEN_FILE + 1)))
        self.assertRaises(OSError, read_token_file, os.path.join(files.directory.path, "missing"))
