"""Limits met over real loopback sockets: each one hit, then recovered from.

Servers run in this process on port 0 (``IntegrationTestCase`` or
``makeService``); the clients are raw frame clients.  Timeouts are short
real seconds here, and every wait is bounded: each test waits for the
server's verdict, never for time to pass.
"""

from __future__ import annotations

import gc
import socket
import weakref
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import capturedLogs
from twisted.trial import unittest

from relay.server.tap import DEFAULT_BACKLOG, Options, makeService
from relay.wire import MessageType, encode, encode_json
from tests.storm_probe import listen_backlog
from tests.support import FrameClient, IntegrationTestCase, wait_until

HEARTBEAT = encode(MessageType.HEARTBEAT)


def publish(room: str, content: Any, **fields: Any) -> bytes:
    return encode_json(MessageType.MESSAGE, {"room": room, "content": content, **fields})


def sleep(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


async def error_of(client: FrameClient) -> dict[str, Any]:
    type_, body = await client.next_json()
    assert type_ == MessageType.ERROR, body
    return body


class SlowlorisTests(IntegrationTestCase):
    server_config = {"hello_timeout": 0.5, "idle_timeout": 1}

    async def test_a_silent_connection_is_closed_at_the_hello_timeout(self) -> None:
        client = await self.connect()
        body = await error_of(client)
        self.assertEqual((body["code"], body["fatal"]), ("HEARTBEAT_TIMEOUT", True))
        await client.closed

    async def test_header_bytes_trickled_faster_than_the_timeout_do_not_keep_it_open(self) -> None:
        clients = [await self.connect() for _ in range(20)]
        frame = encode_json(MessageType.HEARTBEAT, {"pad": "x" * 100})
        for byte in frame[:30]:
            for client in clients:
                if client.connected:
                    client.send(bytes([byte]))
            if not any(client.connected for client in clients):
                break
            await sleep(0.1)
        for client in clients:
            await client.closed
            self.assertIn(b"HEARTBEAT_TIMEOUT", b"".join(f.payload for f in client.frames))
        # The server is still there for everyone else.
        healthy = await self.connect()
        self.assertEqual((await healthy.hello())["status"], "connected")

    async def test_after_the_first_frame_a_trickle_meets_the_idle_timeout(self) -> None:
        client = await self.connect()
        await client.hello()
        for byte in encode_json(MessageType.JOIN_ROOM, {"room": "r" * 60}):
            if not client.connected:
                break
            client.send(bytes([byte]))
            await sleep(0.2)
        body = await error_of(client)
        self.assertEqual(body["code"], "HEARTBEAT_TIMEOUT")


class RateLimitTests(IntegrationTestCase):
    server_config = {"rate_limit": 50, "rate_burst": 10, "rate_strikes": 1000}

    async def test_a_flood_is_dropped_past_the_burst_then_the_rate_recovers(self) -> None:
        sender, member = await self.connect(), await self.connect()
        await sender.join("r")
        await member.join("r")
        sender.send(b"".join(publish("r", n, id=n) for n in range(30)))
        refusals = [await error_of(sender) for _ in range(20)]
        self.assertEqual({body["code"] for body in refusals}, {"RATE_LIMITED"})
        self.assertEqual([body["id"] for body in refusals], list(range(10, 30)))
        self.assertTrue(all(0 < body["retryAfter"] <= 20 for body in refusals))
        contents = [(await member.next_json())[1]["content"] for _ in range(10)]
        self.assertEqual(contents, list(range(10)))
        await sleep(max(body["retryAfter"] for body in refusals) / 1000)
        sender.send(publish("r", "recovered"))
        self.assertEqual((await member.next_json())[1]["content"], "recovered")


class JoinAndByteRateTests(IntegrationTestCase):
    server_config = {"join_rate": 5, "max_rooms": 3, "byte_rate": 2000, "rate_strikes": 1000}

    async def test_joins_past_the_burst_are_refused_then_the_rate_recovers(self) -> None:
        client = await self.connect()
        for number in range(8):  # max-rooms + one second's worth
            await client.join(f"r{number % 3}")
            client.send_json(MessageType.LEAVE_ROOM, {"room": f"r{number % 3}"})
            await client.next_json()
        type_, body = await client.request(MessageType.JOIN_ROOM, {"room": "late", "id": 1})
        self.assertEqual((type_, body["code"], body["id"]), (MessageType.ERROR, "RATE_LIMITED", 1))
        await sleep(body["retryAfter"] / 1000)
        self.assertEqual((await client.join("late"))["status"], "joined")

    async def test_published_bytes_past_the_rate_are_dropped_then_recover(self) -> None:
        sender, member = await self.connect(), await self.connect()
        await sender.join("r")
        await member.join("r")
        big = "b" * 1500
        sender.send(publish("r", big, id=1) + publish("r", big, id=2) + publish("r", big, id=3))
        body = await error_of(sender)
        self.assertEqual((body["code"], body["id"]), ("RATE_LIMITED", 3))
        self.assertEqual([(await member.next_json())[1]["content"] for _ in range(2)], [big, big])
        await sleep(body["retryAfter"] / 1000)
        sender.send(publish("r", "small"))
        self.assertEqual((await member.next_json())[1]["content"], "small")


class StrikeOutTests(IntegrationTestCase):
    server_config = {"rate_limit": 1, "rate_burst": 1, "rate_strikes": 5}

    async def test_a_client_that_ignores_rate_limits_is_closed(self) -> None:
        sender = await self.connect()
        await sender.join("r")
        sender.send(publish("r", 0) * 20)
        bodies = [await error_of(sender) for _ in range(5)]
        self.assertEqual([body["fatal"] for body in bodies], [False] * 4 + [True])
        await sender.closed
        self.assertEqual(self.factory.limits.counters["rate_strikes"], 1)


class PerAddressIntegrationTests(IntegrationTestCase):
    server_config = {"max_connections_per_ip": 3}

    async def test_the_connection_past_the_per_address_limit_is_refused_then_a_place_frees(self) -> None:
        clients = [await self.connect() for _ in range(3)]
        for client in clients:
            await client.hello()
        refused = await self.connect()
        body = await error_of(refused)
        self.assertEqual((body["code"], body["fatal"]), ("TOO_MANY_CONNECTIONS", True))
        await refused.closed
        clients[0].transport.loseConnection()
        await clients[0].closed
        await wait_until(lambda: len(self.factory.connections) == 2, "the server saw the close")
        again = await self.connect()
        self.assertEqual((await again.hello())["status"], "connected")


class OutboundMemoryTests(IntegrationTestCase):
    server_config = {"max_pending": 256 * 1024, "max_frame_size": 64 * 1024, "send_buffer": 64 * 1024}

    async def test_the_socket_send_buffer_is_capped(self) -> None:
        client = await self.connect()
        await client.hello()
        (connection,) = self.factory.connections
        sock = connection.transport.getHandle()
        # Linux doubles what it is given, for its own bookkeeping.
        self.assertLessEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), 2 * 64 * 1024)

    async def test_a_member_that_never_reads_is_cut_off_within_max_pending(self) -> None:
        sender = await self.connect()
        await sender.join("r")
        known = set(self.factory.connections)
        reader = await self.connect()
        await reader.join("r")
        (connection,) = set(self.factory.connections) - known
        reader.transport.pauseProducing()  # never reads again
        held = []
        with capturedLogs() as events:
            for _ in range(200):
                if not connection.accepting:
                    break
                sender.send(publish("r", "x" * 60_000))
                await sleep(0.01)
                held.append(connection._pending_bytes)
            await wait_until(lambda: not connection.accepting, "the reader was cut off")
        # What it held, the transport's share included, never passed the
        # limit by more than the frame that crossed it.
        self.assertLessEqual(max(held), 256 * 1024 + 64 * 1024 + 512)
        cut = [e for e in events if e.get("conn") == connection.connection_id and e.get("code") == "SLOW_CONSUMER"]
        self.assertEqual(len(cut), 1)
        reader.transport.resumeProducing()
        await reader.closed
        self.assertTrue(sender.connected)


