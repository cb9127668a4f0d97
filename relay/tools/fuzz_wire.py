"""Coverage-guided fuzzing of the decoder and the request parser (atheris).

Each input is a byte stream as a client could send it.  It is decoded in
one piece and again split at a point the input chooses; both must give the
same frames and the same error.  Every frame is then parsed as the server
would parse it.  A run fails (the fuzzer stops with the input that did it)
on any exception other than the codec's and the parser's own refusals, or
when a property below does not hold:

- the decoder yields the same frames however the bytes are split, and
  re-encoding them gives back exactly the bytes it consumed;
- a refusal is a ``ProtocolError`` with a fatal code or a ``RequestError``
  with a non-fatal one, and its message is bounded;
- a parsed JSON payload can be written again, and a parsed room name is a
  valid one.

Run (``docs/security.md`` has the figures of the last campaign)::

    python -m relay.tools.fuzz_wire -runs=10000000 [-max_len=4096] [CORPUS_DIR ...]

``--seed-corpus DIR`` writes a few valid streams to start from.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

from relay.requests import (
    RequestError,
    normalize_room_name,
    parse_binary_publish,
    parse_hello,
    parse_publish,
    parse_room_request,
)
from relay.wire import (
    Decoder,
    Flags,
    Frame,
    JSONTooDeep,
    MessageType,
    ProtocolError,
    dumps,
    encode,
    encode_binary_message,
    encode_json,
    loads,
)

# Small, so the fuzzer reaches FRAME_TOO_LARGE with short inputs too.
MAX_FRAME_SIZE = 4096
# No refusal message may echo more than this many characters.
MAX_MESSAGE = 512

_PARSERS = {
    MessageType.HELLO: parse_hello,
    MessageType.JOIN_ROOM: parse_room_request,
    MessageType.LEAVE_ROOM: parse_room_request,
}


def decode_all(data: bytes, split: int) -> tuple[list[Frame], ProtocolError | None, int]:
    """Frames, the error if any, and the bytes consumed, feeding ``data`` in two reads."""
    decoder = Decoder(MAX_FRAME_SIZE)
    frames: list[Frame] = []
    error = None
    try:
        for part in (data[:split], data[split:]):
            frames.extend(decoder.feed(part))
    except ProtocolError as problem:
        error = problem
    consumed = sum(4 + 3 + len(frame.payload) for frame in frames)
    return frames, error, consumed


def check_request(frame: Frame) -> None:
    """Parse ``frame`` as the server would; raise AssertionError on a broken property."""
    try:
        if frame.type == MessageType.MESSAGE:
            if frame.flags & Flags.BINARY:
                name, start = parse_binary_publish(frame)
                assert 0 <= start <= len(frame.payload)
            else:
                _, name, content = parse_publish(frame)
                assert isinstance(name, str)
                dumps({"content": content})
            room = normalize_room_name(name)
            assert room is None or 0 < len(room) <= 64
        elif frame.type in _PARSERS:
            request = _PARSERS[frame.type](frame)
            room = getattr(request, "room", None)
            assert room is None or normalize_room_name(room) == room
        elif frame.flags & Flags.JSON:
            try:
                dumps(loads(frame.payload))
            except JSONTooDeep:
                pass
    except RequestError as refusal:
        assert not refusal.code.fatal, refusal.code
        assert len(refusal.message) <= MAX_MESSAGE, refusal.message[:80]
    except ProtocolError as violation:
        assert violation.code.fatal, violation.code
        assert len(violation.message) <= MAX_MESSAGE, violation.message[:80]


def test_one_input(data: bytes) -> None:
    """The fuzz target: one client byte stream."""
    if not data:
        return
    split = data[0] % (len(data) + 1)
    stream = data[1:]
    whole = decode_all(stream, len(stream))
    parts = decode_all(stream, min(split, len(stream)))
    assert whole[0] == parts[0], "frames depend on how the bytes were split"
    assert str(whole[1]) == str(parts[1]), (whole[1], parts[1])
    frames, error, consumed = whole
    assert b"".join(encode(f.type, f.flags, f.payload) for f in frames) == stream[:consumed]
    if error is not None:
        assert error.code.fatal and len(error.message) <= MAX_MESSAGE
    for frame in frames:
        check_request(frame)


def seed_streams() -> list[bytes]:
    """A few valid streams, one of each request, for a starting corpus."""
    return [
        encode(MessageType.HEARTBEAT),
        encode_json(MessageType.HELLO, {"userId": "alice", "echo": True, "features": [], "id": 1}),
        encode_json(MessageType.JOIN_ROOM, {"room": " lobby ", "id": "j"}),
        encode_json(MessageType.LEAVE_ROOM, {"room": "lobby"}),
        encode_json(MessageType.MESSAGE, {"room": "lobby", "content": {"n": [1, 2.5, None, "x"]}}),
        encode_json(MessageType.MESSAGE, {"room": "r", "content": 12345678901234567890123}),
        encode(MessageType.MESSAGE, Flags.BINARY, encode_binary_message("lobby", b"\x00\xff")),
        encode(MessageType.HEARTBEAT) * 3 + encode_json(MessageType.JOIN_ROOM, {"room": "é"}),
    ]


def write_seed_corpus(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for number, stream in enumerate(seed_streams()):
        # The first byte picks the split point.
        with open(os.path.join(directory, f"seed-{number}"), "wb") as seed:
            seed.write(bytes([number * 7]) + stream)


def _instrument_module(atheris: Any, module: Any) -> None:
    """Instrument the functions and methods defined in ``module``."""
    for value in vars(module).values():
        if getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(value):
            atheris.instrument_func(value)
        elif inspect.isclass(value):
            for member in vars(value).values():
                function = getattr(member, "fget", member)
                if inspect.isfunction(function):
                    atheris.instrument_func(function)


def main(argv: list[str] | None = None) -> Any:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) == 3 and argv[1] == "--seed-corpus":
        write_seed_corpus(argv[2])
        return 0
    import atheris

    # Coverage of the codec and the parser only: instrumenting everything
    # loaded (the standard library too) makes each run several times slower.
    for module in (sys.modules["relay.wire"], sys.modules["relay.requests"]):
        _instrument_module(atheris, module)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
