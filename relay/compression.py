"""The compression extension: zlib payloads (RFC 1950), flag 0x04, sans-IO.

Shared by the server and the client library.  Nothing here touches a
socket, a reactor or a logger.

- ``inflate(payload, limit)`` decompresses at most ``limit`` bytes, however
  well the payload compresses: a zip bomb costs its ``limit`` and no more,
  and is refused with FRAME_TOO_LARGE as soon as its output passes it.
- ``InflatingDecoder`` wraps a ``relay.wire.Decoder`` once compression is
  negotiated: it accepts the COMPRESSED flag and yields every frame as it
  would have been sent uncompressed, so the code after it never sees 0x04.
- ``compress_frame(frame, level)`` turns the wire bytes of a frame into
  those of its compressed form (or returns them unchanged when zlib does
  not make them smaller).
"""

from __future__ import annotations

import zlib
from typing import Iterator

from relay.wire import (
    HEADER,
    HEADER_SIZE,
    MIN_LENGTH,
    VERSION,
    Decoder,
    ErrorCode,
    Flags,
    Frame,
    ProtocolError,
)

# The HELLO feature that enables it.
COMPRESSION = "compression"
# Payloads of at most this many bytes are sent as they are.
DEFAULT_COMPRESS_MIN = 1024
# zlib level 1: on JSON it keeps most of level 6's savings for less than
# half its CPU (docs/performance.md has the figures).
DEFAULT_COMPRESS_LEVEL = 1

_COMPRESSED = int(Flags.COMPRESSED)
_NOT_COMPRESSED = 0xFF & ~_COMPRESSED


def inflate(payload: bytes, limit: int) -> bytes:
    """The decompressed ``payload``, one complete zlib stream of at most ``limit`` bytes.

    Raises ``ProtocolError``: FRAME_TOO_LARGE as soon as the output would
    pass ``limit`` (at most ``limit + 1`` bytes are ever produced), and
    INVALID_FRAME for a stream that is corrupt, truncated or followed by
    other bytes.
    """
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(payload, limit + 1)
    except zlib.error as error:
        raise ProtocolError(ErrorCode.INVALID_FRAME, f"compressed payload is not a zlib stream: {error}") from None
    if len(data) > limit:
        raise ProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"compressed payload inflates to more than {limit} bytes",
        )
    if not inflater.eof:
        raise ProtocolError(ErrorCode.INVALID_FRAME, "compressed payload ends before its zlib stream does")
    if inflater.unused_data:
        raise ProtocolError(ErrorCode.INVALID_FRAME, "bytes follow the zlib stream in a compressed payload")
    return data


def inflate_frame(frame: Frame, max_frame_size: int) -> Frame:
    """``frame`` as it was before compression, its length within ``max_frame_size``."""
    payload = inflate(frame.payload, max(0, max_frame_size - MIN_LENGTH))
    return Frame(frame.type, frame.flags & _NOT_COMPRESSED, payload)


def compress_frame(frame: bytes, level: int = DEFAULT_COMPRESS_LEVEL) -> bytes:
    """The wire bytes of ``frame`` with its payload compressed and flag 0x04 set.

    ``frame`` itself (the same object) when compressing would not make it
    smaller, as for data that is already compressed.
    """
    payload = memoryview(frame)[HEADER_SIZE:]
    packed = zlib.compress(payload, level)
    if len(packed) >= len(payload):
        return frame
    return HEADER.pack(MIN_LENGTH + len(packed), VERSION, frame[5], frame[6] | _COMPRESSED) + packed


class InflatingDecoder:
    """A ``Decoder`` that accepts compressed frames and yields them inflated.

    It takes over the given decoder (what it has buffered included) and
    lets it accept the COMPRESSED flag.  Inflated payloads are bounded by
    the decoder's ``max_frame_size``, like the frames it reads.  After it
    has raised, it stays broken, as a ``Decoder`` does.
    """

    __slots__ = ("_decoder", "_error")

    def __init__(self, decoder: Decoder) -> None:
        decoder.allow_compressed = True
        self._decoder = decoder
        self._error: ProtocolError | None = None

    @property
    def max_frame_size(self) -> int:
        return self._decoder.max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, size: int) -> None:
        self._decoder.max_frame_size = size

    @property
    def buffered(self) -> int:
        """How many received bytes wait for the rest of their frame."""
        return self._decoder.buffered

    def feed(self, data: bytes) -> Iterator[Frame]:
        """As ``Decoder.feed``; a payload that does not inflate raises ``ProtocolError``."""
        if self._error is not None:
            raise self._error
        return self._inflated(self._decoder.feed(data))

    def _inflated(self, frames: Iterator[Frame]) -> Iterator[Frame]:
        decoder = self._decoder
        for frame in frames:
            if frame.flags & _COMPRESSED:
                try:
                    frame = inflate_frame(frame, decoder.max_frame_size)
                except ProtocolError as error:
                    self._error = error
                    raise
            yield frame