class OutboundBudgetIntegrationTests(IntegrationTestCase):
    server_config = {"max_pending": 4 * 1024 * 1024, "max_pending_total": 1024 * 1024, "send_buffer": 32 * 1024}

    async def test_past_the_server_wide_budget_the_largest_queue_is_cut_off_first(self) -> None:
        sender = await self.connect()
        readers = [await self.connect() for _ in range(3)]
        for number, reader in enumerate(readers):
            await reader.join(f"room-{number}")
            await sender.join(f"room-{number}")
            reader.transport.pauseProducing()
        # Room 0 gets the most: its reader holds the largest queue.
        for _ in range(4):
            sender.send(publish("room-0", "a" * 60_000))
            sender.send(publish("room-1", "b" * 20_000))
            sender.send(publish("room-2", "c" * 20_000))
            await sleep(0.01)
        for _ in range(40):
            if not readers[0].connected:
                break
            sender.send(publish("room-0", "a" * 60_000))
            await sleep(0.02)
        for reader in readers:
            reader.transport.resumeProducing()
        await readers[0].closed
        self.assertGreaterEqual(self.factory.limits.counters["outbound_budget"], 1)
        for reader in readers[1:]:
            self.assertTrue(reader.connected)
        self.assertLessEqual(self.factory.limits.outbound.total, 1024 * 1024)


