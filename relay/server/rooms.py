"""Room registry: who is in which room, and fan-out of encoded frames."""

from __future__ import annotations

from relay.server.fanout import Batch, Fanout, Member


class Room:
    """A named set of members, in join order, with a publish counter ``seq``.

    Joining and leaving are O(1): the tuple a broadcast iterates is rebuilt
    lazily, at the next broadcast after a change, so a client churning
    JOIN/LEAVE in a big room costs nothing per request.
    """

    __slots__ = ("name", "_members", "_snapshot", "seq")

    def __init__(self, name: str) -> None:
        self.name = name
        self._members: dict[Member, None] = {}
        # What a broadcast iterates: a member cut off during the loop (a
        # slow consumer) cannot disturb it.  None after a change: a new
        # tuple is made for the next broadcast, so a Fanout made for the
        # old one is never reused for the new one, and a member that left
        # is not kept alive by a stale tuple.
        self._snapshot: tuple[Member, ...] | None = ()
        self.seq = 0

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, member: Member) -> bool:
        return member in self._members

    @property
    def members(self) -> tuple[Member, ...]:
        snapshot = self._snapshot
        if snapshot is None:
            snapshot = self._snapshot = tuple(self._members)
        return snapshot

    def add(self, member: Member) -> None:
        if member not in self._members:
            self._members[member] = None
            self._snapshot = None

    def discard(self, member: Member) -> None:
        if self._members.pop(member, False) is None:
            self._snapshot = None

    def broadcast(
        self, frame: bytes, exclude: Member | None = None, batch: Batch | None = None
    ) -> None:
        """Hand the same ``frame`` bytes to every member but ``exclude``.

        Consecutive broadcasts to the same members from the same sender in
        one ``batch`` share one ``Fanout`` (see ``relay.server.fanout``);
        without a batch nothing is shared.
        """
        snapshot = self._snapshot
        if snapshot is None:
            snapshot = self._snapshot = tuple(self._members)
        fanout = batch.fanouts.get(self) if batch is not None else None
        if (
            fanout is not None
            and not fanout.closed  # something was queued after it
            and fanout.snapshot is snapshot  # a member joined or left
            and fanout.exclude is exclude  # another sender
        ):
            fanout.append(frame)
            for member in fanout.one_by_one:
                member.enqueue(frame)
            return
        fanout = Fanout(snapshot, exclude)
        if batch is not None:
            batch.fanouts[self] = fanout
        fanout.append(frame)
        for member in snapshot:
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
