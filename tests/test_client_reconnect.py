"""ReconnectingClient: requests made at any moment, even while it stops."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, endpoints, reactor

from relay.client import ReconnectingClient
from relay.server.factory import RelayFactory
from tests.support import IntegrationTestCase


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
