"""The sans-IO codec: encoding, incremental decoding, header validation."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from relay.wire import (
    BASE_TYPES,
    HEADER_SIZE,
    Decoder,
    ErrorCode,
    Flags,
    Frame,
    MessageType,
    ProtocolError,
    decode_binary_delivery,
    decode_binary_message,
    dumps,
    encode,
    encode_binary_delivery,
    encode_binary_message,
    encode_error,
    encode_json,
    loads,
)

VALID_FLAGS = [Flags.NONE, Flags.JSON, Flags.BINARY]

frames = st.builds(
    Frame,
    type=st.sampled_from(sorted(BASE_TYPES)),
    flags=st.sampled_from(VALID_FLAGS),
    payload=st.binary(max_size=300),
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def decode_all(decoder: Decoder, chunks: list[bytes]) -> list[Frame]:
    return [frame for chunk in chunks for frame in decoder.feed(chunk)]


def header(length: int, version: int = 1, type_: int = 1, flags: int = 0) -> bytes:
    return struct.pack("!IBBB", length, version, type_, flags)


class EncodeTests(unittest.TestCase):
    def test_heartbeat_matches_the_spec_bytes(self) -> None:
        self.assertEqual(encode(MessageType.HEARTBEAT), bytes.fromhex("00000003010500"))

    def test_join_room_matches_the_spec_bytes(self) -> None:
        data = encode(MessageType.JOIN_ROOM, Flags.JSON, b'{"room":"test"}')
        self.assertEqual(data, bytes.fromhex("00000012010201") + b'{"room":"test"}')

    def test_length_counts_the_bytes_after_the_prefix(self) -> None:
        data = encode(MessageType.MESSAGE, Flags.BINARY, b"x" * 10)
        (length,) = struct.unpack_from("!I", data)
        self.assertEqual(length, len(data) - 4)

    def test_every_type_and_flag_round_trips(self) -> None:
        for type_ in MessageType:
            for flags in VALID_FLAGS:
                payload = b'{"a":1}' if flags == Flags.JSON else b"\x00\xff"
                decoded = list(Decoder(known_types=frozenset(MessageType)).feed(encode(type_, flags, payload)))
                self.assertEqual(decoded, [Frame(type_, flags, payload)])

    def test_extension_types_are_not_known_by_default(self) -> None:
        self.assertNotIn(MessageType.PRESENCE, Decoder().known_types)
        self.assertEqual(Decoder().known_types, BASE_TYPES)

    def test_error_frame_carries_code_fatality_and_id(self) -> None:
        (frame,) = Decoder().feed(encode_error(ErrorCode.NOT_IN_ROOM, "nope", request_id=7))
        self.assertEqual(frame.type, MessageType.ERROR)
        self.assertEqual(
            loads(frame.payload),
            {"code": "NOT_IN_ROOM", "message": "nope", "fatal": False, "id": 7},
        )

    def test_fatality_follows_the_spec_table(self) -> None:
        non_fatal = {c for c in ErrorCode if not c.fatal}
        self.assertEqual(
            non_fatal,
            {
                ErrorCode.BAD_REQUEST,
                ErrorCode.INVALID_ROOM,
                ErrorCode.NOT_IN_ROOM,
                ErrorCode.RATE_LIMITED,
                ErrorCode.FORBIDDEN,
                ErrorCode.USER_OFFLINE,
            },
        )


class DecoderTests(unittest.TestCase):
    def test_frames_split_byte_by_byte(self) -> None:
        data = encode_json(MessageType.HELLO, {"userId": "a"}) + encode(MessageType.HEARTBEAT)
        decoder = Decoder()
        decoded = decode_all(decoder, [data[i : i + 1] for i in range(len(data))])
        self.assertEqual([f.type for f in decoded], [MessageType.HELLO, MessageType.HEARTBEAT])
        self.assertEqual(decoder.buffered, 0)

    def test_partial_frame_stays_buffered(self) -> None:
        data = encode(MessageType.MESSAGE, Flags.BINARY, b"abcdef")
        decoder = Decoder()
        self.assertEqual(list(decoder.feed(data[:-2])), [])
        self.assertEqual(decoder.buffered, len(data) - 2)
        self.assertEqual(list(decoder.feed(data[-2:])), [Frame(4, Flags.BINARY, b"abcdef")])

    def test_length_below_three_is_invalid(self) -> None:
        for length in (0, 1, 2):
            with self.assertRaises(ProtocolError) as caught:
                list(Decoder().feed(header(length)))
            self.assertEqual(caught.exception.code, ErrorCode.INVALID_FRAME)

    def test_oversize_header_rejected_before_payload(self) -> None:
        # Only the four length bytes have arrived: that is enough to refuse.
        with self.assertRaises(ProtocolError) as caught:
            list(Decoder(max_frame_size=100).feed(struct.pack("!I", 101)))
        self.assertEqual(caught.exception.code, ErrorCode.FRAME_TOO_LARGE)

    def test_frame_of_exactly_the_maximum_is_accepted(self) -> None:
        data = encode(MessageType.MESSAGE, Flags.BINARY, b"x" * 97)
        self.assertEqual(len(list(Decoder(max_frame_size=100).feed(data))), 1)

    def test_wrong_version_is_unsupported(self) -> None:
        with self.assertRaises(ProtocolError) as caught:
            list(Decoder().feed(header(3, version=2)[:5]))
        self.assertEqual(caught.exception.code, ErrorCode.UNSUPPORTED_VERSION)

    def test_unknown_types_are_refused(self) -> None:
        for type_ in (0x00, 0x07, 0xFF):
            with self.assertRaises(ProtocolError) as caught:
                list(Decoder().feed(header(3, type_=type_)))
            self.assertEqual(caught.exception.code, ErrorCode.UNKNOWN_MESSAGE_TYPE)

    def test_reserved_flag_bits_are_invalid(self) -> None:
        for bit in range(3, 8):
            with self.assertRaises(ProtocolError) as caught:
                list(Decoder().feed(header(3, flags=1 << bit)))
            self.assertEqual(caught.exception.code, ErrorCode.INVALID_FRAME)

    def test_json_and_binary_together_are_invalid(self) -> None:
        with self.assertRaises(ProtocolError) as caught:
            list(Decoder().feed(header(3, flags=Flags.JSON | Flags.BINARY)))
        self.assertEqual(caught.exception.code, ErrorCode.INVALID_FRAME)

    def test_compression_without_negotiation_is_invalid(self) -> None:
        with self.assertRaises(ProtocolError) as caught:
            list(Decoder().feed(header(3, flags=Flags.COMPRESSED)))
        self.assertEqual(caught.exception.code, ErrorCode.INVALID_FRAME)

    def test_frames_before_a_violation_are_yielded_first(self) -> None:
        good = encode(MessageType.HEARTBEAT)
        decoder = Decoder()
        received = []
        with self.assertRaises(ProtocolError):
            for frame in decoder.feed(good + good + header(3, version=9) + good):
                received.append(frame)
        self.assertEqual(len(received), 2)

    def test_decoder_stays_broken_after_a_violation(self) -> None:
        decoder = Decoder()
        with self.assertRaises(ProtocolError):
            list(decoder.feed(header(1)))
        with self.assertRaises(ProtocolError) as caught:
            list(decoder.feed(encode(MessageType.HEARTBEAT)))
        self.assertEqual(caught.exception.code, ErrorCode.INVALID_FRAME)

    def test_extension_types_decode_only_when_known(self) -> None:
        decoder = Decoder(known_types=frozenset(MessageType) | {0x07})
        self.assertEqual(list(decoder.feed(header(3, type_=7))), [Frame(7, 0, b"")])

    def test_stopping_early_then_feeding_again_keeps_the_order(self) -> None:
        one, two, three = (encode(MessageType.MESSAGE, Flags.BINARY, bytes([n])) for n in (1, 2, 3))
        decoder = Decoder()
        first = decoder.feed(one + two)
        self.assertEqual(next(first).payload, b"\x01")
        # The first iterator stays alive, unfinished, while more bytes arrive.
        self.assertEqual([f.payload for f in decoder.feed(three)], [b"\x02", b"\x03"])
        self.assertEqual(list(first), [])
        self.assertEqual(decoder.buffered, 0)

    def test_an_old_iterator_resumed_after_a_feed_continues_in_order(self) -> None:
        frames_sent = [encode(MessageType.MESSAGE, Flags.BINARY, bytes([n])) for n in range(4)]
        decoder = Decoder()
        first = decoder.feed(b"".join(frames_sent[:2]) + frames_sent[2][:3])
        self.assertEqual(next(first).payload, b"\x00")
        second = decoder.feed(frames_sent[2][3:] + frames_sent[3])
        self.assertEqual([f.payload for f in first], [b"\x01", b"\x02", b"\x03"])
        self.assertEqual(list(second), [])

    def test_feeding_without_iterating_still_buffers_the_bytes(self) -> None:
        decoder = Decoder()
        decoder.feed(encode(MessageType.HEARTBEAT))
        self.assertEqual(decoder.buffered, 7)
        self.assertEqual(len(list(decoder.feed(encode(MessageType.HEARTBEAT)))), 2)

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(frames, max_size=8),
        st.lists(st.integers(min_value=0), max_size=12),
        st.lists(st.integers(min_value=0, max_value=3), max_size=12),
    )
    def test_any_frames_any_splits_any_early_stops_decode_the_same(
        self, sent: list[Frame], cuts: list[int], takes: list[int]
    ) -> None:
        """Take at most a few frames from each feed; the rest come out later."""
        decoder = Decoder()
        received: list[Frame] = []
        chunks = split_at(b"".join(encode(*frame) for frame in sent), cuts)
        for index, chunk in enumerate(chunks):
            frames_out = decoder.feed(chunk)
            take = takes[index % len(takes)] if takes else 3
            received.extend(frame for _, frame in zip(range(take), frames_out))
        received.extend(decoder.feed(b""))
        self.assertEqual(received, sent)
        self.assertEqual(decoder.buffered, 0)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(frames, max_size=8), st.lists(st.integers(min_value=0), max_size=12))
    def test_any_frames_split_anywhere_decode_the_same(
        self, sent: list[Frame], cuts: list[int]
    ) -> None:
        stream = b"".join(encode(*frame) for frame in sent)
        decoder = Decoder()
        self.assertEqual(decode_all(decoder, split_at(stream, cuts)), sent)
        self.assertEqual(decoder.buffered, 0)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=HEADER_SIZE, max_size=64))
    def test_arbitrary_bytes_decode_or_raise_protocol_error(self, garbage: bytes) -> None:
        try:
            for frame in Decoder(max_frame_size=1000).feed(garbage):
                self.assertIn(frame.type, set(MessageType))
        except ProtocolError as error:
            self.assertTrue(error.code.fatal)


class JsonTests(unittest.TestCase):
    def test_invalid_json_is_a_parse_error(self) -> None:
        for payload in (b"{", b"", b"\xff\xfe", b"NaN", b'{"a":Infinity}'):
            with self.assertRaises(ProtocolError) as caught:
                loads(payload)
            self.assertEqual(caught.exception.code, ErrorCode.PARSE_ERROR)

    def test_wide_integers_survive_a_round_trip(self) -> None:
        payload = b'{"n":123456789012345678901234567890,"m":-184467440737095516160}'
        self.assertEqual(dumps(loads(payload)), payload)

    def test_integers_just_past_64_bits_survive(self) -> None:
        for text in (b"-9223372036854775809", b"18446744073709551616"):
            self.assertEqual(dumps(loads(text)), text)

    def test_validity_does_not_depend_on_a_long_digit_run(self) -> None:
        digits = b',"x":"12345678901234567890"}'
        for payload in (b'{"a":1e400' + digits, b'{"a":"\\ud800"' + digits, b'{"a":NaN' + digits):
            with self.assertRaises(ProtocolError) as caught:
                loads(payload)
            self.assertEqual(caught.exception.code, ErrorCode.PARSE_ERROR)

    def test_too_deep_to_serialise_is_a_value_error(self) -> None:
        deep: list = []
        for _ in range(1000):
            deep = [deep]
        with self.assertRaises(ValueError):
            dumps(deep)
        self.assertEqual(dumps(loads(b"[" * 300 + b"]" * 300)), b"[" * 300 + b"]" * 300)

    def test_unicode_is_written_as_utf8(self) -> None:
        self.assertEqual(dumps({"t": "é✓"}), '{"t":"é✓"}'.encode())


class BinaryLayoutTests(unittest.TestCase):
    def test_client_message_round_trip(self) -> None:
        payload = encode_binary_message("ré", b"\x00\x01")
        self.assertEqual(payload, b"\x00\x03r\xc3\xa9\x00\x01")
        self.assertEqual(decode_binary_message(payload), ("ré", b"\x00\x01"))

    def test_delivery_round_trip(self) -> None:
        payload = encode_binary_delivery("room", "alice", b"\xff" * 3)
        self.assertEqual(payload, b"\x00\x04room\x00\x05alice\xff\xff\xff")
        self.assertEqual(decode_binary_delivery(payload), ("room", "alice", b"\xff" * 3))

    def test_bad_layouts_are_invalid_frames(self) -> None:
        for payload in (b"", b"\x00", b"\x00\x05abc", b"\x00\x02\xff\xfe"):
            with self.assertRaises(ProtocolError) as caught:
                decode_binary_message(payload)
            self.assertEqual(caught.exception.code, ErrorCode.INVALID_FRAME)
