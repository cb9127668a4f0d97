"""Authentication over real sockets: makeService, every transport, real keys.

Servers are built from ``twistd relay`` options with ``makeService``; keys
are made per run with ``cryptography``, tokens signed with PyJWT, TLS
certificates made with trustme.  The real ``twistd relay`` process is used
for SIGHUP.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from typing import Any

import trustme
from twisted.internet import defer, endpoints, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from relay.client import RelayError, connect
from relay.server.auth import fingerprint
from relay.server.tap import Options, RelayService, makeService
from relay.wire import ErrorCode, MessageType, encode, encode_json, loads
from tests.authkeys import (
    EC_KEY,
    ED25519_KEY,
    OTHER_RSA_KEY,
    RSA_KEY,
    SECRET,
    KeyFiles,
    claims,
    hs256_signed_with,
    mint,
    public_pem,
    unsigned,
)
from tests.support import FrameClient, _disconnect, wait_until
from tests.test_service import TWISTD, ProcessWatcher, source_env

API_KEY = "carol-api-key-0123456789abcdef"


def real_claims(**fields: Any) -> dict[str, Any]:
    """Claims valid from now, by the clock the server's reactor reads."""
    return claims(now=time.time(), **fields)


class ServiceTestCase(unittest.TestCase):
    """Starts ``twistd relay`` services in process, with real listeners."""

    timeout = 60

    def setUp(self) -> None:
        self.files = KeyFiles(self)

    def serve(self, *argv: str) -> RelayService:
        options = Options()
        options.parseOptions(list(argv))
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def tcp(self, *argv: str) -> RelayService:
        return self.serve("--port", "tcp:0:interface=127.0.0.1", *argv)

    @staticmethod
    def address(service: RelayService, index: int = 0) -> str:
        port = service.listening_ports[index].getHost().port
        return f"tcp:host=127.0.0.1:port={port}"

    async def frame_client(self, service: RelayService) -> FrameClient:
        port = service.listening_ports[0].getHost().port
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        client = await endpoints.connectProtocol(endpoint, FrameClient())
        self.addCleanup(_disconnect, client)
        return client

    async def connected(self, description: str, **options: Any) -> Any:
        client = await connect(reactor, description, **options)
        self.addCleanup(client.disconnect)
        return client

    async def refused(self, description: str, **options: Any) -> RelayError:
        failure = await self.assertFailure(connect(reactor, description, **options), RelayError)
        self.assertEqual((failure.code, failure.fatal), (ErrorCode.UNAUTHORIZED, True))
        return failure


class SecurityPropertyTests(ServiceTestCase):
    """Each forged, stale or malformed token is UNAUTHORIZED; none reaches room code."""

    async def assert_refused_before_any_room(self, service: RelayService, token: str, why: str) -> None:
        client = await self.frame_client(service)
        # The JOIN arrives in the same read: it must never be handled.
        client.send(encode_json(MessageType.HELLO, {"token": token, "id": 1})
                    + encode_json(MessageType.JOIN_ROOM, {"room": "team-a", "id": 2}))
        type_, body = await client.next_json()
        self.assertEqual((type_, body["code"], body["fatal"]), (MessageType.ERROR, "UNAUTHORIZED", True), why)
        self.assertIn(why, body["message"])
        self.assertNotIn(token[:200], body["message"])
        await client.closed
        self.assertEqual(client.frames[1:], [], why)

    async def test_every_bad_token_is_unauthorized_and_reaches_no_room(self) -> None:
        service = self.tcp("--jwt-key", self.files.public_key(RSA_KEY), "--jwt-audience", "relay",
                           "--jwt-issuer", "https://auth.example", "--jwt-leeway", "0")
        good = real_claims(aud="relay", iss="https://auth.example")
        cases = [
            (unsigned(good), "algorithm not accepted"),
            (mint(good, OTHER_RSA_KEY), "bad signature"),
            (mint(good, EC_KEY), "algorithm not accepted"),
            (hs256_signed_with(public_pem(RSA_KEY), good), "algorithm not accepted"),
            (mint({k: v for k, v in good.items() if k != "exp"}, RSA_KEY), 'no "exp" claim'),
            (mint({**good, "exp": int(time.time()) - 60}, RSA_KEY), "token expired"),
            (mint({**good, "aud": "other"}, RSA_KEY), "wrong audience"),
            (mint({**good, "iss": "https://evil.example"}, RSA_KEY), "wrong issuer"),
            ("garbage", "malformed"),
            ("x" * 1_000_000, "longer than"),
        ]
        for token, why in cases:
            await self.assert_refused_before_any_room(service, token, why)
        registry = service.factory.registry
        self.assertEqual((len(registry), registry.peak_rooms), (0, 0))
        self.assertEqual(sum(service.factory.auth.failures.values()), len(cases))
        # The same server serves the genuine token.
        client = await self.connected(self.address(service), token=mint(good, RSA_KEY))
        self.assertEqual((await client.join("team-a"))["members"], 1)

    async def test_a_hello_without_a_token_and_a_silent_client_are_unauthorized(self) -> None:
        service = self.tcp("--jwt-key", self.files.secret(), "--hello-timeout", "0.2")
        await self.refused(self.address(service))
        silent = await self.frame_client(service)
        silent.send(encode(MessageType.HEARTBEAT))
        await silent.closed
        # The echo comes first unless the deadline passed before the heartbeat
        # arrived; either way the deadline ends the connection.
        *echoes, last = silent.frames
        self.assertEqual([frame.type for frame in echoes], [MessageType.HEARTBEAT] * len(echoes))
        body = loads(last.payload)
        self.assertEqual((last.type, body["code"], body["message"]),
                         (MessageType.ERROR, "UNAUTHORIZED", "no HELLO with a token within 0.2 seconds"))


