"""The server's side of the ``acks`` extension, over real loopback sockets with
raw frames: negotiated in HELLO, invisible to a client that did not ask."""

from __future__ import annotations

from typing import Any

from relay import __version__
from relay.wire import Flags, MessageType, encode_binary_message, encode_json, loads
from tests.support import FrameClient, IntegrationTestCase

HEARTBEAT = (MessageType.HEARTBEAT, Flags.NONE, b"")


class AcksTests(IntegrationTestCase):
    async def member(self, user: str, room: str = "lobby", **hello: Any) -> FrameClient:
        client = await self.connect()
        await client.hello(userId=user, **hello)
        await client.join(room)
        return client

    async def next_after_barrier(self, client: FrameClient) -> list[tuple[int, Any]]:
        """Every frame the server sends before the echo of a heartbeat sent now."""
        client.send_frame(*HEARTBEAT)
        frames = []
        while True:
            frame = await client.next_frame()
            if frame.type == MessageType.HEARTBEAT:
                return frames
            frames.append((frame.type, loads(frame.payload) if frame.is_json else frame.payload))

    async def test_hello_ack_bytes_are_unchanged_for_a_client_asking_nothing(self) -> None:
        client = await self.connect()
        client.send_json(MessageType.HELLO, {"userId": "legacy", "id": 1})
        frame = await client.next_frame()
        connection_id = loads(frame.payload)["connectionId"]
        self.assertEqual(
            frame.payload,
            b'{"status":"connected","connectionId":"%s","userId":"legacy","serverVersion":"%s",'
            b'"heartbeatInterval":30,"maxFrameSize":1048576,"features":[],"id":1}'
            % (connection_id.encode(), __version__.encode()),
        )

    async def test_only_supported_features_asked_for_are_enabled(self) -> None:
        for asked, enabled in (([], []), (["compression", "bogus"], ["compression"]), (["bogus"], []),
                               (["bogus", "acks", "acks"], ["acks"])):
            client = await self.connect()
            ack = await client.hello(features=asked)
            self.assertEqual(ack["features"], enabled, asked)

    async def test_accepted_message_is_acked_to_the_sender_only(self) -> None:
        alice = await self.member("alice", features=["acks"])
        bob = await self.member("bob", features=["acks"])
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "hi", "id": "m-1"})
        ack = await alice.next_frame()
        self.assertEqual((ack.type, ack.flags), (MessageType.MESSAGE, Flags.JSON))
        self.assertEqual(ack.payload, b'{"status":"published","room":"lobby","seq":1,"id":"m-1"}')
        [(kind, delivery)] = await self.next_after_barrier(bob)
        self.assertEqual((kind, delivery["from"], delivery["seq"]), (MessageType.MESSAGE, "alice", 1))
        self.assertNotIn("status", delivery)

    async def test_ack_carries_the_trimmed_room_and_its_seq(self) -> None:
        alice = await self.member("alice", features=["acks"])
        for number in (1, 2):
            alice.send_json(MessageType.MESSAGE, {"room": " lobby ", "content": number, "id": number})
        self.assertEqual(await self.next_after_barrier(alice), [
            (MessageType.MESSAGE, {"status": "published", "room": "lobby", "seq": 1, "id": 1}),
            (MessageType.MESSAGE, {"status": "published", "room": "lobby", "seq": 2, "id": 2}),
        ])

    async def test_refused_message_gets_its_error_and_no_ack(self) -> None:
        alice = await self.member("alice", features=["acks"])
        alice.send_json(MessageType.MESSAGE, {"room": "kitchen", "content": "hi", "id": 9})
        [(kind, body)] = await self.next_after_barrier(alice)
        self.assertEqual((kind, body["code"], body["id"]), (MessageType.ERROR, "NOT_IN_ROOM", 9))

    async def test_no_ack_without_an_id_or_for_binary(self) -> None:
        alice = await self.member("alice", features=["acks"])
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "no id"})
        alice.send_frame(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("lobby", b"\x01"))
        self.assertEqual(await self.next_after_barrier(alice), [])

    async def test_no_ack_for_a_client_that_did_not_ask(self) -> None:
        alice = await self.member("alice")
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "hi", "id": 4})
        self.assertEqual(await self.next_after_barrier(alice), [])

    async def test_ack_is_queued_in_order_with_the_senders_other_frames(self) -> None:
        alice = await self.member("alice", echo=True, features=["acks"])
        alice.send(
            encode_json(MessageType.MESSAGE, {"room": "lobby", "content": "one", "id": 1})
            + encode_json(MessageType.JOIN_ROOM, {"room": "side", "id": 2})
            + encode_json(MessageType.MESSAGE, {"room": "side", "content": "two", "id": 3})
        )
        frames = await self.next_after_barrier(alice)
        summary = [(kind, body.get("status"), body.get("id"), body.get("content")) for kind, body in frames]
        self.assertEqual(summary, [
            (MessageType.MESSAGE, None, None, "one"),  # the echo, then its ack
            (MessageType.MESSAGE, "published", 1, None),
            (MessageType.JOIN_ROOM, "joined", 2, None),
            (MessageType.MESSAGE, None, None, "two"),
            (MessageType.MESSAGE, "published", 3, None),
        ])
