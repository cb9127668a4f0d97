"""Shared fan-out entries and the batch that owns them until the flush.

A read from one client can carry hundreds of messages for the same room.
Rather than appending every frame to every member's outbox, consecutive
broadcasts to a room share one ``Fanout``: each member's outbox holds it
once, and the flush joins its frames once for all of them.

Ownership:

- The ``Batch`` (one per factory) owns every Fanout opened since the last
  flush, by room.  ``Batch.flush()`` forgets all of them and writes every
  dirty outbox, so no Fanout takes frames after its flush or keeps them
  alive once they are written.
- A room asks the batch for its open Fanout and may append to it only while
  it was made for the room's current members (``snapshot``) and the same
  excluded sender (``exclude``); otherwise it opens a new one.
- A member tracks its own tail entry: whatever it queues after a Fanout
  closes that Fanout (``close()``), so each outbox still lists its frames in
  the order they were produced.  ``join()`` closes it too: its bytes are
  made once and must not change afterwards.

The invariant that makes sharing safe: **a member holding an open Fanout
stays OPEN until the flush.**  A member that pauses (DRAINING) or closes
must not hold one, since a paused member counts its pending bytes frame by
frame and a closing one writes its outbox at once.  It holds because a
member only changes state when its transport is written to, which happens
at the flush (or in ``fail()``, which writes, and so joins, its outbox
first); ``RelayProtocol`` checks it under ``--debug``.

Metrics sample a batch now and then (``Batch.probe_next``) rather than
measuring every one, so the fan-out path does no work for them.
"""

from __future__ import annotations

from typing import Callable, Hashable, NamedTuple, Protocol


class Member(Hashable, Protocol):
    """What a room needs of a connection: a way to take encoded frames."""

    def enqueue(self, frame: bytes) -> None:
        """Queue one frame, after everything queued before it."""
        ...

    def enqueue_shared(self, fanout: Fanout) -> bool:
        """Queue ``fanout`` as one entry; False to be given its frames one by one."""
        ...

    def flush(self) -> None:
        """Write what is queued to the transport."""
        ...

    @property
    def queued_bytes(self) -> int:
        """Bytes queued and not yet written (read by a probe only)."""
        ...


class Fanout:
    """Frames broadcast to one room during one batch, shared by its members."""

    __slots__ = ("frames", "size", "closed", "snapshot", "exclude", "one_by_one", "joined", "framed")

    def __init__(self, snapshot: tuple[Member, ...], exclude: Member | None) -> None:
        self.frames: list[bytes] = []
        self.size = 0  # bytes of all the frames
        self.closed = False
        # The members it was made for, and the sender they exclude.
        self.snapshot = snapshot
        self.exclude = exclude
        # Members that take the frames one by one (paused ones).
        self.one_by_one: list[Member] = []
        # What join() made, for the members written after the first.
        self.joined: bytes | None = None
        # The frames as WebSocket messages, made once for all the WebSocket
        # members by relay.server.websocket (which closes the Fanout then).
        self.framed: bytes | None = None

    def append(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.size += len(frame)

    def close(self) -> None:
        """No frame may be added any more."""
        self.closed = True

    def join(self) -> bytes:
        """All the frames as one bytes object, made once; closes the Fanout."""
        self.closed = True
        if self.joined is None:
            frames = self.frames
            self.joined = frames[0] if len(frames) == 1 else b"".join(frames)
        return self.joined


def frames_of(entries: list[bytes | Fanout]) -> list[bytes]:
    """Outbox entries (frames and Fanouts) as single frames, in order."""
    frames: list[bytes] = []
    for entry in entries:
        if type(entry) is Fanout:
            frames.extend(entry.frames)
        else:
            frames.append(entry)
    return frames


class Probe(NamedTuple):
    """What one sampled batch did, from its first queued frame to its flush."""

    latency: float  # seconds from the first frame queued to the end of the writes
    fanout_sizes: list[tuple[int, int]]  # (members handed to, broadcasts) per Fanout
    queued_bytes: list[int]  # bytes each dirty outbox held when it was flushed


class Batch:
    """What one inbound read produced: dirty outboxes and the Fanouts opened."""

    def __init__(self) -> None:
        self.fanouts: dict[Hashable, Fanout] = {}
        self._dirty: list[Member] = []
        self.probing = False

    def probe_next(self, clock: Callable[[], float], observe: Callable[[Probe], None]) -> None:
        """Measure the next batch that queues a frame, once; then ``observe`` it.

        Until a probe is asked for, batches do no work for it: the probe
        shadows ``mark_dirty`` and then ``flush`` on this instance for one
        batch, and the class's own methods are back as soon as it is done.
        A probe asked for while one is pending is ignored.
        """
        if self.probing:
            return
        self.probing = True

        def first_mark_dirty(member: Member) -> None:
            del self.mark_dirty
            started = clock()

            def probed_flush() -> None:
                del self.flush
                self.probing = False
                sizes = [
                    (len(f.snapshot) - (f.exclude in f.snapshot), len(f.frames))
                    for f in self.fanouts.values()
                ]
                queued = [m.queued_bytes for m in self._dirty]
                self.flush()
                observe(Probe(clock() - started, sizes, queued))

            self.flush = probed_flush  # type: ignore[method-assign]
            self.mark_dirty(member)

        self.mark_dirty = first_mark_dirty  # type: ignore[method-assign]

    def mark_dirty(self, member: Member) -> None:
        """Remember that ``member`` has frames to write at the next flush."""
        self._dirty.append(member)

    def flush(self) -> None:
        """Write every outbox filled since the last flush; forget every Fanout.

        Forgotten, a Fanout can take no more frames: rooms find theirs here
        only.  Its holders have all been written to, so nothing keeps it.
        """
        dirty, self._dirty = self._dirty, []
        self.fanouts = {}
        for member in dirty:
            member.flush()
