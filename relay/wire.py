"""Relay v1 wire format: a sans-IO codec.

Nothing here touches a socket, a reactor or a logger.  ``encode`` turns a frame
into bytes; ``Decoder`` turns bytes, split or coalesced any way the network
likes, back into frames, or raises ``ProtocolError`` at the first violation.

Frame layout (all integers big-endian)::

    length u32 | version u8 | type u8 | flags u8 | payload (length - 3 bytes)

``length`` counts the bytes after the length field itself.
"""

from __future__ import annotations

import enum
import json
import math
import re
import struct
from typing import Any, Iterator, NamedTuple, NoReturn

import orjson

VERSION = 1
HEADER = struct.Struct("!IBBB")
HEADER_SIZE = HEADER.size  # 7
LENGTH_SIZE = 4
MIN_LENGTH = HEADER_SIZE - LENGTH_SIZE  # version + type + flags
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024
# A delivery may exceed the sender's frame by at most this many bytes.
MAX_ENVELOPE = 512

_U16 = struct.Struct("!H")


class MessageType(enum.IntEnum):
    HELLO = 0x01
    JOIN_ROOM = 0x02
    LEAVE_ROOM = 0x03
    MESSAGE = 0x04
    HEARTBEAT = 0x05
    ERROR = 0x06
    # Extensions: decoded only on connections that negotiated them.
    PRESENCE = 0x07


# The types every connection knows; extension types are added per connection.
BASE_TYPES = frozenset(t for t in MessageType if t <= MessageType.ERROR)


class Flags(enum.IntFlag):
    NONE = 0
    JSON = 0x01
    BINARY = 0x02
    COMPRESSED = 0x04


# Bits 3-7 must be zero.
RESERVED_FLAGS = 0xFF & ~int(Flags.JSON | Flags.BINARY | Flags.COMPRESSED)

# Plain ints for the encoders, which run once per message: reading an enum
# member (``Flags.JSON``) costs a Python-level lookup, about 0.2 us each.
_JSON = int(Flags.JSON)
_BINARY = int(Flags.BINARY)
_MESSAGE = int(MessageType.MESSAGE)


class ErrorCode(enum.StrEnum):
    """Every ERROR code of Relay v1; ``fatal`` says whether it ends the connection."""

    INVALID_FRAME = "INVALID_FRAME"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
    UNKNOWN_MESSAGE_TYPE = "UNKNOWN_MESSAGE_TYPE"
    PARSE_ERROR = "PARSE_ERROR"
    UNAUTHORIZED = "UNAUTHORIZED"
    HEARTBEAT_TIMEOUT = "HEARTBEAT_TIMEOUT"
    SLOW_CONSUMER = "SLOW_CONSUMER"
    SERVER_SHUTDOWN = "SERVER_SHUTDOWN"
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"
    BAD_REQUEST = "BAD_REQUEST"
    INVALID_ROOM = "INVALID_ROOM"
    NOT_IN_ROOM = "NOT_IN_ROOM"
    RATE_LIMITED = "RATE_LIMITED"
    FORBIDDEN = "FORBIDDEN"
    USER_OFFLINE = "USER_OFFLINE"

    @property
    def fatal(self) -> bool:
        return self not in _NON_FATAL


_NON_FATAL = frozenset(
    {
        ErrorCode.BAD_REQUEST,
        ErrorCode.INVALID_ROOM,
        ErrorCode.NOT_IN_ROOM,
        ErrorCode.RATE_LIMITED,
        ErrorCode.FORBIDDEN,
        ErrorCode.USER_OFFLINE,
    }
)


