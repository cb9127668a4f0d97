"""The compression extension: the bounded inflate, the inflating decoder, and
the server's compressed deliveries (one compression per broadcast), on
StringTransports and a Clock."""

from __future__ import annotations

import gc
import random
import sys
import tracemalloc
import weakref
import zlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.usage import UsageError
from twisted.trial import unittest

from relay.client import RelayClientProtocol
from relay.compression import InflatingDecoder, compress_frame, inflate
from relay.server import compression as server_compression
from relay.server.compression import DeliveryCompressor
from relay.server.factory import RelayConfig, RelayFactory
from relay.server.rooms import ForwardingRoom
from relay.server.tap import Options
from relay.wire import (
    Decoder,
    ErrorCode,
    Flags,
    Frame,
    MessageType,
    ProtocolError,
    dumps,
    encode,
    encode_binary_message,
    encode_json,
    loads,
)
from tests.support import StringConnection

JSON_COMPRESSED = Flags.JSON | Flags.COMPRESSED
BINARY_COMPRESSED = Flags.BINARY | Flags.COMPRESSED


def reader() -> InflatingDecoder:
    """Reads what a server sends to a compressing client: any length, inflated."""
    return InflatingDecoder(Decoder(max_frame_size=2**31, known_types=frozenset(range(256))))


def raw_frames(data: bytes) -> list[Frame]:
    """Frames as they are on the wire (compressed ones left compressed)."""
    decoder = Decoder(max_frame_size=2**31, known_types=frozenset(range(256)), allow_compressed=True)
    return list(decoder.feed(data))


class InflateTests(unittest.TestCase):
    def test_a_stream_inflates_to_what_was_compressed(self) -> None:
        data = b"relay " * 1000
        self.assertEqual(inflate(zlib.compress(data), len(data)), data)

    def test_output_one_byte_over_the_limit_is_frame_too_large(self) -> None:
        data = b"x" * 1001
        with self.assertRaises(ProtocolError) as raised:
            inflate(zlib.compress(data), 1000)
        self.assertEqual(raised.exception.code, ErrorCode.FRAME_TOO_LARGE)

    def test_corrupt_truncated_or_trailed_streams_are_invalid_frames(self) -> None:
        packed = zlib.compress(b"hello world" * 50)
        for payload in (b"not zlib at all", packed[: len(packed) // 2], packed + b"more", b""):
            with self.assertRaises(ProtocolError, msg=payload[:20]) as raised:
                inflate(payload, 10_000)
            self.assertEqual(raised.exception.code, ErrorCode.INVALID_FRAME)

    def test_a_zip_bomb_is_refused_after_inflating_no_more_than_the_limit(self) -> None:
        bomb = zlib.compress(b"\0" * (10 * 1024 * 1024), 9)
        self.assertLess(len(bomb), 11 * 1024)  # a 10 MB bomb in a 10 KB payload
        limit = 64 * 1024
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        with self.assertRaises(ProtocolError) as raised:
            inflate(bomb, limit)
        _, peak = tracemalloc.get_traced_memory()
        self.assertEqual(raised.exception.code, ErrorCode.FRAME_TOO_LARGE)
        # The output buffer (limit + 1 bytes) and zlib's own state, never 10 MB.
        self.assertLess(peak, limit + 256 * 1024)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=4096), st.integers(min_value=0, max_value=5000), st.integers(1, 9))
    def test_inflate_returns_the_data_within_the_limit_and_refuses_past_it(
        self, data: bytes, limit: int, level: int
    ) -> None:
        packed = zlib.compress(data, level)
        if len(data) <= limit:
            self.assertEqual(inflate(packed, limit), data)
        else:
            with self.assertRaises(ProtocolError) as raised:
                inflate(packed, limit)
            self.assertEqual(raised.exception.code, ErrorCode.FRAME_TOO_LARGE)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=2048), st.integers(min_value=0, max_value=4096))
    def test_any_payload_inflates_within_the_limit_or_is_a_protocol_error(
        self, payload: bytes, limit: int
    ) -> None:
        try:
            data = inflate(payload, limit)
        except ProtocolError as error:
            self.assertIn(error.code, (ErrorCode.INVALID_FRAME, ErrorCode.FRAME_TOO_LARGE))
        else:
            self.assertLessEqual(len(data), limit)
            self.assertEqual(data, zlib.decompress(payload))


