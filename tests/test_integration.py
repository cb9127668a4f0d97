"""The server over real loopback TCP sockets."""

from __future__ import annotations

import socket
import struct

from twisted.internet import defer, reactor, task

from relay.server.protocol import State
from relay.wire import Flags, MessageType, encode, encode_json, loads
from tests.support import FrameClient, IntegrationTestCase, wait_until


class FanOutTests(IntegrationTestCase):
    async def three_in_a_room(self, **alice_hello) -> list[FrameClient]:
        clients = [await self.connect() for _ in range(3)]
        for name, client in zip(("alice", "bob", "carol"), clients):
            hello = dict(alice_hello) if name == "alice" else {}
            await client.hello(userId=name, **hello)
            await client.join("room")
        return clients

    async def test_broadcast_reaches_the_others_but_not_the_sender(self) -> None:
        alice, bob, carol = await self.three_in_a_room()
        alice.send_json(MessageType.MESSAGE, {"room": "room", "content": "hello"})
        for member in (bob, carol):
            type_, body = await member.next_json()
            self.assertEqual(type_, MessageType.MESSAGE)
            self.assertEqual((body["from"], body["content"]), ("alice", "hello"))
        # The sender's next frame is its heartbeat echo, not its own message.
        alice.send_frame(MessageType.HEARTBEAT)
        self.assertEqual((await alice.next_frame()).type, MessageType.HEARTBEAT)

    async def test_echo_delivers_to_the_sender_too(self) -> None:
        alice, bob, carol = await self.three_in_a_room(echo=True)
        alice.send_json(MessageType.MESSAGE, {"room": "room", "content": 7})
        for member in (alice, bob, carol):
            self.assertEqual((await member.next_json())[1]["content"], 7)

    async def test_two_hundred_messages_arrive_in_order(self) -> None:
        alice, bob, carol = await self.three_in_a_room()
        for n in range(200):
            alice.send_json(MessageType.MESSAGE, {"room": "room", "content": n})
        for member in (bob, carol):
            received = [(await member.next_json())[1]["content"] for _ in range(200)]
            self.assertEqual(received, list(range(200)))

    async def test_binary_messages_cross_intact(self) -> None:
        alice, bob, _ = await self.three_in_a_room()
        data = bytes(range(256)) * 40
        room = b"room"
        alice.send_frame(
            MessageType.MESSAGE, Flags.BINARY, struct.pack("!H", len(room)) + room + data
        )
        frame = await bob.next_frame()
        self.assertEqual(frame.flags, Flags.BINARY)
        self.assertEqual(frame.payload, b"\x00\x04room\x00\x05alice" + data)


class FramingTests(IntegrationTestCase):
    async def test_hello_sent_byte_by_byte_is_answered(self) -> None:
        client = await self.connect()
        data = encode_json(MessageType.HELLO, {"userId": "slow", "id": 1})
        for i in range(len(data)):
            client.send(data[i : i + 1])
            # Give the server a chance to read each byte on its own.
            await deferLater(0)
        type_, body = await client.next_json()
        self.assertEqual((type_, body["userId"], body["id"]), (MessageType.HELLO, "slow", 1))

    async def test_three_coalesced_frames_are_all_answered(self) -> None:
        client = await self.connect()
        client.send(
            encode_json(MessageType.HELLO, {"userId": "u", "id": 1})
            + encode_json(MessageType.JOIN_ROOM, {"room": "r", "id": 2})
            + encode(MessageType.HEARTBEAT, Flags.BINARY, b"x")
        )
        replies = [await client.next_frame() for _ in range(3)]
        self.assertEqual(
            [f.type for f in replies],
            [MessageType.HELLO, MessageType.JOIN_ROOM, MessageType.HEARTBEAT],
        )
        self.assertEqual(loads(replies[1].payload)["id"], 2)
        self.assertEqual(replies[2].payload, b"x")

    async def test_fatal_error_is_delivered_then_the_connection_closes(self) -> None:
        client = await self.connect()
        client.send(struct.pack("!IBBB", 3, 9, 5, 0) + encode(MessageType.HEARTBEAT))
        type_, body = await client.next_json()
        self.assertEqual((type_, body["code"], body["fatal"]), (6, "UNSUPPORTED_VERSION", True))
        await client.closed
        self.assertEqual(len(client.frames), 1)


