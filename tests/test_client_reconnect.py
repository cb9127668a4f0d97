"""ReconnectingClient: which failures end it, and requests made at any moment."""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, endpoints, error, reactor
from twisted.python.failure import Failure
from twisted.trial import unittest

from relay.client import ReconnectingClient, RelayError
from relay.client.protocol import connection_lost
from relay.client.reconnect import is_terminal
from relay.server.factory import RelayFactory
from relay.wire import ErrorCode, ProtocolError
from tests.support import IntegrationTestCase


def lost_over(problem: Exception) -> Failure:
    """A failed attempt as the library reports it: ConnectionLost keeping the cause."""
    return Failure(connection_lost(Failure(problem)))


class TerminalClassificationTests(unittest.TestCase):
    def test_credentials_and_stream_violations_are_terminal(self) -> None:
        for code in (ErrorCode.UNAUTHORIZED, ErrorCode.INVALID_FRAME, ErrorCode.PARSE_ERROR,
                     ErrorCode.UNSUPPORTED_VERSION, ErrorCode.UNKNOWN_MESSAGE_TYPE,
                     ErrorCode.FRAME_TOO_LARGE):
            self.assertTrue(is_terminal(Failure(RelayError(code, "no", fatal=True))), code)

    def test_operational_errors_are_retried(self) -> None:
        for code in (ErrorCode.SERVER_SHUTDOWN, ErrorCode.HEARTBEAT_TIMEOUT,
                     ErrorCode.SLOW_CONSUMER, ErrorCode.TOO_MANY_CONNECTIONS):
            self.assertFalse(is_terminal(Failure(RelayError(code, "later", fatal=True))), code)

    def test_untrusted_or_mismatched_certificates_are_terminal(self) -> None:
        unverified = SSL.Error([("SSL routines", "", "certificate verify failed")])
        refused = SSL.Error([("SSL routines", "", "tlsv13 alert certificate required")])
        self.assertTrue(is_terminal(lost_over(unverified)))
        self.assertTrue(is_terminal(lost_over(refused)))
        self.assertTrue(is_terminal(lost_over(VerificationError(errors=[]))))

    def test_network_trouble_is_retried(self) -> None:
        self.assertFalse(is_terminal(Failure(error.ConnectionRefusedError())))
        self.assertFalse(is_terminal(lost_over(error.ConnectionDone())))
        self.assertFalse(is_terminal(lost_over(SSL.Error([("SSL routines", "", "unexpected eof")]))))
        self.assertFalse(is_terminal(None))

    def test_a_peer_that_does_not_speak_relay_is_terminal(self) -> None:
        self.assertTrue(is_terminal(Failure(ProtocolError(ErrorCode.FRAME_TOO_LARGE, "HTTP?"))))


class RequestTimingTests(IntegrationTestCase):
    def reconnecting(self) -> ReconnectingClient:
        client = ReconnectingClient(
            reactor, f"tcp:host=127.0.0.1:port={self.port.getHost().port}",
            retry_policy=lambda attempt: 0.05,
        )
        self.addCleanup(client.stop)
        return client

    async def test_request_from_a_callback_of_stop_fails_cleanly(self) -> None:
        # stop() fires while ClientService is still changing state: a request
        # made then must not reach into it.
        client = self.reconnecting()
        connected: defer.Deferred[Any] = defer.Deferred()
        client.on_connected = connected.callback
        client.start()
        await connected
        await client.heartbeat()  # ClientService holds the connection by now
        late: list[defer.Deferred[Any]] = []
        await client.stop().addCallback(lambda _: late.append(client.heartbeat()))
        self.failureResultOf(late[0], defer.CancelledError)

    async def test_request_from_on_disconnected_waits_for_the_next_connection(self) -> None:
        client = self.reconnecting()
        connected: defer.Deferred[Any] = defer.Deferred()
        client.on_connected = lambda connection: connected.called or connected.callback(None)
        disconnected: defer.Deferred[list[Any]] = defer.Deferred()
        client.on_disconnected = (
            lambda reason: disconnected.called or disconnected.callback([client.join("after")])
        )
        client.start()
        await connected
        port_number = self.port.getHost().port
        await self.port.stopListening()
        await self.factory.shutdown()
        [joining] = await disconnected
        factory = RelayFactory(reactor=reactor)
        port = await endpoints.TCP4ServerEndpoint(
            reactor, port_number, interface="127.0.0.1"
        ).listen(factory)
        self.addCleanup(factory.wait_closed)
        self.addCleanup(port.stopListening)
        self.addCleanup(client.stop)
        self.assertEqual((await joining)["room"], "after")

    async def test_requests_after_stop_fail_at_once(self) -> None:
        client = self.reconnecting()
        await client.stop()
        self.failureResultOf(client.join("late"), defer.CancelledError)
        self.failureResultOf(client.when_connected(), defer.CancelledError)
