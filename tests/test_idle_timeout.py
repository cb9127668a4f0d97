"""Idle timeout and TCP keepalive: a Relay v1 client that never heartbeats,
on a real loopback socket, with the server's time driven by a Clock."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import endpoints, reactor, task
from twisted.python import usage
from twisted.trial import unittest

from relay.server.factory import RelayFactory
from relay.server.tap import Options, makeService
from relay.wire import ErrorCode, Flags, MessageType
from tests.support import FrameClient, connect_frame_client


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class SilentClientTests(unittest.TestCase):
    """The server runs on real sockets, but its timers on a Clock."""

    async def serve(self, *argv: str) -> RelayFactory:
        self.clock = task.Clock()
        factory = RelayFactory(parse(*argv).config(), reactor=self.clock)
        self.port = await endpoints.TCP4ServerEndpoint(
            reactor, 0, interface="127.0.0.1"
        ).listen(factory)
        self.addCleanup(factory.wait_closed)
        self.addCleanup(self.port.stopListening)
        return factory

    async def legacy_client(self) -> FrameClient:
        """A client that joins a room and then says nothing for a long time."""
        client = await connect_frame_client(self, self.port)
        await client.join("lobby")
        return client

    async def test_silent_client_is_cut_off_after_the_idle_timeout(self) -> None:
        await self.serve("--idle-timeout", "60")
        client = await self.legacy_client()
        self.clock.advance(59)
        self.assertTrue(client.connected)
        self.clock.advance(1)
        type_, body = await client.next_json()
        self.assertEqual((type_, body["code"]), (MessageType.ERROR, ErrorCode.HEARTBEAT_TIMEOUT))
        await client.closed

    async def test_idle_timeout_0_keeps_a_client_that_never_heartbeats(self) -> None:
        factory = await self.serve("--idle-timeout", "0")
        client = await self.legacy_client()
        self.clock.advance(10 * 24 * 3600)  # ten days of silence
        self.assertEqual(self.clock.getDelayedCalls(), [])
        client.send_frame(MessageType.HEARTBEAT, Flags.NONE, b"still here")
        echo = await client.next_frame()
        self.assertEqual((echo.type, echo.payload), (MessageType.HEARTBEAT, b"still here"))
        self.assertEqual(len(factory.registry.get("lobby")), 1)

    async def test_hello_still_advertises_a_heartbeat_interval(self) -> None:
        await self.serve("--idle-timeout", "0")
        client = await connect_frame_client(self, self.port)
        self.assertEqual((await client.hello())["heartbeatInterval"], 30)


class OptionTests(unittest.TestCase):
    def test_idle_timeout_may_be_zero_not_negative(self) -> None:
        self.assertEqual(parse("--idle-timeout", "0").config().idle_timeout, 0)
        self.assertRaises(usage.UsageError, parse, "--idle-timeout", "-1")
        self.assertRaises(usage.UsageError, parse, "--idle-timeout", "never")

    def test_heartbeat_interval_is_half_the_idle_timeout(self) -> None:
        for idle, interval in (("60", 30), ("3", 1), ("1", 1), ("0", 30)):
            self.assertEqual(parse("--idle-timeout", idle).config().heartbeat_interval, interval)


class KeepAliveTests(unittest.TestCase):
    async def accepted_socket(self) -> Any:
        """The server's side of one accepted TCP connection, after its HELLO."""
        service = makeService(parse("--port", "tcp:0:interface=127.0.0.1"), reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        client = await connect_frame_client(self, service.listening_ports[0])
        await client.hello()
        [connection] = service.factory.connections
        return connection.transport.getHandle()

    async def test_accepted_tcp_sockets_have_keepalive_on(self) -> None:
        handle = await self.accepted_socket()
        self.assertEqual(handle.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)

    async def test_accepted_tcp_sockets_send_without_nagle_delay(self) -> None:
        handle = await self.accepted_socket()
        self.assertEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
