"""Room registry: who is in which room, and fan-out of encoded frames."""

from __future__ import annotations

import re
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

    __slots__ = ("name", "_members", "_snapshot", "seq")

    def __init__(self, name: str) -> None:
        self.name = name
        self._members: dict[Member, None] = {}
        self._snapshot: tuple[Member, ...] = ()
        self.seq = 0

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

    def discard(self, member: Member) -> None:
        if self._members.pop(member, False) is None:
            self._snapshot = tuple(self._members)

    def broadcast(self, frame: bytes, exclude: Member | None = None) -> None:
        """Hand the same ``frame`` bytes to every member but ``exclude``.

        Iterates over a snapshot, so a member cut off during the loop (a slow
        consumer) does not disturb it.
        """
        for member in self._snapshot:
            if member is not exclude:
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
