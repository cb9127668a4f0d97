"""The sans-IO request parser: frames in, typed requests or refusals out."""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest

from relay.requests import (
    Hello,
    RequestError,
    RoomRequest,
    normalize_room_name,
    parse_binary_publish,
    parse_hello,
    parse_publish,
    parse_room_request,
)
from relay.wire import (
    ErrorCode,
    Flags,
    Frame,
    MessageType,
    ProtocolError,
    dumps,
    encode_binary_message,
)


def json_frame(type_: MessageType, body: Any) -> Frame:
    return Frame(type_, Flags.JSON, dumps(body))


class RequestParserTests(unittest.TestCase):
    def refusal(self, parse: Any, frame: Frame) -> RequestError:
        with self.assertRaises(RequestError) as caught:
            parse(frame)
        return caught.exception

    def test_hello_with_every_field(self) -> None:
        hello = parse_hello(json_frame(MessageType.HELLO, {
            "id": 7, "userId": "alice", "echo": True, "features": ["acks"],
            "token": "t", "clientVersion": "x/1",
        }))
        self.assertEqual(hello, Hello(7, "alice", True, ("acks",), "t", "x/1"))

    def test_empty_hello_asks_for_nothing(self) -> None:
        self.assertEqual(
            parse_hello(json_frame(MessageType.HELLO, {})), Hello(None, None, False, (), None, None)
        )

    def test_hello_field_types_are_checked(self) -> None:
        for body in (
            {"userId": None}, {"userId": ""}, {"userId": "a" * 129}, {"userId": "a\x07"},
            {"echo": "yes"}, {"features": "acks"}, {"features": [1]}, {"token": 5},
            {"clientVersion": []},
        ):
            refusal = self.refusal(parse_hello, json_frame(MessageType.HELLO, {"id": "h", **body}))
            self.assertEqual((refusal.code, refusal.request_id), (ErrorCode.BAD_REQUEST, "h"), body)

    def test_room_names_are_trimmed_and_checked(self) -> None:
        self.assertEqual(
            parse_room_request(json_frame(MessageType.JOIN_ROOM, {"room": "\u3000 a "})),
            RoomRequest(None, "a"),
        )
        refusal = self.refusal(
            parse_room_request, json_frame(MessageType.JOIN_ROOM, {"room": " ", "id": 1})
        )
        self.assertEqual((refusal.code, refusal.request_id), (ErrorCode.INVALID_ROOM, 1))
        refusal = self.refusal(parse_room_request, json_frame(MessageType.JOIN_ROOM, {"room": 3}))
        self.assertEqual(refusal.code, ErrorCode.BAD_REQUEST)

    def test_publish_keeps_the_name_as_sent_and_null_content(self) -> None:
        publish = parse_publish(json_frame(MessageType.MESSAGE, {"room": " a ", "content": None}))
        self.assertEqual(publish, (None, " a ", None))

    def test_publish_needs_content(self) -> None:
        refusal = self.refusal(parse_publish, json_frame(MessageType.MESSAGE, {"room": "a", "id": 2}))
        self.assertEqual((refusal.code, refusal.request_id), (ErrorCode.BAD_REQUEST, 2))

    def test_request_id_must_be_a_string_or_an_integer(self) -> None:
        for request_id in (True, 1.5, [], {}, "x" * 129, 10**128, -(10**128)):
            refusal = self.refusal(
                parse_room_request, json_frame(MessageType.JOIN_ROOM, {"room": "a", "id": request_id})
            )
            self.assertEqual(refusal.code, ErrorCode.BAD_REQUEST)

    def test_short_ids_are_accepted(self) -> None:
        for request_id in ("x" * 128, 10**128 - 1, -(10**128) + 1, 2**70, 0, ""):
            request = parse_room_request(
                json_frame(MessageType.JOIN_ROOM, {"room": "a", "id": request_id})
            )
            self.assertEqual(request.request_id, request_id)

    def test_payload_must_be_a_json_object(self) -> None:
        for frame in (
            Frame(MessageType.JOIN_ROOM, Flags.BINARY, b"{}"),
            Frame(MessageType.JOIN_ROOM, Flags.JSON, b"[]"),
        ):
            self.assertEqual(self.refusal(parse_room_request, frame).code, ErrorCode.BAD_REQUEST)

    def test_invalid_json_is_fatal(self) -> None:
        with self.assertRaises(ProtocolError) as caught:
            parse_hello(Frame(MessageType.HELLO, Flags.JSON, b"{"))
        self.assertEqual(caught.exception.code, ErrorCode.PARSE_ERROR)

    def test_binary_publish_names_its_room_and_where_data_starts(self) -> None:
        payload = encode_binary_message("lobby", b"\x00data")
        room, start = parse_binary_publish(Frame(MessageType.MESSAGE, Flags.BINARY, payload))
        self.assertEqual((room, payload[start:]), ("lobby", b"\x00data"))

    def test_normalize_refuses_control_characters_and_long_names(self) -> None:
        self.assertIsNone(normalize_room_name("a\x85b"))
        self.assertIsNone(normalize_room_name("a" * 65))
        self.assertEqual(normalize_room_name("a" * 64), "a" * 64)