class PermissionTests(ServiceTestCase):
    """Grants over a real server: both backends, globs and {sub}."""

    def start(self) -> RelayService:
        tokens = self.files.api_keys({API_KEY: {"user": "carol", "rooms": ["team-*"], "publish": []}})
        return self.tcp("--jwt-key", self.files.secret(), "--auth-tokens", tokens)

    async def test_members_publish_where_granted_and_are_refused_elsewhere(self) -> None:
        service = self.start()
        address = self.address(service)
        alice = await self.connected(address, token=mint(real_claims(rooms=["team-*", "user.{sub}.*"])))
        carol = await self.connected(address, token=API_KEY)
        self.assertEqual((alice.user_id, carol.user_id), ("alice", "carol"))
        await alice.join("team-a")
        await carol.join("team-a")
        await alice.join("user.alice.inbox")
        for client, room in ((alice, "user.carol.inbox"), (alice, "kitchen"), (carol, "kitchen")):
            refusal = await self.assertFailure(client.join(room), RelayError)
            self.assertEqual((refusal.code, refusal.fatal), (ErrorCode.FORBIDDEN, False))
        inbox = carol.messages()
        await alice.send("team-a", "hello carol")
        self.assertEqual((await inbox.__anext__()).content, "hello carol")
        # Carol's key is read-only: her message is refused, and she stays connected.
        refused: defer.Deferred[RelayError] = defer.Deferred()
        carol.on_error = refused.callback
        await carol.send("team-a", "hello alice")
        self.assertEqual((await refused).code, ErrorCode.FORBIDDEN)
        self.assertGreater(await carol.heartbeat(), 0)
        self.assertEqual(service.factory.registry.get("team-a").seq, 1)