class ProtocolError(Exception):
    """A violation of Relay v1, carrying the ERROR code that reports it."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class Frame(NamedTuple):
    """One decoded frame.  ``type`` is a ``MessageType`` for the base types."""

    type: int
    flags: int
    payload: bytes = b""

    @property
    def is_json(self) -> bool:
        return bool(self.flags & Flags.JSON)

    @property
    def is_binary(self) -> bool:
        return bool(self.flags & Flags.BINARY)


def encode(type: int, flags: int = 0, payload: bytes = b"") -> bytes:
    """Return the wire bytes of one frame."""
    return HEADER.pack(MIN_LENGTH + len(payload), VERSION, type, flags) + payload


def encode_json(type: int, body: Any) -> bytes:
    """Return the wire bytes of a frame whose payload is ``body`` as JSON."""
    try:  # dumps() without its call, in the common case: once per delivery
        payload = orjson.dumps(body)
    except TypeError:
        payload = dumps(body)
    return HEADER.pack(MIN_LENGTH + len(payload), VERSION, type, _JSON) + payload


def encode_error(code: ErrorCode, message: str, request_id: Any = None) -> bytes:
    """Return the wire bytes of an ERROR frame."""
    body: dict[str, Any] = {"code": code.value, "message": message, "fatal": code.fatal}
    if request_id is not None:
        body["id"] = request_id
    return encode_json(MessageType.ERROR, body)


class Decoder:
    """Incremental frame decoder.

    Feed it bytes as they arrive; it yields each complete frame.  Header checks
    run as soon as the 7 header bytes are in, so an oversize or malformed frame
    is refused before its payload is buffered.  After it has raised, it stays
    broken: every later ``feed`` raises the same error.

    The read position is committed frame by frame, before each frame is
    yielded: a caller may stop iterating at any point, feed more bytes later,
    and still get every frame once, in order (from the new iterator or the
    old one alike).
    """

    __slots__ = (
        "max_frame_size", "known_types", "_allow_compressed", "_valid_flags",
        "_data", "_offset", "_error",
    )

    def __init__(
        self,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        known_types: frozenset[int] = BASE_TYPES,
        allow_compressed: bool = False,
    ) -> None:
        self.max_frame_size = max_frame_size
        self.known_types = known_types
        self.allow_compressed = allow_compressed
        # Received bytes and the position of the first one not yet decoded.
        # A read that leaves nothing behind is parsed in place (frames are
        # cut straight out of it, one copy each); only a partial frame is
        # carried over, in a bytearray that later reads extend.
        self._data: bytes | bytearray = b""
        self._offset = 0
        self._error: ProtocolError | None = None

    @property
    def allow_compressed(self) -> bool:
        """Whether the COMPRESSED flag is accepted (once negotiated)."""
        return self._allow_compressed

    @allow_compressed.setter
    def allow_compressed(self, allow: bool) -> None:
        self._allow_compressed = allow
        # Every acceptable flags byte, so the common case is one set lookup.
        self._valid_flags = _VALID_FLAGS[bool(allow)]

    @property
    def buffered(self) -> int:
        """How many received bytes wait for the rest of their frame."""
        return len(self._data) - self._offset

    def feed(self, data: bytes) -> Iterator[Frame]:
        """Add ``data`` and yield every frame now complete, in order.

        Raises ``ProtocolError`` when the stream reaches a violation; frames
        before it are yielded first.  Frames not taken stay buffered for the
        next iteration.
        """
        if self._error is not None:
            raise self._error
        left = len(self._data) - self._offset
        if not left:
            self._data = data if type(data) is bytes else bytes(data)
        elif type(self._data) is bytearray:
            del self._data[: self._offset]
            self._data += data
        else:
            self._data = bytearray(memoryview(self._data)[self._offset :]) + data
        self._offset = 0
        return self._frames()

    def _frames(self) -> Iterator[Frame]:
        unpack = HEADER.unpack_from
        # Half the cost of calling Frame(...), which goes through Python code
        # (~200 ns a frame, about 4 % of a message's cost in s3).
        new_tuple = tuple.__new__
        max_length = self.max_frame_size
        known_types = self.known_types
        valid_flags = self._valid_flags
        while True:
            # Read back on every step: another iterator may have moved on.
            data = self._data
            offset = self._offset
            available = len(data) - offset
            if available < HEADER_SIZE:
                error = self._partial_header_error(data, offset)
                if error is not None:
                    self._fail(error)
                return
            length, version, type_, flags = unpack(data, offset)
            if not (
                MIN_LENGTH <= length <= max_length
                and version == VERSION
                and type_ in known_types
                and flags in valid_flags
            ):
                self._fail(self._header_error(length, version, type_, flags))
            if LENGTH_SIZE + length > available:
                return
            end = offset + LENGTH_SIZE + length
            start = offset + HEADER_SIZE
            if type(data) is bytes:
                payload = data[start:end]
            else:
                payload = bytes(memoryview(data)[start:end])
            self._offset = end
            yield new_tuple(Frame, (type_, flags, payload))

    def _fail(self, error: ProtocolError) -> NoReturn:
        self._error = error
        self._data = b""
        self._offset = 0
        raise error

    def _partial_header_error(self, data: bytes | bytearray, offset: int) -> ProtocolError | None:
        """The violation already visible in a header's first bytes, if any."""
        available = len(data) - offset
        if available >= LENGTH_SIZE:
            (length,) = struct.unpack_from("!I", data, offset)
            error = self._length_error(length)
            if error is not None:
                return error
        if available > LENGTH_SIZE:
            return _version_error(data[offset + LENGTH_SIZE])
        return None

    def _header_error(self, length: int, version: int, type_: int, flags: int) -> ProtocolError:
        """The violation in a complete header that failed the fast check."""
        error = self._length_error(length) or _version_error(version)
        if error is not None:
            return error
        if type_ not in self.known_types:
            return ProtocolError(
                ErrorCode.UNKNOWN_MESSAGE_TYPE, f"message type 0x{type_:02x} is not known"
            )
        return ProtocolError(ErrorCode.INVALID_FRAME, _flags_problem(flags, self.allow_compressed))

    def _length_error(self, length: int) -> ProtocolError | None:
        if length < MIN_LENGTH:
            return ProtocolError(
                ErrorCode.INVALID_FRAME, f"length {length} is less than {MIN_LENGTH}"
            )
        if length > self.max_frame_size:
            return ProtocolError(
                ErrorCode.FRAME_TOO_LARGE,
                f"length {length} exceeds the maximum frame size {self.max_frame_size}",
            )
        return None