class InflatingDecoderTests(unittest.TestCase):
    @settings(max_examples=100, deadline=None)
    @given(
        st.lists(st.tuples(st.sampled_from([0, Flags.JSON, Flags.BINARY]), st.binary(max_size=300), st.booleans()),
                 max_size=8),
        st.data(),
    )
    def test_frames_split_anywhere_come_out_as_if_never_compressed(self, frames: Any, draw: Any) -> None:
        wire = b"".join(
            encode(MessageType.MESSAGE, flags | Flags.COMPRESSED, zlib.compress(payload))
            if packed
            else encode(MessageType.MESSAGE, flags, payload)
            for flags, payload, packed in frames
        )
        cuts = sorted(draw.draw(st.lists(st.integers(0, len(wire)), max_size=5)))
        decoder = InflatingDecoder(Decoder())
        got = []
        for start, end in zip([0, *cuts], [*cuts, len(wire)]):
            got.extend(decoder.feed(wire[start:end]))
        self.assertEqual(got, [Frame(MessageType.MESSAGE, flags, payload) for flags, payload, _ in frames])

    def test_an_inflated_payload_is_bounded_by_the_frame_limit(self) -> None:
        decoder = InflatingDecoder(Decoder(max_frame_size=1003))
        fits = encode(MessageType.MESSAGE, BINARY_COMPRESSED, zlib.compress(b"x" * 1000))
        self.assertEqual(len(list(decoder.feed(fits))[0].payload), 1000)
        over = encode(MessageType.MESSAGE, BINARY_COMPRESSED, zlib.compress(b"x" * 1001))
        with self.assertRaises(ProtocolError) as raised:
            list(decoder.feed(over))
        self.assertEqual(raised.exception.code, ErrorCode.FRAME_TOO_LARGE)
        with self.assertRaises(ProtocolError):  # and it stays broken
            list(decoder.feed(encode(MessageType.HEARTBEAT)))

    def test_compress_frame_leaves_incompressible_frames_as_they_are(self) -> None:
        frame = encode(MessageType.MESSAGE, Flags.BINARY, bytes(range(256)) * 4)
        noise = encode(MessageType.MESSAGE, Flags.BINARY, random.Random(1).randbytes(2000))
        self.assertIs(compress_frame(noise), noise)
        packed = compress_frame(frame)
        self.assertLess(len(packed), len(frame))
        self.assertEqual(list(reader().feed(packed)), list(Decoder().feed(frame)))


class DeliveryCompressorTests(unittest.TestCase):
    def test_the_variant_is_made_once_per_frame_object(self) -> None:
        compressor = DeliveryCompressor(level=1, minimum=10)
        frame = delivery_bytes("c" * 2000)
        twin = bytes(bytearray(frame))  # equal bytes, another object: another broadcast
        variants = [compressor.variant(frame) for _ in range(50)]
        self.assertEqual(compressor.compressions, 1)
        self.assertTrue(all(variant is variants[0] for variant in variants))
        self.assertEqual(zlib.decompress(variants[0][7:]), frame[7:])
        self.assertIsNot(twin, frame)
        compressor.variant(twin)
        self.assertEqual(compressor.compressions, 2)
        self.assertEqual((compressor.bytes_before, compressor.bytes_after), (2 * len(frame), 2 * len(variants[0])))

    def test_it_keeps_only_the_last_frame_and_its_variant(self) -> None:
        compressor = DeliveryCompressor()
        first = delivery_bytes("a" * 5000)
        unheld = sys.getrefcount(first)
        compressor.variant(first)
        self.assertEqual(sys.getrefcount(first), unheld + 1)
        compressor.variant(delivery_bytes("b" * 5000))
        self.assertEqual(sys.getrefcount(first), unheld)