class SlowConsumerTests(IntegrationTestCase):
    MAX_PENDING = 256 * 1024
    server_config = {"max_pending": MAX_PENDING}

    async def test_reader_that_never_reads_is_cut_off_alone(self) -> None:
        publisher = await self.connect()
        fast = await self.connect()
        slow = await self.connect()
        for client in (publisher, fast, slow):
            await client.join("busy")
        server_slow = self.server_side(slow)
        # Small kernel buffers on the slow path, so the server's own queue
        # fills after a few rounds instead of the kernel's.
        slow.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server_slow.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        slow.transport.pauseProducing()  # it stops reading from its socket
        # Each round fans out ~41 KB, well below the pending limit, and waits
        # for the fast member to read it all: it can never be cut off.
        message = encode_json(MessageType.MESSAGE, {"room": "busy", "content": "x" * 4096})
        batch = 10
        for rounds in range(1, 500):
            publisher.send(message * batch)
            for _ in range(batch):
                await fast.next_frame()
            for connection in self.factory.connections:
                # Server memory stays bounded by the pending limit.
                self.assertLessEqual(connection.queued_bytes, self.MAX_PENDING + len(message))
            if server_slow.state is State.CLOSED:
                break
        self.assertIs(server_slow.state, State.CLOSED)
        # It took more than one round: the limit, not a single burst, cut it off.
        self.assertGreater(rounds * batch * len(message), self.MAX_PENDING)
        self.assertEqual(len(self.factory.registry.get("busy")), 2)
        # The publisher and the fast member are still served.
        publisher.send_json(MessageType.MESSAGE, {"room": "busy", "content": "after"})
        self.assertEqual((await fast.next_json())[1]["content"], "after")
        publisher.send_frame(MessageType.HEARTBEAT)
        self.assertEqual((await publisher.next_frame()).type, MessageType.HEARTBEAT)

    def server_side(self, client: FrameClient):
        local = client.transport.getHost()
        for connection in self.factory.connections:
            if connection.transport.getPeer().port == local.port:
                return connection
        raise AssertionError("no server-side connection for this client")


class AbruptDisconnectTests(IntegrationTestCase):
    async def test_twenty_resets_leave_consistent_member_counts(self) -> None:
        stayer = await self.connect()
        await stayer.join("r")
        leavers = [await self.connect() for _ in range(20)]
        for n, client in enumerate(leavers):
            body = await client.join("r")
            self.assertEqual(body["members"], n + 2)
        for client in leavers:
            sock = client.transport.getHandle()
            # Linger 0: close() sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.transport.abortConnection()
        await wait_until(
            lambda: len(self.factory.connections) == 1, "the server noticed the resets"
        )
        self.assertEqual(len(self.factory.registry.get("r")), 1)
        newcomer = await self.connect()
        self.assertEqual((await newcomer.join("r"))["members"], 2)
        newcomer.send_json(MessageType.MESSAGE, {"room": "r", "content": "still here"})
        self.assertEqual((await stayer.next_json())[1]["content"], "still here")


class RestartTests(IntegrationTestCase):
    async def test_restart_on_the_same_port_tells_clients_then_serves_afresh(self) -> None:
        old = await self.connect()
        await old.hello(userId="old")
        await old.join("lobby")
        port_number = self.port.getHost().port
        # The old server's side of the connection closes first: the new
        # listener must bind while that socket is still in TIME_WAIT.
        await self.restart_server()
        type_, body = await old.next_json()
        self.assertEqual((type_, body["code"], body["fatal"]), (MessageType.ERROR, "SERVER_SHUTDOWN", True))
        await old.closed
        self.assertEqual(self.port.getHost().port, port_number)
        new = await self.connect()
        await new.hello(userId="new")
        # Rooms do not survive a restart.
        self.assertEqual((await new.join("lobby"))["members"], 1)


def deferLater(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)