class ClosedConnectionsFreedTests(IntegrationTestCase):
    async def test_a_closed_connection_is_freed_by_reference_counting_alone(self) -> None:
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        refs = []
        for number in range(20):
            known = set(self.factory.connections)
            client = await self.connect()
            await client.hello()
            await client.join("room")
            if number % 2:
                client.send(b"\x00\x00\x10\x00\x01\x04\x01" + b"{" * 1000)  # a partial frame
                await wait_until(lambda: any(c._decoder is not None and c._decoder.buffered for c in self.factory.connections), "the partial frame arrived")
            (connection,) = set(self.factory.connections) - known
            refs.append(weakref.ref(connection))
            del connection, known
            client.transport.abortConnection()
            await client.closed
        await wait_until(lambda: not self.factory.connections, "the server saw every close")
        await sleep(0.05)  # let the reactor drop its last references (delayed calls)
        self.assertEqual([ref() for ref in refs if ref() is not None], [])


class BacklogTests(unittest.TestCase):
    def start(self, *argv: str) -> Any:
        options = Options()
        options.parseOptions(list(argv))
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    async def listening(self, service: Any, count: int) -> list[int]:
        await wait_until(lambda: len(service.listening_ports) == count, "listening")
        return [port.getHost().port for port in service.listening_ports]

    async def test_every_listener_gets_the_default_backlog(self) -> None:
        service = self.start("--port", "tcp:0:interface=127.0.0.1", "--websocket", "tcp:0:interface=127.0.0.1")
        for port in await self.listening(service, 2):
            self.assertEqual(listen_backlog(port), DEFAULT_BACKLOG)

    async def test_a_backlog_in_the_description_is_kept(self) -> None:
        service = self.start("--port", "tcp:0:interface=127.0.0.1:backlog=77")
        (port,) = await self.listening(service, 1)
        self.assertEqual(listen_backlog(port), 77)


class ConnectionRecoveryTests(IntegrationTestCase):
    server_config = {"max_connections": 3}

    async def test_past_max_connections_the_refusal_is_sent_then_places_free(self) -> None:
        clients = [await self.connect() for _ in range(3)]
        refused = await self.connect()
        self.assertEqual((await error_of(refused))["code"], "TOO_MANY_CONNECTIONS")
        clients[0].transport.abortConnection()
        await wait_until(lambda: len(self.factory.connections) == 2, "the server saw the close")
        self.assertEqual((await (await self.connect()).hello())["status"], "connected")