def _version_error(version: int) -> ProtocolError | None:
    if version != VERSION:
        return ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"version {version} is not supported; this server speaks {VERSION}",
        )
    return None


def _flags_problem(flags: int, allow_compressed: bool) -> str | None:
    """Why a flags byte is invalid, or None if it is valid."""
    if flags & RESERVED_FLAGS:
        return f"reserved flag bits set in 0x{flags:02x}"
    if flags & Flags.JSON and flags & Flags.BINARY:
        return "the JSON and BINARY flags are exclusive"
    if flags & Flags.COMPRESSED and not allow_compressed:
        return "compression was not negotiated"
    return None


# Made once: building it costs about 100 us, once per connection otherwise.
_VALID_FLAGS = {
    allow: frozenset(flags for flags in range(256) if _flags_problem(flags, allow) is None)
    for allow in (False, True)
}


# JSON: orjson parses and decides what is valid (strict RFC 8259: no NaN or
# Infinity, no lone surrogates, no byte-order mark).  It turns integers
# beyond 64 bits into floats, and refuses integers beyond a double's range,
# so a payload that may hold one (a run of 19 digits) is read again by the
# standard library, which keeps integers exact, under the same rules.
_LONG_DIGIT_RUN = re.compile(rb"\d{19}")
_LONG_INTEGER = re.compile(rb"-?\d{19}")
# orjson's own limit: deeper is not JSON at all (PARSE_ERROR).
_PARSER_DEPTH = 1024
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
# The one nesting limit for every JSON payload, requests and deliveries
# alike: under orjson's own (1024), and shallow enough that the standard
# library's parser and serialiser, which recurse, never reach Python's
# recursion limit.  A delivery nests the content one level deeper than the
# request did, and is still within it.
MAX_JSON_DEPTH = 512


