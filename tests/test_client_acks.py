"""The client library's side of the ``acks`` extension: unit tests against
frames on a StringTransport, and integration tests against the real server."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from relay.client import ReconnectingClient, RelayClientProtocol, RelayError
from relay.wire import (
    Decoder,
    ErrorCode,
    Frame,
    MessageType,
    encode_error,
    encode_json,
    loads,
)
from tests.support import IntegrationTestCase


def hello_ack(request_id: int, features: list[str]) -> bytes:
    return encode_json(MessageType.HELLO, {
        "id": request_id, "status": "connected", "connectionId": "c0ffee", "userId": "alice",
        "serverVersion": "test", "heartbeatInterval": 30, "maxFrameSize": 1024,
        "features": features,
    })


def publish_ack(request_id: Any, room: str = "lobby", seq: int = 7) -> bytes:
    return encode_json(MessageType.MESSAGE,
                       {"status": "published", "room": room, "seq": seq, "id": request_id})


class AcksUnitTests(unittest.TestCase):
    def connect(self, acks: bool) -> None:
        self.client = RelayClientProtocol(task.Clock(), user="alice", acks=acks)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.errors: list[RelayError] = []
        self.client.on_error = self.errors.append

    def sent(self) -> list[Frame]:
        frames = list(Decoder(2**31 - 1).feed(self.transport.value()))
        self.transport.clear()
        return frames

    def sent_ids(self) -> list[Any]:
        return [loads(frame.payload)["id"] for frame in self.sent()]

    def ready(self, features: list[str]) -> None:
        [hello] = self.sent()
        self.hello = loads(hello.payload)
        self.client.dataReceived(hello_ack(self.hello["id"], features))
        self.assertTrue(self.client.ready.called)

    def test_a_client_asking_for_nothing_sends_no_features(self) -> None:
        self.connect(acks=False)
        [hello] = self.sent()
        self.assertNotIn("features", loads(hello.payload))

    def test_send_fires_with_the_seq_once_the_server_accepted_it(self) -> None:
        self.connect(acks=True)
        self.ready(["acks"])
        self.assertEqual(self.hello["features"], ["acks"])
        self.assertTrue(self.client.acks_enabled)
        sending = self.client.send("lobby", "hi")
        [request_id] = self.sent_ids()
        self.assertNoResult(sending)
        self.client.dataReceived(publish_ack(request_id, seq=7))
        self.assertEqual(self.successResultOf(sending), 7)

    def test_refused_send_fails_with_its_error(self) -> None:
        self.connect(acks=True)
        self.ready(["acks"])
        sending = self.client.send("kitchen", "hi")
        [request_id] = self.sent_ids()
        self.client.dataReceived(encode_error(ErrorCode.NOT_IN_ROOM, "not a member", request_id))
        failure = self.failureResultOf(sending, RelayError)
        self.assertIs(failure.value.code, ErrorCode.NOT_IN_ROOM)
        self.assertEqual(self.errors, [])

    def test_acks_not_granted_means_fired_on_write(self) -> None:
        self.connect(acks=True)
        self.ready([])
        self.assertFalse(self.client.acks_enabled)
        self.assertIsNone(self.successResultOf(self.client.send("lobby", "hi")))
        [request_id] = self.sent_ids()
        self.client.dataReceived(encode_error(ErrorCode.NOT_IN_ROOM, "not a member", request_id))
        self.assertEqual([error.request_id for error in self.errors], [request_id])

    def test_send_before_the_hello_ack_follows_what_the_server_granted(self) -> None:
        self.connect(acks=True)
        [hello] = self.sent()
        early = self.client.send("lobby", "early")
        self.client.dataReceived(hello_ack(loads(hello.payload)["id"], []))
        self.assertIsNone(self.successResultOf(early))

        self.connect(acks=True)
        [hello] = self.sent()
        early = self.client.send("lobby", "early")
        [request_id] = self.sent_ids()
        self.client.dataReceived(hello_ack(loads(hello.payload)["id"], ["acks"]))
        self.assertNoResult(early)
        self.client.dataReceived(publish_ack(request_id, seq=1))
        self.assertEqual(self.successResultOf(early), 1)

    def test_a_delivery_is_never_taken_for_an_ack(self) -> None:
        self.connect(acks=True)
        self.ready(["acks"])
        received = []
        self.client.on_message = received.append
        sending = self.client.send("lobby", "hi")
        [request_id] = self.sent_ids()
        # A delivery always has "from", whatever its other fields.
        self.client.dataReceived(encode_json(MessageType.MESSAGE, {
            "room": "lobby", "from": "bob", "content": 1, "status": "published", "id": request_id,
        }))
        self.assertEqual([message.sender for message in received], ["bob"])
        self.assertNoResult(sending)

    def test_lost_connection_fails_an_unacknowledged_send(self) -> None:
        self.connect(acks=True)
        self.ready(["acks"])
        sending = self.client.send("lobby", "hi")
        self.client.connectionLost(None)
        self.failureResultOf(sending)


class AcksIntegrationTests(IntegrationTestCase):
    async def reconnecting(self, **options: Any) -> ReconnectingClient:
        client = ReconnectingClient(
            reactor, f"tcp:host=127.0.0.1:port={self.port.getHost().port}",
            retry_policy=lambda attempt: 0.05, **options,
        )
        client.start()
        self.addCleanup(client.stop)
        return client

    async def test_sends_fire_with_consecutive_seqs(self) -> None:
        client = await self.reconnecting(user="alice", acks=True)
        await client.join("lobby")
        self.assertEqual([await client.send("lobby", n) for n in range(3)], [1, 2, 3])
        self.assertTrue(client.client.acks_enabled)

    async def test_refusal_fails_the_send(self) -> None:
        client = await self.reconnecting(acks=True)
        failure = await self.assertFailure(client.send("nowhere", "hi"), RelayError)
        self.assertIs(failure.code, ErrorCode.NOT_IN_ROOM)

    async def test_without_acks_send_fires_before_any_answer(self) -> None:
        client = await self.reconnecting()
        await client.join("lobby")
        self.assertIsNone(await client.send("lobby", "hi"))
        self.assertEqual(client.client.features, [])