class ServerTestCase(unittest.TestCase):
    config = RelayConfig()

    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = RelayFactory(self.config, reactor=self.clock)

    def member(self, user: str, compressing: bool, room: str = "r") -> StringConnection:
        connection = StringConnection(self.factory)
        hello: dict[str, Any] = {"userId": user}
        if compressing:
            hello["features"] = ["compression"]
        connection.send_json(MessageType.HELLO, hello)
        connection.send_json(MessageType.JOIN_ROOM, {"room": room})
        ack, joined = connection.replies()
        self.assertEqual(ack[1]["features"], ["compression"] if compressing else [])
        self.assertEqual(joined[1]["status"], "joined")
        return connection

    def wire(self, connection: StringConnection) -> bytes:
        data = connection.transport.value()
        connection.transport.clear()
        return data

    def count_compressions(self) -> list[bytes]:
        """The frames the server compresses from now on."""
        compressed: list[bytes] = []
        original = server_compression.compress_frame

        def counting(frame: bytes, level: int) -> bytes:
            compressed.append(frame)
            return original(frame, level)

        self.patch(server_compression, "compress_frame", counting)
        return compressed


def delivery_bytes(content: str, seq: int = 1, sender: str = "alice") -> bytes:
    """A v1 delivery as the server encodes it at time 0 (the Clock's)."""
    return encode_json(
        MessageType.MESSAGE, {"room": "r", "from": sender, "content": content, "timestamp": 0, "seq": seq}
    )


