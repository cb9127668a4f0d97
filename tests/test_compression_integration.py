"""The compression extension over real loopback sockets: the client library
both ways, raw frames, a real ``twistd relay`` process, and two nodes on a
real redis-server."""

from __future__ import annotations

import os
import random
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints, reactor
from twisted.trial import unittest

from relay.client import Message, RelayClientProtocol, connect
from relay.server.tap import Options, makeService
from relay.wire import Decoder, Flags, Frame, MessageType, dumps, loads
from tests.cluster_support import ClusterNodes, OutputWatcher, RedisServer, listening_ports
from tests.cluster_support import connect as connect_node
from tests.scrape import base_url, scrape
from tests.support import FrameClient, IntegrationTestCase

REPO = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).with_name("twistd"))
JSON_COMPRESSED = Flags.JSON | Flags.COMPRESSED


class RawFrameClient(FrameClient):
    """A FrameClient that also reads compressed frames, as they are on the wire."""

    def __init__(self) -> None:
        super().__init__()
        self._decoder = Decoder(max_frame_size=2**31, known_types=frozenset(range(256)), allow_compressed=True)


def body_of(frame: Frame) -> dict[str, Any]:
    payload = zlib.decompress(frame.payload) if frame.flags & Flags.COMPRESSED else frame.payload
    return loads(payload)


async def raw_member(client: FrameClient, user: str, compressing: bool, room: str = "lobby") -> None:
    hello = await client.hello(userId=user, features=["compression"] if compressing else [])
    assert hello["features"] == (["compression"] if compressing else []), hello
    await client.join(room)


def messages(client: RelayClientProtocol, count: int) -> defer.Deferred[list[Message]]:
    """The next ``count`` messages ``client`` receives, subscribed to at once:
    a delivery may arrive before the caller first waits."""
    stream = client.messages()

    async def collect() -> list[Message]:
        return [await stream.__anext__() for _ in range(count)]

    return defer.ensureDeferred(collect())


class ClientLibraryTests(IntegrationTestCase):
    async def client(self, user: str, **options: Any) -> RelayClientProtocol:
        client = await connect(reactor, f"tcp:host=127.0.0.1:port={self.port.getHost().port}", user=user, **options)
        self.addCleanup(client.disconnect)
        return client

    async def test_json_and_binary_round_trips_compressed_both_ways(self) -> None:
        alice = await self.client("alice", compression=True)
        bob = await self.client("bob", compression=True)
        self.assertTrue(alice.compression_enabled and bob.compression_enabled)
        carol = await self.connect()
        await raw_member(carol, "carol", compressing=False)
        await alice.join("lobby")
        await bob.join("lobby")
        content = {"text": "the quick brown fox " * 1000, "n": list(range(100))}
        data = b"\x00\xffbinary\x01" * 3000
        received = messages(bob, 2)
        bytes_in = self.factory.stats.bytes_in
        await alice.send("lobby", content)
        await alice.send_binary("lobby", data)
        text, binary = await received
        self.assertEqual((text.sender, text.content, text.binary), ("alice", content, False))
        self.assertEqual((binary.sender, binary.data, binary.binary), ("alice", data, True))
        # Alice's frames reached the server compressed, and each delivery was
        # compressed once (for bob only).
        self.assertLess(self.factory.stats.bytes_in - bytes_in, (len(dumps(content)) + len(data)) // 10)
        self.assertEqual(self.factory.compressor.compressions, 2)
        # The v1 member got plain v1 frames.
        plain_text = await carol.next_frame()
        plain_binary = await carol.next_frame()
        self.assertEqual((plain_text.flags, plain_binary.flags), (Flags.JSON, Flags.BINARY))
        self.assertEqual(loads(plain_text.payload)["content"], content)
        self.assertTrue(plain_binary.payload.endswith(b"alice" + data))

    async def test_small_messages_travel_uncompressed(self) -> None:
        alice = await self.client("alice", compression=True)
        bob = RawFrameClient()
        await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), bob
        )
        self.addCleanup(lambda: bob.connected and bob.transport.abortConnection())
        await raw_member(bob, "bob", compressing=True)
        await alice.join("lobby")
        bytes_in = self.factory.stats.bytes_in
        await alice.send("lobby", "short")
        frame = await bob.next_frame()
        self.assertEqual((frame.flags, body_of(frame)["content"]), (Flags.JSON, "short"))
        self.assertGreater(self.factory.stats.bytes_in - bytes_in, len(b'"short"'))
        self.assertEqual(self.factory.compressor.compressions, 0)


