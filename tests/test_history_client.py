"""The client side of history: positions, re-join with since, on_recovered, relay-client."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor

from relay.client import ReconnectingClient
from relay.wire import MessageType
from tests.support import IntegrationTestCase, wait_until
from tests.test_cli import CLITestCase


class RecoveryTestsMixin:
    async def cut_off(self: Any, user: str) -> None:
        """Abort the server side of ``user``'s connection and wait until it is gone."""
        (connection,) = [c for c in self.factory.connections if c.user_id == user]
        connection.transport.abortConnection()
        await wait_until(lambda: connection not in self.factory.connections, f"{user} gone")

    async def publisher(self: Any) -> Any:
        publisher = await self.connect()
        await publisher.hello(userId="pub")
        await publisher.join("lobby")
        return publisher

    async def publish(self: Any, publisher: Any, *contents: Any) -> None:
        for content in contents:
            publisher.send_json(MessageType.MESSAGE, {"room": "lobby", "content": content})
        publisher.send_json(MessageType.HEARTBEAT, None)
        await publisher.next_frame()  # all handled by the server


class ReconnectingRecoveryTests(RecoveryTestsMixin, IntegrationTestCase):
    server_config = {"history": 3}

    async def start_alice(self) -> tuple[ReconnectingClient, list[Any], list[tuple[str, bool, int]]]:
        client = ReconnectingClient(
            reactor, f"tcp:host=127.0.0.1:port={self.port.getHost().port}", user="alice",
            history=True, retry_policy=lambda attempt: 0.05,
        )
        self.addCleanup(client.stop)
        received: list[Any] = []
        recoveries: list[tuple[str, bool, int]] = []
        client.on_message = received.append
        client.on_recovered = lambda *outcome: recoveries.append(outcome)
        client.start()
        await client.join("lobby")
        return client, received, recoveries

    async def test_a_reconnection_replays_what_was_missed_once_and_in_order(self) -> None:
        client, received, recoveries = await self.start_alice()
        publisher = await self.publisher()
        await self.publish(publisher, 1)
        await wait_until(lambda: len(received) == 1, "the first message")
        self.assertEqual(client.positions["lobby"][0], 1)
        reconnected: defer.Deferred[Any] = defer.Deferred()
        client.on_connected = lambda connection: reconnected.called or reconnected.callback(None)
        await self.cut_off("alice")
        await self.publish(publisher, 2, 3)
        await reconnected
        await wait_until(lambda: recoveries, "the recovery")
        self.assertEqual(recoveries, [("lobby", True, 2)])
        await self.publish(publisher, 4)
        await wait_until(lambda: len(received) == 4, "the live message after the replay")
        self.assertEqual([(m.content, m.seq, m.replayed) for m in received],
                         [(1, 1, False), (2, 2, True), (3, 3, True), (4, 4, False)])
        self.assertEqual(client.positions["lobby"][0], 4)

    async def test_missing_more_than_the_room_keeps_is_reported_as_not_recovered(self) -> None:
        client, received, recoveries = await self.start_alice()
        publisher = await self.publisher()
        await self.publish(publisher, 1)
        await wait_until(lambda: len(received) == 1, "the first message")
        await self.cut_off("alice")
        await self.publish(publisher, 2, 3, 4, 5, 6)
        await wait_until(lambda: recoveries, "the recovery")
        self.assertEqual(recoveries, [("lobby", False, 3)])
        self.assertEqual([m.content for m in received], [1, 4, 5, 6])

    async def test_a_replayed_message_seen_already_is_not_delivered_twice(self) -> None:
        client, received, _ = await self.start_alice()
        publisher = await self.publisher()
        await self.publish(publisher, 1, 2)
        await wait_until(lambda: len(received) == 2, "the messages")
        connection = await client.when_connected()
        # An older position than the client's own: the server replays 2 again.
        await connection.join("lobby", since=(1, client.positions["lobby"][1]))
        await self.publish(publisher, 3)
        await wait_until(lambda: len(received) == 3, "the next message")
        self.assertEqual([m.content for m in received], [1, 2, 3])


class CLIRecoveryTests(RecoveryTestsMixin, CLITestCase):
    server_config = {"history": 2}

    async def test_the_cli_says_how_many_missed_messages_it_recovered(self) -> None:
        bob = await self.user("bob")
        bob.type("join lobby")
        await bob.wait_for(r"^\* joined lobby")
        publisher = await self.publisher()
        await self.cut_off("bob")
        await self.publish(publisher, "one", "two")
        await bob.wait_for(r"^\* recovered 2 missed messages in lobby$")
        await bob.wait_for(r"pub: two$")
        await self.cut_off("bob")
        await self.publish(publisher, "three", "four", "five")
        await bob.wait_for(r"^\* could not recover lobby: history lost$")
