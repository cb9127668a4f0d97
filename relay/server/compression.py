"""The compression extension on the server: options, and deliveries compressed once.

A connection that enabled ``compression`` in HELLO reads through an
``InflatingDecoder`` (``relay.compression``), and takes its deliveries in
their compressed form.  The fan-out path is left as it is for everyone else:
such a connection declines the room's shared ``Fanout`` (so the room hands
it each frame with ``enqueue``), and its own ``enqueue`` swaps a MESSAGE over
``--compress-min`` for the compressed variant the factory's
``DeliveryCompressor`` keeps for that very bytes object.  A broadcast hands
the same bytes object to every member in one loop, so it is compressed once
for all the compressing members of a room, on every node it reaches (frames
from other nodes take the same path).  Replies, errors and heartbeats are
sent as they are: they are small, and a client reads both forms anyway.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from relay.compression import DEFAULT_COMPRESS_LEVEL, DEFAULT_COMPRESS_MIN, compress_frame
from relay.server.fanout import Fanout
from relay.server.limits import parse_size
from relay.wire import HEADER_SIZE, MessageType

_MESSAGE = int(MessageType.MESSAGE)


def parse_level(value: str) -> int:
    """A zlib compression level, 1 (fastest) to 9 (smallest)."""
    level = int(value)
    if not 1 <= level <= 9:
        raise ValueError(f"{value} is not a zlib level from 1 to 9")
    return level


parse_level.coerceDoc = "From 1 (fastest) to 9 (smallest)."  # type: ignore[attr-defined]

OPTIONS = [
    ["compress-min", None, DEFAULT_COMPRESS_MIN, "Deliveries to clients that enabled compression are compressed when their payload is over this many bytes.", parse_size],
    ["compress-level", None, DEFAULT_COMPRESS_LEVEL, "zlib level of compressed deliveries.", parse_level],
]


def config_fields(options: Any) -> dict[str, Any]:
    """The RelayConfig fields of this module's options, from parsed options."""
    return {"compress_min": options["compress-min"], "compress_level": options["compress-level"]}


class DeliveryCompressor:
    """The compressed variant of the frame being broadcast, made once for all.

    It keeps one frame and its variant, by identity: every compressing
    member of a broadcast asks for the same bytes object in turn, and the
    next broadcast replaces it.  So it holds at most one delivery and its
    compressed form (two frames of at most the largest delivery) per server.
    """

    __slots__ = ("level", "threshold", "_frame", "_variant", "compressions", "bytes_before", "bytes_after")

    def __init__(self, level: int = DEFAULT_COMPRESS_LEVEL, minimum: int = DEFAULT_COMPRESS_MIN) -> None:
        self.level = level
        # Frames longer than this have a payload over the minimum.
        self.threshold = minimum + HEADER_SIZE
        self._frame: bytes | None = None
        self._variant: bytes | None = None
        # Run statistics: broadcasts compressed, and their bytes before and after.
        self.compressions = 0
        self.bytes_before = 0
        self.bytes_after = 0

    def variant(self, frame: bytes) -> bytes:
        """The compressed form of ``frame`` (``frame`` itself if zlib does not shrink it)."""
        if frame is self._frame:
            return self._variant  # type: ignore[return-value]
        variant = compress_frame(frame, self.level)
        self._frame = frame
        self._variant = variant
        self.compressions += 1
        self.bytes_before += len(frame)
        self.bytes_after += len(variant)
        return variant

    def serve(self, connection: Any) -> None:
        """Give ``connection`` its deliveries compressed from now on.

        It declines shared Fanouts, and its ``enqueue`` wraps the one it
        had.  The connection drops the override when it closes
        (``RelayProtocol.connectionLost``), which frees it at once.
        """
        connection.enqueue_shared = _decline
        connection.enqueue = self._compressing(connection.enqueue)

    def _compressing(self, enqueue: Callable[[bytes], None]) -> Callable[[bytes], None]:
        threshold = self.threshold
        variant = self.variant

        def compressing_enqueue(frame: bytes) -> None:
            if len(frame) > threshold and frame[5] == _MESSAGE:
                frame = variant(frame)
            enqueue(frame)

        return compressing_enqueue


def metrics_source(compressor: DeliveryCompressor) -> Callable[[], Iterable[Any]]:
    """A ``RelayCollector`` source: what compression did, read at scrape time."""
    from prometheus_client.core import CounterMetricFamily

    def collect() -> Iterable[Any]:
        yield CounterMetricFamily(
            "relay_compressed_broadcasts",
            "Deliveries compressed, once each for every compressing member of a room on this node.",
            value=compressor.compressions,
        )
        yield CounterMetricFamily(
            "relay_compression_input_bytes", "Bytes of the frames compressed.", value=compressor.bytes_before
        )
        yield CounterMetricFamily(
            "relay_compression_output_bytes",
            "Bytes of their compressed forms (the frame itself where zlib did not shrink it).",
            value=compressor.bytes_after,
        )

    return collect


def _decline(fanout: Fanout) -> bool:
    """Compressing members take each frame with ``enqueue``, never a shared Fanout."""
    return False