class JSONTooDeep(ValueError):
    """Valid JSON nested deeper than ``MAX_JSON_DEPTH``: refused, not a violation.

    ``value`` is what was parsed, when it could be (to find a request's id).
    """

    def __init__(self, value: Any = None) -> None:
        super().__init__(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        self.value = value


def loads(payload: bytes) -> Any:
    """Parse a JSON payload, raising PARSE_ERROR if it is not UTF-8 JSON.

    Integers of any size are kept exact; other numbers must fit a double.
    Nesting deeper than ``MAX_JSON_DEPTH`` raises ``JSONTooDeep``.
    """
    try:
        value = orjson.loads(payload)
    except ValueError as error:
        # Only an integer beyond a double's range, where orjson stopped, is
        # worth a second parse; anything else it refused is not JSON.
        position = getattr(error, "pos", None)
        if position is None or _LONG_INTEGER.match(payload, position) is None:
            raise ProtocolError(ErrorCode.PARSE_ERROR, f"payload is not JSON: {error}") from None
        value = _exact_loads(payload)
    else:
        # An integer orjson widened is a float in its result: only then is
        # the payload worth scanning, which costs far more than the parse.
        if _has_float(value) and _LONG_DIGIT_RUN.search(payload) is not None:
            value = _exact_loads(payload)
    # Nesting past the limit needs that many brackets: most payloads are too
    # short to hold them, and counting is far cheaper than walking.  An
    # object of scalars (a chat message: room, id, text) is one level deep
    # however long: checking that is cheaper still than counting its bytes.
    if (
        len(payload) > 2 * MAX_JSON_DEPTH
        and not _flat_object(value)
        and payload.count(b"[") + payload.count(b"{") > MAX_JSON_DEPTH
        and _deeper_than(value, MAX_JSON_DEPTH)
    ):
        raise JSONTooDeep(value)
    return value


def _flat_object(value: Any) -> bool:
    """Whether ``value`` is an object whose values are all scalars."""
    if type(value) is not dict:
        return False
    for item in value.values():
        kind = type(item)
        if kind is dict or kind is list:
            return False
    return True


def _exact_loads(payload: bytes) -> Any:
    """The standard library's parse, keeping integers exact, as strict as orjson's."""
    try:
        if payload.startswith(b"\xef\xbb\xbf"):
            raise ValueError("a byte-order mark is not JSON")
        value = json.loads(
            payload.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float
        )
        _check_strings(value)
        return value
    except RecursionError:
        # The standard library recurses: past orjson's limit, not JSON either.
        if _bracket_depth(payload) > _PARSER_DEPTH:
            raise ProtocolError(
                ErrorCode.PARSE_ERROR, f"payload is not JSON: nested deeper than {_PARSER_DEPTH} levels"
            ) from None
        raise JSONTooDeep() from None
    except ValueError as error:
        raise ProtocolError(ErrorCode.PARSE_ERROR, f"payload is not JSON: {error}") from None


def _bracket_depth(payload: bytes) -> int:
    """How deep a JSON text's brackets nest, strings aside (a rare path)."""
    brackets = _JSON_STRING.sub(b"", payload).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if number in (math.inf, -math.inf):
        raise ValueError("number is beyond the range of a double")
    return number


def _check_strings(value: Any) -> None:
    """Refuse strings holding a lone surrogate (escaped in the JSON), as orjson does."""
    pending = [value]
    while pending:
        value = pending.pop()
        if type(value) is dict:
            pending.extend(value.keys())
            pending.extend(value.values())
        elif type(value) is list:
            pending.extend(value)
        elif type(value) is str:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a lone surrogate is not valid in a string") from None


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests containers more than ``limit`` deep."""
    pending = [(value, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > limit:
            return True
        items = value.values() if type(value) is dict else value if type(value) is list else ()
        for item in items:
            if type(item) is dict or type(item) is list:
                pending.append((item, depth + 1))
    return False


def _has_float(value: Any) -> bool:
    """Whether a parsed JSON value holds a float anywhere."""
    if type(value) is dict:
        # Most messages are an object of scalars: one pass in C says so.
        kinds = set(map(type, value.values()))
        if float in kinds:
            return True
        if dict not in kinds and list not in kinds:
            return False
    pending = [value]
    while pending:
        value = pending.pop()
        kind = type(value)
        if kind is dict:
            value = value.values()
        elif kind is not list:
            if kind is float:
                return True
            continue
        # Only containers go on the stack: most values are scalars.
        for item in value:
            kind = type(item)
            if kind is float:
                return True
            if kind is dict or kind is list:
                pending.append(item)
    return False


def dumps(value: Any) -> bytes:
    """Serialise ``value`` as compact UTF-8 JSON.

    Raises ValueError for a value too deeply nested to write.
    """
    try:
        return orjson.dumps(value)
    except TypeError:  # integers beyond 64 bits, or nesting beyond orjson's 254 levels
        pass
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except RecursionError:
        raise ValueError("value nested too deeply to serialise") from None


def encode_binary_message(room: str, data: bytes) -> bytes:
    """Payload of a client's binary MESSAGE: ``u16 room length | room | data``."""
    room_bytes = room.encode()
    return _U16.pack(len(room_bytes)) + room_bytes + data


def decode_binary_message(payload: bytes) -> tuple[str, bytes]:
    """Split a client's binary MESSAGE payload into ``(room, data)``."""
    room, offset = _read_string(payload, 0)
    return room, payload[offset:]


def encode_binary_delivery(room: str, sender: str, data: bytes) -> bytes:
    """Payload of a binary MESSAGE delivered to members."""
    room_bytes = room.encode()
    sender_bytes = sender.encode()
    return b"".join(
        (
            _U16.pack(len(room_bytes)),
            room_bytes,
            _U16.pack(len(sender_bytes)),
            sender_bytes,
            data,
        )
    )


def split_binary_message(payload: bytes) -> tuple[str, int]:
    """The room of a client's binary MESSAGE, and where its data starts."""
    return _read_string(payload, 0)


def encode_binary_delivery_frame(room: str, sender: str, message: bytes, start: int) -> bytes:
    """Wire bytes of the binary MESSAGE delivering ``message[start:]``.

    Built with a single copy of the data, which may be large.
    """
    room_bytes = room.encode()
    sender_bytes = sender.encode()
    data = memoryview(message)[start:]
    payload_size = 2 * _U16.size + len(room_bytes) + len(sender_bytes) + len(data)
    return b"".join(
        (
            HEADER.pack(MIN_LENGTH + payload_size, VERSION, _MESSAGE, _BINARY),
            _U16.pack(len(room_bytes)),
            room_bytes,
            _U16.pack(len(sender_bytes)),
            sender_bytes,
            data,
        )
    )


def decode_binary_delivery(payload: bytes) -> tuple[str, str, bytes]:
    """Split a delivered binary MESSAGE payload into ``(room, sender, data)``."""
    room, offset = _read_string(payload, 0)
    sender, offset = _read_string(payload, offset)
    return room, sender, payload[offset:]


def _read_string(payload: bytes, offset: int) -> tuple[str, int]:
    if len(payload) < offset + _U16.size:
        raise ProtocolError(ErrorCode.INVALID_FRAME, "binary payload too short for its header")
    (size,) = _U16.unpack_from(payload, offset)
    start = offset + _U16.size
    end = start + size
    if len(payload) < end:
        raise ProtocolError(ErrorCode.INVALID_FRAME, "binary name runs past the payload")
    try:
        return payload[start:end].decode("utf-8"), end
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.INVALID_FRAME, "binary name is not UTF-8") from None