class CompressedDeliveryTests(ServerTestCase):
    def test_one_compression_per_broadcast_for_all_compressing_members(self) -> None:
        compressed = self.count_compressions()
        alice = self.member("alice", compressing=False)
        members = [self.member(f"m{index}", compressing=True) for index in range(20)]
        content = "lorem ipsum " * 400
        for _ in range(3):
            alice.send_json(MessageType.MESSAGE, {"room": "r", "content": content})
        self.assertEqual(len(compressed), 3)
        self.assertEqual(self.factory.compressor.compressions, 3)
        for member in members:
            frames = raw_frames(self.wire(member))
            self.assertEqual([f.flags for f in frames], [JSON_COMPRESSED] * 3)
            inflated = [loads(zlib.decompress(f.payload)) for f in frames]
            self.assertEqual([(b["content"], b["seq"]) for b in inflated], [(content, 1), (content, 2), (content, 3)])

    def test_payloads_up_to_compress_min_are_sent_as_they_are(self) -> None:
        alice = self.member("alice", compressing=False)
        bob = self.member("bob", compressing=True)
        at_minimum = delivery_bytes("a")
        pad = 1024 - (len(at_minimum) - 7)  # content that makes the payload exactly 1024 bytes
        alice.send_json(MessageType.MESSAGE, {"room": "r", "content": "a" * (1 + pad)})
        alice.send_json(MessageType.MESSAGE, {"room": "r", "content": "a" * (2 + pad)})
        exact, over = raw_frames(self.wire(bob))
        self.assertEqual((len(exact.payload), exact.flags), (1024, Flags.JSON))
        self.assertEqual(over.flags, JSON_COMPRESSED)
        self.assertEqual(len(zlib.decompress(over.payload)), 1025)

    def test_v1_members_of_a_mixed_room_get_the_v1_bytes(self) -> None:
        alice = self.member("alice", compressing=True)
        carol = self.member("carol", compressing=False)
        bob = self.member("bob", compressing=True)
        dave = self.member("dave", compressing=False)
        big = "z" * 5000
        alice.send(encode(MessageType.MESSAGE, JSON_COMPRESSED, zlib.compress(dumps({"room": "r", "content": big}))))
        alice.send_json(MessageType.MESSAGE, {"room": "r", "content": "hi"})
        # A fixed capture: v1 framing, the bytes a server without the
        # extension sends (timestamp 0 on the Clock).
        expected = (
            bytes.fromhex("000013c9010401") + b'{"room":"r","from":"alice","content":"' + b"z" * 5000
            + b'","timestamp":0,"seq":1}'
            + bytes.fromhex("00000043010401")
            + b'{"room":"r","from":"alice","content":"hi","timestamp":0,"seq":2}'
        )
        self.assertEqual(expected, delivery_bytes(big) + delivery_bytes("hi", 2))
        self.assertEqual(self.wire(carol), expected)
        self.assertEqual(self.wire(dave), expected)
        packed, small = raw_frames(self.wire(bob))
        self.assertEqual((packed.flags, small.flags), (JSON_COMPRESSED, Flags.JSON))
        self.assertEqual(zlib.decompress(packed.payload), delivery_bytes(big)[7:])

    def test_binary_deliveries_are_compressed_too(self) -> None:
        alice = self.member("alice", compressing=True)
        bob = self.member("bob", compressing=True)
        data = b"\x00\x01binary" * 500
        alice.send(encode(MessageType.MESSAGE, BINARY_COMPRESSED, zlib.compress(encode_binary_message("r", data))))
        (frame,) = raw_frames(self.wire(bob))
        self.assertEqual(frame.flags, BINARY_COMPRESSED)
        (inflated,) = reader().feed(encode(frame.type, frame.flags, frame.payload))
        self.assertTrue(inflated.payload.endswith(b"alice" + data))

    def test_replies_and_heartbeats_are_never_compressed(self) -> None:
        bob = self.member("bob", compressing=True)
        bob.send(encode(MessageType.HEARTBEAT, Flags.COMPRESSED, zlib.compress(b"p" * 5000)))
        bob.send_json(MessageType.LEAVE_ROOM, {"room": "r", "id": "x" * 128})
        echo, left = raw_frames(self.wire(bob))
        self.assertEqual((echo.type, echo.flags, echo.payload), (MessageType.HEARTBEAT, 0, b"p" * 5000))
        self.assertEqual((left.type, left.flags), (MessageType.LEAVE_ROOM, Flags.JSON))

    def test_frames_from_other_nodes_are_compressed_once_for_the_local_members(self) -> None:
        compressed = self.count_compressions()
        room = ForwardingRoom("r", self.factory.backplane)
        members = [self.member(f"m{index}", compressing=index % 2 == 0) for index in range(6)]
        for member in members:
            room.add(member.protocol)
        frames = [delivery_bytes("remote " * 300, seq) for seq in (1, 2)]
        room.deliver(frames, self.factory.batch)
        self.factory.flush()
        self.assertEqual(compressed, frames)
        for index, member in enumerate(members):
            got = raw_frames(self.wire(member))
            self.assertEqual([f.flags for f in got], [JSON_COMPRESSED if index % 2 == 0 else Flags.JSON] * 2)

    def test_a_closed_compressing_connection_is_freed_without_the_collector(self) -> None:
        bob = self.member("bob", compressing=True)
        gone = weakref.ref(bob.protocol)
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        bob.transport.unregisterProducer()  # a real transport lets go of it when it closes
        bob.protocol.connectionLost()
        del bob
        self.assertIsNone(gone())


