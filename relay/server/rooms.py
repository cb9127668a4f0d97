"""Room registry: who is in which room, and fan-out of encoded frames."""

from __future__ import annotations

import re
import weakref
from typing import Hashable, Protocol

MAX_ROOM_NAME = 64
# Unicode category Cc is exactly these two ranges.
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")
# Unicode's White_Space property (str.strip() alone also trims U+001C-U+001F).
WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


class Member(Hashable, Protocol):
    """What a room needs of a connection: a way to take an encoded frame."""

    def enqueue(self, frame: bytes) -> None: ...

    def enqueue_shared(self, fanout: Fanout) -> bool:
        """Queue ``fanout`` as one entry; False to be given its frames one by one."""
        ...


class Fanout:
    """Frames broadcast to one room during one read, shared by its members.

    Each member's outbox holds the Fanout once instead of every frame, and
    the flush joins the frames once for all of them, so a broadcast costs
    one list append however many members there are.  Frames may be added
    only while the Fanout is the last entry of every outbox holding it:
    whatever is queued after it for one of them, and the flush (``join``),
    closes it, and the next broadcast starts another.
    """

    __slots__ = (
        "frames",
        "size",
        "closed",
        "batch",
        "snapshot",
        "exclude",
        "one_by_one",
        "_joined",
        "__weakref__",
    )

    def __init__(
        self, batch: object, snapshot: tuple[Member, ...], exclude: Member | None
    ) -> None:
        self.frames: list[bytes] = []
        self.size = 0
        self.closed = False
        # The flush it goes out with, the members and the sender it was made
        # for: another flush or another set needs another Fanout.
        self.batch = batch
        self.snapshot = snapshot
        self.exclude = exclude
        # Members that take the frames one by one (paused or traced ones).
        self.one_by_one: list[Member] = []
        self._joined: bytes | None = None

    def __len__(self) -> int:
        """Bytes of all the frames: what it adds to an outbox."""
        return self.size

    def append(self, frame: bytes) -> None:
        self.frames.append(frame)
        self.size += len(frame)

    def join(self) -> bytes:
        """All the frames as one bytes object, made once; closes the Fanout."""
        self.closed = True
        if self._joined is None:
            frames = self.frames
            self._joined = frames[0] if len(frames) == 1 else b"".join(frames)
        return self._joined


def normalize_room_name(name: str) -> str | None:
    """Return the room that ``name`` designates, or None if it is not valid.

    Names are trimmed of white space; the trimmed name must be 1-64 code points with no
    control character.
    """
    name = name.strip(WHITE_SPACE)
    if not 0 < len(name) <= MAX_ROOM_NAME or _CONTROL_CHARACTER.search(name):
        return None
    return name


def has_control_character(text: str) -> bool:
    return _CONTROL_CHARACTER.search(text) is not None


class Room:
    """A named set of members, in join order, with a publish counter ``seq``."""

    __slots__ = ("name", "_members", "_snapshot", "seq", "_fanout")

    def __init__(self, name: str) -> None:
        self.name = name
        self._members: dict[Member, None] = {}
        self._snapshot: tuple[Member, ...] = ()
        self.seq = 0
        # The outboxes hold the Fanout; the room only keeps track of it, so a
        # room never keeps frames alive once they are written.
        self._fanout: weakref.ref[Fanout] | None = None

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, member: Member) -> bool:
        return member in self._members

    @property
    def members(self) -> tuple[Member, ...]:
        return self._snapshot

    def add(self, member: Member) -> None:
        if member not in self._members:
            self._members[member] = None
            self._snapshot = tuple(self._members)
            self._fanout = None  # it was for the old members

    def discard(self, member: Member) -> None:
        if self._members.pop(member, False) is None:
            self._snapshot = tuple(self._members)
            self._fanout = None

    def broadcast(
        self, frame: bytes, exclude: Member | None = None, batch: object = None
    ) -> None:
        """Hand the same ``frame`` bytes to every member but ``exclude``.

        Consecutive broadcasts to the same members under the same ``batch``
        (the caller's flush; None shares nothing) go into one ``Fanout``
        (see there).  Iterates over a snapshot, so a member cut off during
        the loop (a slow consumer) does not disturb it.
        """
        fanout = self._fanout() if self._fanout is not None else None
        if (
            fanout is not None
            and batch is not None
            and fanout.batch == batch
            and not fanout.closed
            and fanout.snapshot is self._snapshot
            and fanout.exclude is exclude
        ):
            fanout.append(frame)
            for member in fanout.one_by_one:
                member.enqueue(frame)
            return
        fanout = Fanout(batch, self._snapshot, exclude)
        self._fanout = weakref.ref(fanout)
        fanout.append(frame)
        for member in self._snapshot:
            if member is not exclude and not member.enqueue_shared(fanout):
                fanout.one_by_one.append(member)
                member.enqueue(frame)


class RoomRegistry:
    """Every live room by name.  A room exists while it has members."""

    def __init__(self) -> None:
        self._rooms: dict[str, Room] = {}
        self.peak_rooms = 0

    def __len__(self) -> int:
        return len(self._rooms)

    def __contains__(self, name: str) -> bool:
        return name in self._rooms

    def get(self, name: str) -> Room | None:
        return self._rooms.get(name)

    def join(self, member: Member, name: str) -> Room:
        """Add ``member`` to room ``name``, creating it; return the room."""
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = Room(name)
            self.peak_rooms = max(self.peak_rooms, len(self._rooms))
        room.add(member)
        return room

    def leave(self, member: Member, name: str) -> None:
        """Remove ``member`` from room ``name``; the last one out deletes it."""
        room = self._rooms.get(name)
        if room is None:
            return
        room.discard(member)
        if not room:
            del self._rooms[name]