class RawFrameTests(IntegrationTestCase):
    server_config = {"max_frame_size": 64 * 1024}

    async def member(self, user: str, compressing: bool) -> RawFrameClient:
        client = RawFrameClient()
        await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port), client
        )
        self.addCleanup(lambda: client.connected and client.transport.abortConnection())
        await raw_member(client, user, compressing)
        return client

    async def assert_closed_with(self, client: FrameClient, code: str) -> None:
        error = await client.next_frame()
        self.assertEqual((error.type, body_of(error)["code"], body_of(error)["fatal"]), (MessageType.ERROR, code, True))
        await client.closed

    async def test_a_zip_bomb_is_frame_too_large(self) -> None:
        bob = await self.member("bob", compressing=True)
        bomb = zlib.compress(b'{"room":"lobby","content":"' + b"A" * (10 * 1024 * 1024) + b'"}', 9)
        bob.send_frame(MessageType.MESSAGE, JSON_COMPRESSED, bomb)
        await self.assert_closed_with(bob, "FRAME_TOO_LARGE")

    async def test_a_corrupt_stream_is_invalid_frame(self) -> None:
        bob = await self.member("bob", compressing=True)
        bob.send_frame(MessageType.MESSAGE, JSON_COMPRESSED, b"\x78\x9cnot deflate")
        await self.assert_closed_with(bob, "INVALID_FRAME")

    async def test_flag_0x04_without_negotiation_is_still_invalid_frame(self) -> None:
        carol = await self.member("carol", compressing=False)
        carol.send_frame(MessageType.MESSAGE, JSON_COMPRESSED, zlib.compress(b'{"room":"lobby","content":1}'))
        await self.assert_closed_with(carol, "INVALID_FRAME")

    async def test_a_mixed_room_compresses_for_those_who_asked_only(self) -> None:
        alice = await self.member("alice", compressing=True)
        members = {name: await self.member(name, compressing=name.startswith("z")) for name in ("zoe", "zed", "vic", "val")}
        content = "lorem ipsum dolor " * 200
        alice.send_frame(MessageType.MESSAGE, JSON_COMPRESSED, zlib.compress(dumps({"room": "lobby", "content": content})))
        frames = {name: await client.next_frame() for name, client in members.items()}
        self.assertEqual({name: frame.flags for name, frame in frames.items()},
                         {"zoe": JSON_COMPRESSED, "zed": JSON_COMPRESSED, "vic": Flags.JSON, "val": Flags.JSON})
        self.assertEqual(frames["vic"].payload, frames["val"].payload)
        self.assertEqual(zlib.decompress(frames["zoe"].payload), frames["vic"].payload)
        self.assertEqual(body_of(frames["vic"])["content"], content)
        self.assertEqual(self.factory.compressor.compressions, 1)


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


class TwistdTests(unittest.TestCase):
    """A real ``twistd relay`` process with the compression options."""

    timeout = 60

    async def start(self, *argv: str) -> tuple[Any, int]:
        watcher = OutputWatcher()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        process = reactor.spawnProcess(
            watcher, TWISTD, [TWISTD, "-n", "--pidfile=", "relay", "--port", "tcp:0:interface=127.0.0.1", *argv],
            env=env, path=tempfile.mkdtemp(),
        )

        def stop() -> Any:
            if watcher.running:
                process.signalProcess("KILL")
            return watcher.ended

        self.addCleanup(stop)
        await watcher.wait_for(b"Listening on")
        (port,) = listening_ports(watcher.output)
        return process, port

    async def client(self, port: int, user: str, compressing: bool) -> RawFrameClient:
        client = RawFrameClient()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.connected and client.transport.abortConnection())
        await raw_member(client, user, compressing)
        return client

    async def test_compress_min_applies_and_a_zip_bomb_leaves_memory_flat(self) -> None:
        if not os.path.exists("/proc/self/status"):
            raise unittest.SkipTest("needs /proc for the server's peak RSS")
        process, port = await self.start("--compress-min", "100", "--compress-level", "6")
        alice = await self.client(port, "alice", compressing=True)
        bob = await self.client(port, "bob", compressing=True)
        alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "c" * 120})
        frame = await bob.next_frame()
        self.assertEqual((frame.flags, body_of(frame)["content"]), (JSON_COMPRESSED, "c" * 120))
        before = peak_rss_kib(process.pid)
        # 100 MB of JSON in about 100 KB: inflated whole, the peak would grow by 100 MB.
        bomb = zlib.compress(b'{"room":"lobby","content":"' + b"A" * (100 * 1024 * 1024) + b'"}', 9)
        alice.send_frame(MessageType.MESSAGE, JSON_COMPRESSED, bomb)
        error = await alice.next_frame()
        self.assertEqual(body_of(error)["code"], "FRAME_TOO_LARGE")
        await alice.closed
        # The default frame limit (1 MiB) is all it may inflate.
        self.assertLess(peak_rss_kib(process.pid) - before, 16 * 1024)
        bob.send_frame(MessageType.HEARTBEAT)
        self.assertEqual((await bob.next_frame()).type, MessageType.HEARTBEAT)  # still serving