class CompressedRequestTests(ServerTestCase):
    def test_a_compressed_frame_right_after_hello_in_the_same_read_is_inflated(self) -> None:
        alice = self.member("alice", compressing=False)
        bob = StringConnection(self.factory)
        body = dumps({"room": "r", "id": 7})
        bob.send(
            encode_json(MessageType.HELLO, {"userId": "bob", "features": ["compression"]})
            + encode(MessageType.JOIN_ROOM, JSON_COMPRESSED, zlib.compress(body))
            + encode(MessageType.MESSAGE, JSON_COMPRESSED, zlib.compress(dumps({"room": "r", "content": "q"})))
        )
        (_, hello), (_, joined) = bob.replies()
        self.assertEqual((hello["features"], joined["status"], joined["id"]), (["compression"], "joined", 7))
        self.assertEqual(alice.contents(), ["q"])

    def test_compression_without_negotiation_is_a_fatal_invalid_frame(self) -> None:
        carol = self.member("carol", compressing=False)
        carol.send(encode(MessageType.MESSAGE, JSON_COMPRESSED, zlib.compress(b'{"room":"r","content":1}')))
        ((kind, error),) = carol.replies()
        self.assertEqual((kind, error["code"], error["fatal"]), (MessageType.ERROR, "INVALID_FRAME", True))
        self.assertIn("not negotiated", error["message"])
        self.assertTrue(carol.closing)

    def test_a_corrupt_stream_is_a_fatal_invalid_frame(self) -> None:
        bob = self.member("bob", compressing=True)
        bob.send(encode(MessageType.MESSAGE, JSON_COMPRESSED, b"\x78\x9c garbage"))
        ((kind, error),) = bob.replies()
        self.assertEqual((error["code"], error["fatal"]), ("INVALID_FRAME", True))
        self.assertTrue(bob.closing)

    def test_a_compressed_request_is_checked_like_a_plain_one(self) -> None:
        bob = self.member("bob", compressing=True)
        bob.send(encode(MessageType.MESSAGE, JSON_COMPRESSED, zlib.compress(b'{"room":"elsewhere","content":1,"id":3}')))
        bob.send(encode(MessageType.MESSAGE, JSON_COMPRESSED, zlib.compress(b"{not json")))
        (_, refused), (_, fatal) = bob.replies()
        self.assertEqual((refused["code"], refused["id"], refused["fatal"]), ("NOT_IN_ROOM", 3, False))
        self.assertEqual((fatal["code"], fatal["fatal"]), ("PARSE_ERROR", True))


class ZipBombTests(ServerTestCase):
    config = RelayConfig(max_frame_size=64 * 1024)

    def test_a_zip_bomb_is_frame_too_large_and_costs_no_more_than_the_limit(self) -> None:
        alice = self.member("alice", compressing=False)
        bob = self.member("bob", compressing=True)
        body = b'{"room":"r","content":"' + b"A" * (10 * 1024 * 1024) + b'"}'
        bomb = encode(MessageType.MESSAGE, JSON_COMPRESSED, zlib.compress(body, 9))
        self.assertLess(len(bomb), 11 * 1024)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        bob.send(bomb)
        _, peak = tracemalloc.get_traced_memory()
        ((kind, error),) = bob.replies()
        self.assertEqual((error["code"], error["fatal"]), ("FRAME_TOO_LARGE", True))
        self.assertTrue(bob.closing)
        self.assertLess(peak, 64 * 1024 + 256 * 1024)
        self.assertEqual(alice.received(), [])


class ByteRateTests(ServerTestCase):
    config = RelayConfig(byte_rate=10_000)

    def test_byte_rate_counts_inflated_bytes(self) -> None:
        self.member("alice", compressing=False)
        bob = self.member("bob", compressing=True)
        body = dumps({"room": "r", "content": "b" * 20_000, "id": 1})
        packed = zlib.compress(body)
        self.assertLess(len(packed), 1000)  # far under the rate on the wire
        bob.send(encode(MessageType.MESSAGE, JSON_COMPRESSED, packed))
        bob.send(encode(MessageType.MESSAGE, JSON_COMPRESSED, packed))
        replies = bob.replies()
        self.assertEqual([(body["code"], body["id"]) for _, body in replies], [("RATE_LIMITED", 1)])


def client_hello_ack(request_id: int, features: list[str], max_frame_size: int = 1 << 20) -> bytes:
    return encode_json(MessageType.HELLO, {
        "id": request_id, "status": "connected", "connectionId": "c0ffee", "userId": "alice",
        "serverVersion": "test", "heartbeatInterval": 30, "maxFrameSize": max_frame_size,
        "features": features,
    })