class TransportTests(ServiceTestCase):
    """The token travels in HELLO on every transport; mutual TLS must agree with it."""

    def setUp(self) -> None:
        super().setUp()
        self.ca = trustme.CA()
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.key = self.files.write("server.key", server.private_key_pem.bytes())
        self.cert = self.files.write("server.pem", server.cert_chain_pems[0].bytes())
        self.ca_file = self.files.write("ca.pem", self.ca.cert_pem.bytes())
        self.secret = self.files.secret()

    def client_cert(self, name: str) -> str:
        issued = self.ca.issue_cert(f"{name}.example", common_name=name)
        return self.files.write(f"{name}.pem", issued.private_key_and_cert_chain_pem.bytes())

    async def test_unix_socket(self) -> None:
        path = os.path.join(tempfile.mkdtemp(), "relay.sock")
        self.serve("--port", f"unix:{path}", "--jwt-key", self.secret)
        client = await self.connected(f"unix:path={path}", token=mint(real_claims()))
        self.assertEqual(client.user_id, "alice")
        await self.refused(f"unix:path={path}", token="forged")

    async def test_tls(self) -> None:
        service = self.serve("--port", f"ssl:0:privateKey={self.key}:certKey={self.cert}:interface=127.0.0.1",
                             "--jwt-key", self.secret)
        description = f"tls:host=127.0.0.1:port={service.listening_ports[0].getHost().port}"
        client = await self.connected(description, token=mint(real_claims()), ca_file=self.ca_file)
        self.assertEqual((await client.join("team-tls"))["members"], 1)
        await self.refused(description, ca_file=self.ca_file)

    async def test_mutual_tls_certificate_name_must_be_the_tokens_subject(self) -> None:
        service = self.serve("--port", f"ssl:0:privateKey={self.key}:certKey={self.cert}:interface=127.0.0.1",
                             "--tls-client-ca", self.ca_file, "--jwt-key", self.secret)
        description = f"tls:host=127.0.0.1:port={service.listening_ports[0].getHost().port}"
        alice = await self.connected(description, token=mint(real_claims(sub="alice")),
                                     ca_file=self.ca_file, client_cert=self.client_cert("alice"))
        self.assertEqual(alice.user_id, "alice")
        refusal = await self.refused(description, token=mint(real_claims(sub="alice")),
                                     ca_file=self.ca_file, client_cert=self.client_cert("mallory"))
        self.assertIn("client certificate", refusal.message)
        # A certificate alone is no longer enough.
        await self.refused(description, ca_file=self.ca_file, client_cert=self.client_cert("bob"))

    async def test_websocket(self) -> None:
        service = self.serve("--port", "tcp:0:interface=127.0.0.1",
                             "--websocket", "tcp:0:interface=127.0.0.1", "--jwt-key", self.secret)
        url = f"ws://127.0.0.1:{service.listening_ports[1].getHost().port}/relay"
        web = await self.connected(url, token=mint(real_claims(sub="web")))
        tcp = await self.connected(self.address(service), token=mint(real_claims(sub="tcp")))
        await web.join("team-a")
        await tcp.join("team-a")
        inbox = tcp.messages()
        await web.send("team-a", "over websocket")
        message = await inbox.__anext__()
        self.assertEqual((message.sender, message.content), ("web", "over websocket"))
        await self.refused(url, token="forged")


class AnonymousAccessTests(ServiceTestCase):
    async def test_clients_without_a_token_read_the_anonymous_rooms(self) -> None:
        service = self.tcp("--jwt-key", self.files.secret(), "--allow-anonymous",
                           "--anonymous-rooms", "public-*,news")
        address = self.address(service)
        reader = await self.connected(address)
        self.assertTrue(reader.user_id.startswith("anon-"))
        await reader.join("news")
        refusal = await self.assertFailure(reader.join("team-a"), RelayError)
        self.assertIs(refusal.code, ErrorCode.FORBIDDEN)
        writer = await self.connected(address, token=mint(real_claims(rooms=["news"])))
        await writer.join("news")
        inbox = reader.messages()
        await writer.send("news", "extra!")
        self.assertEqual((await inbox.__anext__()).content, "extra!")
        await self.refused(address, token="forged")


class KeyRotationTests(ServiceTestCase):
    async def test_a_reloaded_jwt_key_verifies_new_tokens_and_refuses_old_ones(self) -> None:
        path = self.files.public_key(RSA_KEY)
        service = self.tcp("--jwt-key", path)
        address = self.address(service)
        old = await self.connected(address, token=mint(real_claims(), RSA_KEY))
        self.files.replace(path, public_pem(ED25519_KEY))
        # What SIGHUP does (the twistd test below sends the real signal).
        service.factory.auth.reload()
        await self.refused(address, token=mint(real_claims(), RSA_KEY))
        new = await self.connected(address, token=mint(real_claims(sub="bob"), ED25519_KEY))
        self.assertEqual(new.user_id, "bob")
        self.assertGreater(await old.heartbeat(), 0)


