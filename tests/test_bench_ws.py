"""relay-bench over WebSocket: its raw RFC 6455 client, and runs against a real server."""

from __future__ import annotations

import os
import struct
import tempfile

import trustme
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.filepath import FilePath
from twisted.trial import unittest

from relay.server.tap import Options, makeService
from relay.tools.bench import Bench, BenchConfig, BenchError
from relay.tools.bench_ws import WebSocketStream, accept_value, client_endpoint
from relay.wsmapping import mask
from relay.tools import bench_ws


class Recorder(Protocol):
    """A wrapped protocol that keeps the stream it is given."""

    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


def server_frame(first: int, payload: bytes) -> bytes:
    """A frame as a server sends it: unmasked."""
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 1 << 16:
        return bytes((first, 126)) + struct.pack("!H", size) + payload
    return bytes((first, 127)) + struct.pack("!Q", size) + payload


def client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Unmask the frames a client wrote: (first byte, payload)."""
    frames = []
    position = 0
    while position < len(data):
        first, size = data[position], data[position + 1]
        assert size & 0x80, "a client frame must be masked"
        size &= 0x7F
        position += 2
        if size == 126:
            (size,) = struct.unpack_from("!H", data, position)
            position += 2
        elif size == 127:
            (size,) = struct.unpack_from("!Q", data, position)
            position += 8
        key = data[position : position + 4]
        position += 4
        payload = data[position : position + size]
        frames.append((first, bytes(b ^ key[i % 4] for i, b in enumerate(payload))))
        position += size
    return frames


class RawClientTests(unittest.TestCase):
    """The bench's client frames like RFC 6455 says, across any split."""

    def open(self) -> tuple[WebSocketStream, Recorder, StringTransport, defer.Deferred]:
        recorder = Recorder()
        opened: defer.Deferred = defer.Deferred()
        factory = type("F", (), {"buildProtocol": lambda self, addr: recorder})()
        stream = WebSocketStream(factory, "example:80", "/relay", opened)
        transport = StringTransport()
        stream.makeConnection(transport)
        request = transport.value().decode("ascii")
        key = request.split("Sec-WebSocket-Key: ")[1].split("\r\n")[0].encode()
        transport.clear()
        stream.dataReceived(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_value(key) + b"\r\n\r\n"
        )
        return stream, recorder, transport, opened

    def test_upgrade_request_asks_for_the_relay_subprotocol_on_the_path(self) -> None:
        stream = WebSocketStream(None, "example:80", "/relay", defer.Deferred())
        transport = StringTransport()
        stream.makeConnection(transport)
        request = transport.value()
        self.assertTrue(request.startswith(b"GET /relay HTTP/1.1\r\nHost: example:80\r\n"))
        self.assertIn(b"\r\nSec-WebSocket-Protocol: relay.v1\r\n", request)
        self.assertIn(b"\r\nSec-WebSocket-Version: 13\r\n", request)

    def test_wrong_accept_value_fails_the_connection(self) -> None:
        opened: defer.Deferred = defer.Deferred()
        stream = WebSocketStream(None, "h", "/relay", opened)
        transport = StringTransport()
        stream.makeConnection(transport)
        stream.dataReceived(b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: bogus\r\n\r\n")
        self.failureResultOf(opened, ConnectionError)
        self.assertTrue(transport.disconnecting or transport.disconnected)

    def test_endless_upgrade_response_fails_the_connection(self) -> None:
        opened: defer.Deferred = defer.Deferred()
        stream = WebSocketStream(None, "h", "/relay", opened)
        transport = StringTransport()
        stream.makeConnection(transport)
        for _ in range(20):
            stream.dataReceived(b"X-Padding: " + b"p" * 1000 + b"\r\n")
        self.failureResultOf(opened, ConnectionError)
        self.assertTrue(transport.disconnected)

    def test_refused_upgrade_fails_the_connection(self) -> None:
        opened: defer.Deferred = defer.Deferred()
        stream = WebSocketStream(None, "h", "/relay", opened)
        stream.makeConnection(StringTransport())
        stream.dataReceived(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        failure = self.failureResultOf(opened, ConnectionError)
        self.assertIn("403", str(failure.value))

    def test_payloads_of_data_frames_reach_the_connection_across_every_split(self) -> None:
        payloads = [b"a" * 5, b"b" * 300, b"c" * 70_000, b"", b"d" * 125, b"e" * 126]
        data = b"".join(server_frame(0x82, p) for p in payloads)
        # A ping in the middle is answered, not passed on.
        data += server_frame(0x89, b"ping!") + server_frame(0x82, b"tail")
        for step in (1, 2, 3, 7, 130, 4096, len(data)):
            stream, recorder, transport, opened = self.open()
            self.assertIs(self.successResultOf(opened), recorder)
            for start in range(0, len(data), step):
                stream.dataReceived(data[start : start + step])
            self.assertEqual(recorder.received, b"".join(payloads) + b"tail", f"split every {step}")
            self.assertEqual(client_frames(transport.value()), [(0x8A, b"ping!")])

    def test_fragmented_message_is_joined_in_order(self) -> None:
        stream, recorder, _, _ = self.open()
        stream.dataReceived(server_frame(0x02, b"one ") + server_frame(0x00, b"two ") + server_frame(0x80, b"three"))
        self.assertEqual(recorder.received, b"one two three")

    def test_writes_are_masked_binary_messages(self) -> None:
        stream, recorder, transport, _ = self.open()
        for size in (0, 1, 125, 126, 65_535, 65_536):
            transport.clear()
            payload = os.urandom(size)
            recorder.transport.write(payload)
            raw = transport.value()
            self.assertEqual(client_frames(raw), [(0x82, payload)], size)

    def test_a_sequence_is_a_message_per_element_in_one_write_each_with_its_own_key(self) -> None:
        stream, recorder, transport, _ = self.open()
        transport.clear()
        payloads = [os.urandom(size) for size in (7, 200, 7)]
        recorder.transport.writeSequence(payloads)
        raw = transport.value()
        self.assertEqual(client_frames(raw), [(0x82, payload) for payload in payloads])
        keys = {raw[2:6], raw[17:21]}  # the first two frames' keys (2 + 4 + 7, then 4 bytes of header)
        self.assertEqual(len(keys), 2)

    def test_mask_is_its_own_inverse(self) -> None:
        payload = b"\x00\x01relay\xff" * 33
        key = b"\x12\x34\x56\x78"
        self.assertEqual(mask(mask(payload, key), key), payload)
        self.assertEqual(mask(payload[:3], key), bytes(b ^ k for b, k in zip(payload[:3], key)))

    def test_close_frame_is_answered_then_the_connection_closed(self) -> None:
        stream, recorder, transport, _ = self.open()
        stream.dataReceived(server_frame(0x88, struct.pack("!H", 1000) + b"bye") + server_frame(0x82, b"late"))
        self.assertEqual(client_frames(transport.value()), [(0x88, struct.pack("!H", 1000))])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(recorder.received, b"")

    def test_lose_connection_starts_the_closing_handshake_once(self) -> None:
        stream, recorder, transport, _ = self.open()
        recorder.transport.loseConnection()
        recorder.transport.loseConnection()
        recorder.transport.write(b"after close")
        self.assertEqual(client_frames(transport.value()), [(0x88, struct.pack("!H", 1000))])

    def test_masked_or_text_frames_from_the_server_drop_it(self) -> None:
        for frame, why in (
            (bytes((0x82, 0x85)) + b"\0\0\0\0hello", "masked"),
            (server_frame(0x81, b"text"), "0x81"),
        ):
            stream, recorder, transport, _ = self.open()
            stream.dataReceived(frame)
            self.assertIn(why, stream.broken)
            self.assertTrue(transport.disconnected)
            self.assertEqual(recorder.received, b"")

    def test_urls_name_the_relay_path_unless_they_give_one(self) -> None:
        for url, path in (
            ("ws://127.0.0.1:8080", "/relay"),
            ("ws://127.0.0.1:8080/", "/relay"),
            ("ws://127.0.0.1:8080/other?x=1", "/other?x=1"),
        ):
            endpoint = client_endpoint(reactor, url)
            self.assertIsInstance(endpoint, bench_ws.WebSocketEndpoint)
            self.assertEqual(endpoint.path, path, url)
        self.assertNotIsInstance(
            client_endpoint(reactor, "tcp:host=127.0.0.1:port=1"), bench_ws.WebSocketEndpoint
        )


class WebSocketBenchRunTests(unittest.TestCase):
    """relay-bench against a real --websocket server: every delivery counted."""

    def serve(self, *arguments: str):
        options = Options()
        options.parseOptions(
            ["--port", "tcp:0:interface=127.0.0.1", "--metrics", "tcp:0:interface=127.0.0.1", *arguments]
        )
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    async def run_bench(self, service, endpoint: str, **overrides: object) -> dict:
        config = BenchConfig(
            endpoint=endpoint, subscribers=4, publishers=1, rooms=1, duration=1.0, warmup=0.2,
            drain=30.0, progress=False,
            metrics_url=f"http://127.0.0.1:{service.metrics_ports[0].getHost().port}/metrics",
        )
        for name, value in overrides.items():
            setattr(config, name, value)
        return await Bench(config, reactor).run()

    def assert_counted(self, report: dict, subscribers: int) -> None:
        server = report["server_metrics"]
        self.assertGreater(report["received"], 0)
        self.assertEqual((report["lost"], report["duplicated"], report["lost_connections"]), (0, 0, 0))
        self.assertEqual(server["messages_published"], report["published_total"])
        self.assertEqual(server["deliveries"], report["received"])
        # HELLO and JOIN acks are frames out too, one each per connection.
        self.assertEqual(server["frames_out"], report["received"] + 2 * (subscribers + 1))

    async def test_ws_run_at_full_speed_counts_every_delivery(self) -> None:
        service = self.serve("--websocket", "tcp:0:interface=127.0.0.1")
        port = service.listening_ports[1].getHost().port
        report = await self.run_bench(service, f"ws://127.0.0.1:{port}/")
        self.assert_counted(report, 4)
        self.assertGreater(report["latency_ms"]["samples"], 0)

    async def test_ws_binary_run_in_two_rooms_counts_every_delivery(self) -> None:
        service = self.serve("--websocket", "tcp:0:interface=127.0.0.1")
        port = service.listening_ports[1].getHost().port
        report = await self.run_bench(
            service, f"ws://127.0.0.1:{port}/relay", binary=True, size=1024, rooms=2, publishers=2,
            subscribers=4, rate=200.0,
        )
        self.assert_counted(report, 5)

    async def test_wss_run_verifies_the_server_against_ssl_cert_file(self) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("localhost")
        directory = FilePath(tempfile.mkdtemp(prefix="relay-bench-wss-"))
        self.addCleanup(directory.remove)
        key_path, cert_path, ca_path = (directory.child(n).path for n in ("key.pem", "cert.pem", "ca.pem"))
        cert.private_key_pem.write_to_path(key_path)
        cert.cert_chain_pems[0].write_to_path(cert_path)
        ca.cert_pem.write_to_path(ca_path)
        service = self.serve(
            "--websocket", f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}"
        )
        url = f"wss://localhost:{service.listening_ports[1].getHost().port}/"
        previous = os.environ.pop("SSL_CERT_FILE", None)
        self.addCleanup(restore_environment, "SSL_CERT_FILE", previous)
        # Trusting only the system's roots, the bench refuses the server.
        with self.assertRaises(BenchError):
            await self.run_bench(service, url, subscribers=1)
        os.environ["SSL_CERT_FILE"] = ca_path
        report = await self.run_bench(service, url, subscribers=2, rate=100.0)
        self.assert_counted(report, 2)


def restore_environment(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