class ClusterTests(unittest.TestCase):
    timeout = 60

    async def test_frames_from_another_node_are_compressed_once_per_node(self) -> None:
        redis = await RedisServer(self).start()
        nodes = ClusterNodes(self, redis.url)
        node_a = await nodes.node()
        node_b = await nodes.node()
        alice = await connect_node(self, node_a)
        await raw_member(alice, "alice", compressing=False)
        on_b: dict[str, RawFrameClient] = {}
        for name, compressing in (("zoe", True), ("zed", True), ("zia", True), ("vic", False)):
            client = on_b[name] = RawFrameClient()
            port = node_b.listening_ports[0].getHost().port
            await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
            self.addCleanup(lambda c=client: c.connected and c.transport.abortConnection())
            await raw_member(client, name, compressing)
        noise = random.Random(7).randbytes(3000).hex()  # compresses, but not to nothing
        for seq in (1, 2):
            alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": f"{seq} {noise}"})
        for name, client in on_b.items():
            for seq in (1, 2):
                frame = await client.next_frame()
                self.assertEqual(frame.flags, Flags.JSON if name == "vic" else JSON_COMPRESSED, name)
                body = body_of(frame)
                self.assertEqual((body["from"], body["content"], body["seq"]), ("alice", f"{seq} {noise}", seq))
        self.assertEqual(node_b.factory.compressor.compressions, 2)
        self.assertEqual(node_a.factory.compressor.compressions, 0)


class MetricsTests(unittest.TestCase):
    async def test_a_scrape_counts_broadcasts_compressed_and_their_bytes(self) -> None:
        options = Options()
        options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--metrics", "tcp:0:interface=127.0.0.1"])
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        port = service.listening_ports[0].getHost().port
        alice, bob = RawFrameClient(), RawFrameClient()
        for client, name in ((alice, "alice"), (bob, "bob")):
            await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
            self.addCleanup(lambda c=client: c.connected and c.transport.abortConnection())
            await raw_member(client, name, compressing=True)
        for _ in range(2):
            alice.send_json(MessageType.MESSAGE, {"room": "lobby", "content": "m" * 3000})
            self.assertEqual((await bob.next_frame()).flags, JSON_COMPRESSED)
        values = await scrape(base_url(service.metrics_ports[0]))
        compressor = service.factory.compressor
        self.assertEqual(values.value("relay_compressed_broadcasts_total"), 2)
        self.assertEqual(values.value("relay_compression_input_bytes_total"), compressor.bytes_before)
        self.assertEqual(values.value("relay_compression_output_bytes_total"), compressor.bytes_after)
        self.assertGreater(compressor.bytes_before, 2 * 3000)
        self.assertLess(compressor.bytes_after, 400)


class WebSocketTests(unittest.TestCase):
    async def test_a_websocket_client_and_a_tcp_client_exchange_compressed_messages(self) -> None:
        from relay.server import websocket
        from relay.server.factory import RelayFactory

        factory = RelayFactory(reactor=reactor)
        self.addCleanup(factory.wait_closed)
        ports = []
        for site in (websocket.make_site(factory), factory):
            port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
            self.addCleanup(port.stopListening)
            ports.append(port.getHost().port)
        web = await connect(reactor, f"ws://127.0.0.1:{ports[0]}/relay", user="web", compression=True)
        tcp = await connect(reactor, f"tcp:host=127.0.0.1:port={ports[1]}", user="tcp", compression=True)
        for client in (web, tcp):
            self.addCleanup(client.disconnect)
            self.assertTrue(client.compression_enabled)
            await client.join("mixed")
        from_web, from_tcp = "w" * 5000, b"t" * 5000
        heard_by_tcp, heard_by_web = messages(tcp, 1), messages(web, 1)
        await web.send("mixed", from_web)
        await tcp.send_binary("mixed", from_tcp)
        ((to_tcp,), (to_web,)) = (await heard_by_tcp, await heard_by_web)
        self.assertEqual((to_tcp.sender, to_tcp.content), ("web", from_web))
        self.assertEqual((to_web.sender, to_web.data), ("tcp", from_tcp))
        self.assertEqual(factory.compressor.compressions, 2)
        self.assertLess(factory.stats.bytes_out, 5000)