class LogSecrecyTests(ServiceTestCase):
    """Tokens and secrets never reach the log, even with --debug: a token
    appears only as its fingerprint."""

    def capture(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    async def test_no_token_or_secret_in_any_log_event(self) -> None:
        events = self.capture()
        tokens_file = self.files.api_keys({API_KEY: {"user": "carol", "rooms": ["team-*"]}})
        service = self.tcp("--debug", "--jwt-key", self.files.secret(), "--auth-tokens", tokens_file,
                           "--jwt-leeway", "0")
        address = self.address(service)
        good = mint(real_claims())
        expired = mint(real_claims(ttl=-60))
        forged = mint(real_claims(sub="root", rooms=["*"]), b"y" * 40)
        client = await self.connected(address, token=good)
        await client.join("team-a")
        await self.assertFailure(client.join("kitchen"), RelayError)
        await client.send("team-a", "hi")
        await self.connected(address, token=API_KEY)
        for token in (expired, forged, API_KEY[:-1] + "X", "x" * 20_000):
            await self.refused(address, token=token)
        service.factory.auth.reload()
        await client.disconnect()
        await service.stopService()

        text = "\n".join(filter(None, (formatEvent(event) for event in events)))
        everything = text + "\n".join(repr(event) for event in events)
        self.assertIn("authenticated as alice", text)
        self.assertIn("authentication failed: token expired", text)
        for secret in (good, expired, forged, API_KEY, API_KEY[:-1] + "X", SECRET.decode(), "x" * 20):
            # Not assertNotIn: its message would print the whole log.
            self.assertFalse(secret in everything, f"{fingerprint(secret)} reached the log")
        # A token is named by its first characters and a hash.
        self.assertIn(good[:6] + "…#", text)
        self.assertIn("in type=HELLO", text)  # --debug traced the frames


class SighupTests(unittest.TestCase):
    """The real ``twistd relay`` re-reads its API keys on SIGHUP, keeps its
    connections, and keeps the old keys when the new file is bad."""

    timeout = 60

    def twistd(self, *argv: str) -> ProcessWatcher:
        collector = ProcessWatcher()
        process = reactor.spawnProcess(
            collector, TWISTD, [TWISTD, "-n", "--pidfile=", "relay", *argv],
            env=source_env(), path=tempfile.mkdtemp(),
        )

        def kill_if_running() -> Any:
            if process.pid is not None:
                process.signalProcess("KILL")
            return collector.ended

        self.addCleanup(kill_if_running)
        return collector

    async def hello(self, socket_path: str, token: str) -> tuple[FrameClient, dict[str, Any]]:
        endpoint = endpoints.UNIXClientEndpoint(reactor, socket_path)
        client = await endpoints.connectProtocol(endpoint, FrameClient())
        self.addCleanup(_disconnect, client)
        type_, body = await client.request(MessageType.HELLO, {"token": token})
        return client, body

    async def test_sighup_reloads_the_api_keys_without_dropping_connections(self) -> None:
        files = KeyFiles(self)
        alice_key, bob_key = "alice-key-" + "a" * 20, "bob-key-" + "b" * 20
        path = files.api_keys({alice_key: {"user": "alice", "rooms": ["*"]}})
        socket_path = os.path.join(tempfile.mkdtemp(), "relay.sock")
        server = self.twistd("--port", f"unix:{socket_path}", "--auth-tokens", path)
        await server.wait_for(b"Listening on")
        pid = server.transport.pid
        alice, body = await self.hello(socket_path, alice_key)
        self.assertEqual(body["userId"], "alice")

        files.replace(path, json.dumps({bob_key: {"user": "bob", "rooms": ["*"]}}))
        os.kill(pid, signal.SIGHUP)
        await server.wait_for(b"Reloaded API keys")
        _, body = await self.hello(socket_path, bob_key)
        self.assertEqual(body["userId"], "bob")
        _, body = await self.hello(socket_path, alice_key)
        self.assertEqual((body["code"], body["message"]), ("UNAUTHORIZED", "invalid token: unknown API key"))
        # Alice's connection was not dropped.
        alice.send(encode(MessageType.HEARTBEAT))
        self.assertEqual((await alice.next_frame()).type, MessageType.HEARTBEAT)

        files.replace(path, '{"truncated": ')
        os.kill(pid, signal.SIGHUP)
        await server.wait_for(b"Kept the previous API keys")
        _, body = await self.hello(socket_path, bob_key)
        self.assertEqual(body["userId"], "bob")

        os.kill(pid, signal.SIGTERM)
        await server.ended
        self.assertIn(b"not valid JSON", server.output)
        for secret in (alice_key, bob_key):
            self.assertNotIn(secret.encode(), server.output)
        await wait_until(lambda: not alice.connected, "the server closed alice's connection")
