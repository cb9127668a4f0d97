"""The nesting limit of ``wire.loads`` holds for long payloads, flat or not.

A long object of scalars (a chat message with long text) skips the bracket
count; anything holding a container is still counted and walked.
"""

from __future__ import annotations

from twisted.trial import unittest

from relay.wire import MAX_JSON_DEPTH, JSONTooDeep, loads


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


class LongPayloadDepthTests(unittest.TestCase):
    def test_a_long_flat_message_is_parsed(self) -> None:
        text = "[{" * 20_000  # brackets inside a string nest nothing
        body = loads(b'{"room":"r","id":7,"content":"' + text.encode() + b'"}')
        self.assertEqual(body["content"], text)

    def test_content_nested_past_the_limit_is_refused_however_long(self) -> None:
        # The object and MAX_JSON_DEPTH arrays: one level too many.
        for padding in (b"", b'"pad":"' + b"x" * 100_000 + b'",'):
            payload = b'{"room":"r",' + padding + b'"content":' + nested(MAX_JSON_DEPTH) + b"}"
            with self.assertRaises(JSONTooDeep):
                loads(payload)

    def test_content_nested_to_the_limit_is_parsed(self) -> None:
        payload = b'{"room":"r","content":' + nested(MAX_JSON_DEPTH - 1) + b"}"
        self.assertEqual(loads(payload)["room"], "r")

    def test_a_long_top_level_array_is_still_checked(self) -> None:
        with self.assertRaises(JSONTooDeep):
            loads(b"[" + b"0," * 1000 + nested(MAX_JSON_DEPTH) + b"]")
