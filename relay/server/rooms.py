"""Room registry: who is in which room, and fan-out of encoded frames."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from twisted.internet import defer

from relay.server.backplane import IBackplane, LocalBackplane
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
        self,
        frame: bytes,
        exclude: Member | None = None,
        batch: Batch | None = None,
        origin: str | None = None,
    ) -> None:
        """Hand the same ``frame`` bytes to every member but ``exclude``.

        Consecutive broadcasts to the same members from the same sender in
        one ``batch`` share one ``Fanout`` (see ``relay.server.fanout``);
        without a batch nothing is shared.  ``origin``, the publishing
        connection's id, matters to rooms that forward to other nodes.
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


class ForwardingRoom(Room):
    """A room of one node of a cluster.

    Its broadcasts also go to the backplane, for the members on the other
    nodes; the other nodes' broadcasts come in through ``deliver``, already
    encoded, and are handed to the local members like local ones.
    """

    __slots__ = ("_backplane",)

    def __init__(self, name: str, backplane: IBackplane) -> None:
        super().__init__(name)
        self._backplane = backplane

    def broadcast(
        self,
        frame: bytes,
        exclude: Member | None = None,
        batch: Batch | None = None,
        origin: str | None = None,
    ) -> None:
        Room.broadcast(self, frame, exclude, batch)
        self._backplane.forward(self.name, frame, origin, batch)

    def deliver(self, frames: list[bytes], batch: Batch | None) -> None:
        """Hand frames broadcast on another node to every local member."""
        broadcast = Room.broadcast
        for frame in frames:
            broadcast(self, frame, None, batch)


class RoomRegistry:
    """Every live room by name.  A room exists while it has members.

    In a cluster the registry tells its ``backplane`` who joins and leaves,
    and its rooms forward their broadcasts (``ForwardingRoom``).
    """

    def __init__(self, backplane: IBackplane | None = None) -> None:
        self._rooms: dict[str, Room] = {}
        # The room named, or None: the dict's own get, with no Python frame,
        # since every published message looks its room up.
        self.get: Callable[[str], Room | None] = self._rooms.get
        self.peak_rooms = 0
        self.backplane: IBackplane = backplane if backplane is not None else LocalBackplane()
        self._forwarding = self.backplane.clustered
        # Makes each new room, when an extension needs rooms of its own
        # kind (relay.server.history); else Room or ForwardingRoom.
        self.make_room: Callable[[str], Room] | None = None
        # Told of every change of membership (relay.server.presence): an
        # object with joined(room, member) and left(room, member), or None.
        self.watcher: Any = None

    def __len__(self) -> int:
        return len(self._rooms)

    def __contains__(self, name: str) -> bool:
        return name in self._rooms

    def __iter__(self) -> Iterator[Room]:
        """Every live room (for metrics; do not join or leave while iterating)."""
        return iter(self._rooms.values())

    def join(self, member: Member, name: str) -> Room:
        """Add ``member`` to room ``name``, creating it; return the room."""
        room = self._rooms.get(name)
        if room is None:
            if self.make_room is not None:
                room = self.make_room(name)
            else:
                room = ForwardingRoom(name, self.backplane) if self._forwarding else Room(name)
            self._rooms[name] = room
            self.peak_rooms = max(self.peak_rooms, len(self._rooms))
        size = len(room)
        room.add(member)
        if self.watcher is not None and len(room) != size:
            self.watcher.joined(room, member)
        return room

    def count_members(self, name: str, new: bool) -> defer.Deferred[int] | int | None:
        """Tell the backplane a member is joining room ``name``.

        ``new``: it was not a member yet.  None when there is no cluster
        (join, then count the room); an int, the count, when it is known at
        once; else a Deferred of the count across the cluster, joiner
        included, that fires once the node receives the room's broadcasts
        from the other nodes: join then (``IBackplane.joined``).
        """
        return self.backplane.joined(name, new)

    def leave(self, member: Member, name: str) -> None:
        """Remove ``member`` from room ``name``; the last one out deletes it.

        The backplane is told even if the member's join was still being
        counted (and so it is not in the room yet).
        """
        self.backplane.left(name)
        room = self._rooms.get(name)
        if room is None:
            return
        size = len(room)
        room.discard(member)
        if not room:
            del self._rooms[name]
        if self.watcher is not None and len(room) != size:
            self.watcher.left(room, member)
