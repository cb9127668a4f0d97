"""One authenticated connection on a StringTransport, its time on a task.Clock.

The hello deadline and token expiry are timers on the reactor's clock; the
grant is consulted at HELLO and at each join, never per message.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task
from twisted.trial import unittest

from relay.server.auth import ApiKeyFile, Authenticator, Grant, JwtVerifier
from relay.server.factory import RelayConfig, RelayFactory
from relay.wire import ErrorCode, Flags, MessageType, encode, encode_binary_message, encode_json
from tests.authkeys import KeyFiles, claims, mint
from tests.support import StringConnection

NOW = 1_000_000.0
API_KEY = "carol-key-0123456789abcdef"


class CountingGrant:
    """Wraps a grant and counts how often the connection consults it."""

    def __init__(self, grant: Grant) -> None:
        self.grant = grant
        self.user_id = grant.user_id
        self.calls = 0

    def may_join(self, room: str) -> bool:
        self.calls += 1
        return self.grant.may_join(room)

    def may_publish(self, room: str) -> bool:
        self.calls += 1
        return self.grant.may_publish(room)


class AuthProtocolTestCase(unittest.TestCase):
    leeway = 0.0
    anonymous_rooms: list[str] | None = None
    hello_timeout = 10.0

    def setUp(self) -> None:
        files = KeyFiles(self)
        self.clock = task.Clock()
        self.clock.advance(NOW)
        authenticator = Authenticator(
            ApiKeyFile(files.api_keys({API_KEY: {"user": "carol", "rooms": ["lobby"]}})),
            JwtVerifier(files.secret(), leeway=self.leeway),
            anonymous_rooms=self.anonymous_rooms,
        )
        self.factory = RelayFactory(RelayConfig(hello_timeout=self.hello_timeout), reactor=self.clock,
                                    auth=authenticator)

    def connect(self) -> StringConnection:
        return StringConnection(self.factory)

    def token(self, **fields: Any) -> str:
        return mint(claims(now=self.clock.seconds(), **fields))

    def hello(self, connection: StringConnection, **fields: Any) -> tuple[int, Any]:
        connection.send_json(MessageType.HELLO, {"id": 1, **fields})
        return connection.only_reply()

    def authenticated(self, **token_fields: Any) -> StringConnection:
        connection = self.connect()
        type_, body = self.hello(connection, token=self.token(**token_fields))
        self.assertEqual((type_, body["status"]), (MessageType.HELLO, "connected"), body)
        return connection

    def assert_closed_with(self, connection: StringConnection, code: ErrorCode,
                           message: str | None = None) -> None:
        type_, body = connection.only_reply()
        self.assertEqual((type_, body["code"], body["fatal"]), (MessageType.ERROR, code.value, True), body)
        if message is not None:
            self.assertEqual(body["message"], message)
        self.assertTrue(connection.closing)


class HelloDeadlineTests(AuthProtocolTestCase):
    def test_no_hello_within_the_deadline_is_unauthorized(self) -> None:
        connection = self.connect()
        self.clock.advance(9.9)
        self.assertEqual(connection.replies(), [])
        self.clock.advance(0.1)
        self.assert_closed_with(connection, ErrorCode.UNAUTHORIZED, "no HELLO with a token within 10 seconds")
        self.assertEqual(self.factory.auth.failures, {"no HELLO with a token within 10 seconds": 1})

    def test_heartbeats_before_hello_are_echoed_but_do_not_extend_the_deadline(self) -> None:
        connection = self.connect()
        for _ in range(9):
            connection.send(encode(MessageType.HEARTBEAT))
            self.clock.advance(1)
        self.assertEqual([t for t, _ in connection.replies()], [MessageType.HEARTBEAT] * 9)
        self.clock.advance(1)
        self.assert_closed_with(connection, ErrorCode.UNAUTHORIZED)

    def test_a_hello_with_a_token_in_time_ends_the_deadline(self) -> None:
        connection = self.connect()
        self.clock.advance(9)
        self.hello(connection, token=self.token())
        self.clock.advance(30)
        self.assertEqual(connection.replies(), [])
        self.assertFalse(connection.closing)

    def test_a_refused_hello_request_leaves_the_deadline_running(self) -> None:
        connection = self.connect()
        type_, body = self.hello(connection, token=self.token(), echo="yes")
        self.assertEqual((body["code"], body["fatal"]), ("BAD_REQUEST", False))
        self.clock.advance(10)
        self.assert_closed_with(connection, ErrorCode.UNAUTHORIZED)

    def test_every_other_first_frame_is_unauthorized_and_nothing_after_it_is_handled(self) -> None:
        for first in (
            encode_json(MessageType.JOIN_ROOM, {"room": "team-a"}),
            encode_json(MessageType.LEAVE_ROOM, {"room": "team-a"}),
            encode_json(MessageType.MESSAGE, {"room": "team-a", "content": 1}),
            encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("team-a", b"x")),
            encode_json(MessageType.ERROR, {"code": "X"}),
        ):
            connection = self.connect()
            later = encode_json(MessageType.HELLO, {"token": self.token()})
            connection.send(first + later + encode_json(MessageType.JOIN_ROOM, {"room": "team-b"}))
            self.assert_closed_with(connection, ErrorCode.UNAUTHORIZED)
        self.assertEqual(self.factory.registry.peak_rooms, 0)
        self.assertEqual(sum(self.factory.auth.failures.values()), 5)

    def test_no_deadline_when_the_timeout_is_zero(self) -> None:
        self.factory = RelayFactory(RelayConfig(hello_timeout=0), reactor=self.clock, auth=self.factory.auth)
        connection = self.connect()
        self.clock.advance(59)
        self.assertFalse(connection.closing)


class HelloTests(AuthProtocolTestCase):
    def test_the_token_decides_the_user_id(self) -> None:
        connection = self.connect()
        _, body = self.hello(connection, token=self.token(sub="alice"))
        self.assertEqual(body["userId"], "alice")
        _, body = self.hello(self.connect(), token=API_KEY)
        self.assertEqual(body["userId"], "carol")

    def test_the_same_user_id_may_be_repeated(self) -> None:
        _, body = self.hello(self.connect(), token=self.token(), userId="alice")
        self.assertEqual(body["userId"], "alice")

    def test_another_user_id_is_a_bad_request_and_hello_may_be_sent_again(self) -> None:
        connection = self.connect()
        type_, body = self.hello(connection, token=self.token(), userId="mallory")
        self.assertEqual((type_, body["code"], body["fatal"], body["id"]),
                         (MessageType.ERROR, "BAD_REQUEST", False, 1))
        self.assertIn("'alice'", body["message"])
        _, body = self.hello(connection, token=self.token())
        self.assertEqual(body["userId"], "alice")

    def test_a_refused_token_is_fatal_and_reaches_no_room_code(self) -> None:
        connection = self.connect()
        connection.send(
            encode_json(MessageType.HELLO, {"token": mint(claims(now=NOW - 7200))})
            + encode_json(MessageType.JOIN_ROOM, {"room": "team-a"})
        )
        self.assert_closed_with(connection, ErrorCode.UNAUTHORIZED, "token expired")
        self.assertEqual((len(self.factory.registry), self.factory.registry.peak_rooms), (0, 0))

    def test_a_hello_without_a_token_is_unauthorized(self) -> None:
        connection = self.connect()
        connection.send_json(MessageType.HELLO, {"userId": "alice"})
        self.assert_closed_with(connection, ErrorCode.UNAUTHORIZED)

    def test_the_certificate_name_must_be_the_tokens_subject(self) -> None:
        connection = self.connect()
        connection.protocol.certified_user_id = connection.protocol.user_id = "mallory"
        connection.send_json(MessageType.HELLO, {"token": self.token(sub="alice")})
        self.assert_closed_with(connection, ErrorCode.UNAUTHORIZED)
        certified = self.connect()
        certified.protocol.certified_user_id = certified.protocol.user_id = "alice"
        _, body = self.hello(certified, token=self.token(sub="alice"))
        self.assertEqual(body["userId"], "alice")

    def test_hello_is_still_accepted_once(self) -> None:
        connection = self.authenticated()
        _, body = self.hello(connection, token=self.token(sub="bob"))
        self.assertEqual((body["code"], body["fatal"]), ("BAD_REQUEST", False))
        self.assertEqual(connection.protocol.user_id, "alice")


class GrantTests(AuthProtocolTestCase):
    def join(self, connection: StringConnection, room: str) -> dict[str, Any]:
        connection.send_json(MessageType.JOIN_ROOM, {"room": room, "id": room})
        return connection.only_reply()[1]

    def test_a_join_outside_the_grant_is_forbidden_and_the_connection_carries_on(self) -> None:
        connection = self.authenticated(rooms=["team-*", "user.{sub}.*"])
        forbidden = self.join(connection, "kitchen")
        self.assertEqual((forbidden["code"], forbidden["fatal"], forbidden["id"]),
                         ("FORBIDDEN", False, "kitchen"))
        self.assertEqual(self.join(connection, " team-a ")["status"], "joined")
        self.assertEqual(self.join(connection, "user.alice.inbox")["status"], "joined")
        self.assertEqual(self.join(connection, "user.bob.inbox")["code"], "FORBIDDEN")
        connection.send(encode(MessageType.HEARTBEAT))
        self.assertEqual(connection.replies(), [(MessageType.HEARTBEAT, b"")])
        self.assertNotIn("kitchen", self.factory.registry)

    def test_a_publish_outside_the_publish_grant_is_forbidden(self) -> None:
        alice = self.authenticated(rooms=["team-*"], publish=["team-ops"])
        bob = self.authenticated(sub="bob")
        for room in ("team-a", "team-ops"):
            self.join(alice, room)
            self.join(bob, room)
        alice.send_json(MessageType.MESSAGE, {"room": "team-a", "content": "no", "id": 7})
        alice.send(encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("team-a", b"no")))
        alice.send_json(MessageType.MESSAGE, {"room": " team-a", "content": "no"})
        refusals = alice.replies()
        self.assertEqual([(b["code"], b["fatal"], b.get("id")) for _, b in refusals],
                         [("FORBIDDEN", False, 7), ("FORBIDDEN", False, None), ("FORBIDDEN", False, None)])
        self.assertEqual(bob.contents(), [])
        alice.send_json(MessageType.MESSAGE, {"room": "team-ops", "content": "yes"})
        self.assertEqual(bob.contents(), ["yes"])
        self.assertEqual(self.factory.registry.get("team-a").seq, 0)

    def test_the_grant_is_consulted_per_join_not_per_message(self) -> None:
        alice = self.authenticated()
        bob = self.authenticated(sub="bob")
        counting = alice.protocol.grant = CountingGrant(alice.protocol.grant)
        self.join(alice, "team-a")
        self.join(bob, "team-a")
        consulted = counting.calls
        self.assertGreater(consulted, 0)
        for number in range(100):
            alice.send_json(MessageType.MESSAGE, {"room": "team-a", "content": number})
        alice.send(encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("team-a", b"x")))
        self.assertEqual(len(bob.received()), 101)
        self.assertEqual(counting.calls, consulted)

    def test_leaving_drops_the_publish_permission_with_the_membership(self) -> None:
        alice = self.authenticated()
        self.join(alice, "team-a")
        alice.send_json(MessageType.LEAVE_ROOM, {"room": "team-a"})
        alice.received()
        alice.send_json(MessageType.MESSAGE, {"room": "team-a", "content": "gone"})
        self.assertEqual(alice.only_reply()[1]["code"], "NOT_IN_ROOM")


class ExpiryTests(AuthProtocolTestCase):
    def test_the_connection_is_closed_at_exp(self) -> None:
        connection = self.authenticated(ttl=40)
        self.clock.advance(39.9)
        self.assertFalse(connection.closing)
        self.clock.advance(0.1)
        self.assert_closed_with(connection, ErrorCode.UNAUTHORIZED, "token expired")

    def test_one_timer_per_connection_and_none_after_it_closes(self) -> None:
        connection = self.connect()
        # The idle timer and the hello deadline.
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.hello(connection, token=self.token(ttl=60))
        # The idle timer and the expiry: the deadline is gone.
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        connection.protocol.connectionLost()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_api_key_does_not_expire(self) -> None:
        connection = self.connect()
        self.hello(connection, token=API_KEY)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the idle timer alone
        self.clock.advance(86400 * 365)
        self.assertEqual(connection.only_reply()[1]["code"], "HEARTBEAT_TIMEOUT")


class LeewayExpiryTests(AuthProtocolTestCase):
    leeway = 30.0

    def test_the_connection_is_closed_at_exp_plus_the_leeway(self) -> None:
        connection = self.authenticated(ttl=20)
        self.clock.advance(49.9)
        self.assertFalse(connection.closing)
        self.clock.advance(0.1)
        self.assert_closed_with(connection, ErrorCode.UNAUTHORIZED, "token expired")

    def test_a_token_past_exp_but_within_the_leeway_gets_the_rest_of_it(self) -> None:
        connection = self.authenticated(ttl=-10)
        self.clock.advance(19.9)
        self.assertFalse(connection.closing)
        self.clock.advance(0.1)
        self.assert_closed_with(connection, ErrorCode.UNAUTHORIZED, "token expired")


class AnonymousTests(AuthProtocolTestCase):
    anonymous_rooms = ["public-*"]

    def test_a_hello_without_a_token_may_read_the_anonymous_rooms(self) -> None:
        reader = self.connect()
        _, body = self.hello(reader)
        self.assertEqual(body["userId"], f"anon-{reader.protocol.connection_id}")
        reader.send_json(MessageType.JOIN_ROOM, {"room": "public-news"})
        reader.send_json(MessageType.JOIN_ROOM, {"room": "team-a"})
        reader.send_json(MessageType.MESSAGE, {"room": "public-news", "content": "hi"})
        self.assertEqual([b.get("status", b.get("code")) for _, b in reader.replies()],
                         ["joined", "FORBIDDEN", "FORBIDDEN"])
        writer = self.authenticated(rooms=["public-*"])
        writer.send_json(MessageType.JOIN_ROOM, {"room": "public-news"})
        writer.send_json(MessageType.MESSAGE, {"room": "public-news", "content": "news"})
        self.assertEqual(reader.contents(), ["news"])

    def test_an_anonymous_client_cannot_name_itself(self) -> None:
        _, body = self.hello(self.connect(), userId="alice")
        self.assertEqual((body["code"], body["fatal"]), ("BAD_REQUEST", False))

    def test_the_first_frame_must_still_be_a_hello(self) -> None:
        connection = self.connect()
        connection.send_json(MessageType.JOIN_ROOM, {"room": "public-news"})
        self.assert_closed_with(connection, ErrorCode.UNAUTHORIZED)
        late = self.connect()
        self.clock.advance(10)
        self.assert_closed_with(late, ErrorCode.UNAUTHORIZED, "no HELLO within 10 seconds")

    def test_a_bad_token_is_still_refused(self) -> None:
        connection = self.connect()
        connection.send_json(MessageType.HELLO, {"token": "forged"})
        self.assert_closed_with(connection, ErrorCode.UNAUTHORIZED)