class ClientUnitTests(unittest.TestCase):
    """The client library against a fake server made of frames."""

    def connect(self, features: list[str], **options: Any) -> None:
        self.client = RelayClientProtocol(Clock(), user="alice", compression=True, **options)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        (hello,) = self.sent()
        self.hello = loads(hello.payload)
        self.ack = client_hello_ack(self.hello["id"], features)

    def sent(self) -> list[Frame]:
        frames = list(Decoder(2**31 - 1, allow_compressed=True).feed(self.transport.value()))
        self.transport.clear()
        return frames

    def test_it_asks_for_compression_and_compresses_large_messages_once_enabled(self) -> None:
        self.connect(["compression"])
        self.assertEqual(self.hello["features"], ["compression"])
        self.client.dataReceived(self.ack)
        self.assertTrue(self.client.compression_enabled)
        self.client.send("lobby", "x" * 2000)
        self.client.send("lobby", "small")
        self.client.send_binary("lobby", b"y" * 2000)
        big, small, binary = self.sent()
        self.assertEqual((big.flags, small.flags, binary.flags), (JSON_COMPRESSED, Flags.JSON, BINARY_COMPRESSED))
        self.assertEqual(loads(zlib.decompress(big.payload))["content"], "x" * 2000)
        self.assertEqual(zlib.decompress(binary.payload), encode_binary_message("lobby", b"y" * 2000))

    def test_nothing_is_compressed_when_the_server_does_not_enable_it(self) -> None:
        self.connect([])
        self.client.dataReceived(self.ack)
        self.assertFalse(self.client.compression_enabled)
        self.client.send("lobby", "x" * 2000)
        (frame,) = self.sent()
        self.assertEqual(frame.flags, Flags.JSON)
        compressed = encode(MessageType.MESSAGE, JSON_COMPRESSED, zlib.compress(b'{"room":"r"}'))
        self.client.dataReceived(compressed)  # 0x04 was not negotiated: a violation
        self.assertIsInstance(self.client.close_reason.value, ProtocolError)

    def test_a_compressed_delivery_in_the_read_of_the_hello_ack_is_inflated(self) -> None:
        self.connect(["compression"])
        heard: list[Any] = []
        self.client.on_message = heard.append
        delivery = compress_frame(delivery_bytes("hello " * 500))
        self.assertNotEqual(delivery, delivery_bytes("hello " * 500))
        self.client.dataReceived(self.ack + delivery)
        self.assertEqual([(m.sender, m.content) for m in heard], [("alice", "hello " * 500)])

    def test_a_delivery_inflating_past_the_frame_limit_closes_the_connection(self) -> None:
        self.connect(["compression"])
        self.client.dataReceived(client_hello_ack(self.hello["id"], ["compression"], max_frame_size=4096))
        bomb = encode(MessageType.MESSAGE, JSON_COMPRESSED, zlib.compress(b"[" + b"0," * 100_000 + b"0]"))
        self.client.dataReceived(bomb)
        self.assertEqual(self.client.close_reason.value.code, ErrorCode.FRAME_TOO_LARGE)
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)


class OptionTests(unittest.TestCase):
    def test_the_options_become_the_config(self) -> None:
        options = Options()
        options.parseOptions(["--compress-min", "2KiB", "--compress-level", "6"])
        config = options.config()
        self.assertEqual((config.compress_min, config.compress_level), (2048, 6))
        factory = RelayFactory(config, reactor=Clock())
        self.assertEqual((factory.compressor.threshold, factory.compressor.level), (2048 + 7, 6))
        defaults = Options()
        defaults.parseOptions([])
        self.assertEqual((defaults.config().compress_min, defaults.config().compress_level), (1024, 1))

    def test_a_level_outside_1_to_9_is_a_usage_error(self) -> None:
        for level in ("0", "10", "fast"):
            with self.assertRaises(UsageError, msg=level):
                Options().parseOptions(["--compress-level", level])
