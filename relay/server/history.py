"""The ``history`` extension on one node: each room keeps its last deliveries.

With ``--history N`` every room keeps its last N JSON deliveries, for at
most ``--history-ttl`` seconds, within a server-wide ``--history-memory``
byte budget (the rooms published to least recently lose theirs first).
A connection that enabled ``history`` in HELLO receives deliveries with an
``"epoch"`` (a name for the room's history, new whenever that history is
lost) and may join with ``"since": {"seq", "epoch"}``: the kept deliveries
after ``seq`` are replayed before the ack, marked ``"replayed": true``, and
the ack says whether nothing was missed (``"recovered"``).

What is kept is the encoded v1 delivery itself, so keeping one costs no
copy, and a replay no encoding.  The frames for history connections are
made from the v1 delivery by inserting fields before its closing brace
(``with_fields``): once per broadcast, whatever the number of history
members, and only in rooms that have history; a replayed frame when it is
replayed.

Binary messages take a ``seq`` (as in plain Relay v1) but are not kept: a
binary delivery has no JSON envelope that could say it is replayed, so it
could not be told from a live one.  They are never counted as missed.

Rooms are ``HistoryRoom``s when history is on (``RoomRegistry.make_room``):
their members that enabled history sit in a dict of their own, so the v1
members' fan-out loop (``Room.broadcast``) is the same code as without
history.  This module also holds the command-line options and the parsing
of ``since``, shared with the cluster's ``relay.server.redis_history``.
"""

from __future__ import annotations

import collections
import struct
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Callable

from relay.requests import RequestError
from relay.server.limits import positive_int
from relay.server.rooms import Room
from relay.wire import ErrorCode, Flags, Frame, loads

if TYPE_CHECKING:
    from relay.server.fanout import Batch, Member

HISTORY = "history"
DEFAULT_TTL = 300
# Enough for 64 rooms of 1,000 typical chat messages (about 300 bytes each
# with their envelope and bookkeeping), small next to max-pending x clients.
DEFAULT_MEMORY = 64 * 1024 * 1024
# The most deliveries a room may keep: a replay is at most this many frames.
MAX_HISTORY = 100_000
# Bytes counted for each kept delivery beyond its frame (tuple, deque slot,
# int and float), and for each room's record.
ENTRY_OVERHEAD = 150
RECORD_OVERHEAD = 400
# Longest epoch accepted in ``since`` (the server's own are 16 characters).
MAX_EPOCH = 64
# Largest seq accepted in ``since``: JSON integers beyond it lose precision
# in JavaScript clients.
MAX_SEQ = 2**53
_LENGTH = struct.Struct("!I")
_JSON = int(Flags.JSON)


def with_fields(frame: bytes, fields: bytes) -> bytes:
    """The JSON ``frame`` with ``fields`` (``,"k":v...``) added before its closing brace."""
    return _LENGTH.pack(len(frame) - 4 + len(fields)) + frame[4:-1] + fields + b"}"


def epoch_fields(epoch: str) -> bytes:
    """What a live delivery to a history connection carries beyond the v1 one."""
    return b',"epoch":"' + epoch.encode() + b'"'


def replay_fields(epoch: str) -> bytes:
    """What a replayed delivery carries beyond the v1 one."""
    return epoch_fields(epoch) + b',"replayed":true'


def new_epoch() -> str:
    """A fresh epoch: 16 hex characters, unique in practice."""
    return uuid.uuid4().hex[:16]


def is_json(frame: bytes) -> bool:
    """Whether an encoded frame's payload is JSON (flags byte)."""
    return bool(frame[6] & _JSON)


def parse_since(frame: Frame, request_id: Any) -> tuple[int, str] | None:
    """A JOIN_ROOM's ``since`` as ``(seq, epoch)``, or None without one.

    BAD_REQUEST unless it is ``{"seq": 0..2**53, "epoch": "1-64 characters"}``.
    """
    body = loads(frame.payload)
    since = body.get("since") if isinstance(body, dict) else None
    if since is None:
        return None
    seq = since.get("seq") if isinstance(since, dict) else None
    epoch = since.get("epoch") if isinstance(since, dict) else None
    if (
        type(seq) is not int
        or not 0 <= seq <= MAX_SEQ
        or type(epoch) is not str
        or not 0 < len(epoch) <= MAX_EPOCH
    ):
        raise RequestError(
            ErrorCode.BAD_REQUEST,
            f'"since" must be {{"seq": an integer 0-{MAX_SEQ}, "epoch": a string of 1-{MAX_EPOCH} characters}}',
            request_id,
        )
    return seq, epoch


class RoomHistory:
    """One room's kept deliveries, its ``seq`` and its ``epoch``.

    ``entries`` holds ``(seq, time, v1 delivery)``, oldest first.  ``lost``
    is the highest seq of a delivery that was dropped (by count, age or the
    memory budget): a client that saw everything up to at least ``lost``
    missed nothing that is not replayed.
    """

    __slots__ = ("name", "epoch", "seq", "entries", "lost", "size", "live", "touched", "live_fields", "replayed")

    def __init__(self, name: str, now: float) -> None:
        self.name = name
        self.epoch = new_epoch()
        self.seq = 0
        self.entries: collections.deque[tuple[int, float, bytes]] = collections.deque()
        self.lost = 0
        self.size = RECORD_OVERHEAD  # bytes counted against the memory budget
        self.live = False  # a Room of that name exists
        self.touched = now  # last publish, or when the room was emptied
        self.live_fields = epoch_fields(self.epoch)
        self.replayed = replay_fields(self.epoch)


class HistoryStore:
    """Every room's history on this node, within one memory budget.

    ``clock`` gives the time (``reactor.seconds``), so tests drive the TTL
    with a ``task.Clock``.
    """

    def __init__(self, limit: int, ttl: float, memory: int, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.ttl = ttl
        self.memory = memory
        self._clock = clock
        # Least recently published (or emptied) first: the eviction order.
        self._records: collections.OrderedDict[str, RoomHistory] = collections.OrderedDict()
        self.size = 0
        self.evicted = 0  # deliveries dropped for the memory budget
        # The record last moved to the end of the eviction order: the
        # common case, publishes to the same room, skips the move.
        self._newest: RoomHistory | None = None

    def __len__(self) -> int:
        return len(self._records)

    def get(self, name: str) -> RoomHistory | None:
        return self._records.get(name)

    def find(self, name: str) -> RoomHistory | None:
        """The history kept for room ``name``, unless its room was emptied
        more than a TTL ago (then it is lost, and forgotten now)."""
        record = self._records.get(name)
        if record is not None and not record.live and self._clock() - record.touched > self.ttl:
            self._drop(record)
            return None
        return record

    def open(self, name: str) -> RoomHistory:
        """The history of room ``name``, being created: the one kept, or a new one."""
        record = self.find(name)
        if record is None:
            now = self._clock()
            self._sweep(now)
            record = RoomHistory(name, now)
            self._records[name] = record
            self._newest = record
            self.size += record.size
            self._fit()
        record.live = True
        return record

    def close(self, record: RoomHistory) -> None:
        """Its room was emptied: it is kept for a TTL more."""
        record.live = False
        record.touched = self._clock()
        if record.name in self._records:
            self._records.move_to_end(record.name)
            self._newest = record
        self._sweep(record.touched)

    def keep(self, record: RoomHistory, seq: int, frame: bytes) -> None:
        """Keep the JSON delivery ``frame`` of seq ``seq``.

        Once per publish to a room with history: the rare work (trimming,
        eviction) hides behind one comparison each.
        """
        now = self._clock()
        entries = record.entries
        entries.append((seq, now, frame))
        cost = len(frame) + ENTRY_OVERHEAD
        record.size += cost
        self.size += cost
        record.touched = now
        if record is not self._newest:
            self._records.move_to_end(record.name)
            self._newest = record
        if len(entries) > self.limit:
            self._pop_oldest(record)
        if now - entries[0][1] > self.ttl:
            self._expire(record, now)
        if self.size > self.memory:
            self._fit()

    def replay(self, record: RoomHistory, seq: int, epoch: str, budget: int) -> tuple[list[bytes], bool]:
        """The kept replay frames after ``seq``, and whether nothing was missed.

        Nothing is replayed for another epoch, or a ``seq`` the room has not
        reached (not this room's history).  At most ``budget`` bytes are
        replayed: past it the newest that fit are, and it is not recovered.
        """
        self._expire(record, self._clock())
        if epoch != record.epoch or seq > record.seq:
            return [], False
        missed = [frame for kept, _, frame in record.entries if kept > seq]
        fitting = newest_within(missed, budget - len(record.replayed) * len(missed))
        fields = record.replayed
        frames = [with_fields(frame, fields) for frame in fitting]
        return frames, seq >= record.lost and len(fitting) == len(missed)

    def _pop_oldest(self, record: RoomHistory) -> None:
        seq, _, frame = record.entries.popleft()
        cost = len(frame) + ENTRY_OVERHEAD
        record.size -= cost
        self.size -= cost
        record.lost = max(record.lost, seq)

    def _expire(self, record: RoomHistory, now: float) -> None:
        entries = record.entries
        while entries and now - entries[0][1] > self.ttl:
            self._pop_oldest(record)

    def _sweep(self, now: float) -> None:
        """Forget the least recent rooms that are gone and past their TTL."""
        records = self._records
        while records:
            record = next(iter(records.values()))
            if record.live or now - record.touched <= self.ttl:
                return
            self._drop(record)

    def _fit(self) -> None:
        """Within the memory budget: drop deliveries of the least recent rooms first."""
        records = self._records
        skipped = 0  # live rooms with nothing left to take, moved to the end
        while self.size > self.memory and records and skipped < len(records):
            record = next(iter(records.values()))
            if record.entries:
                self._pop_oldest(record)
                self.evicted += 1
            elif not record.live:
                self._drop(record)
            else:
                records.move_to_end(record.name)
                skipped += 1

    def _drop(self, record: RoomHistory) -> None:
        if self._records.get(record.name) is record:
            del self._records[record.name]
        if self._newest is record:
            self._newest = None
        self.size -= record.size


class HistoryRoom(Room):
    """A room with history (``--history``) on one node.

    Members that enabled ``history`` are kept apart from the v1 ones, in a
    ``Room`` of their own: the v1 members take the broadcast as
    ``Room.broadcast`` gives it, the others the same frame with the room's
    epoch added, made once, through the same shared fan-out.
    """

    __slots__ = ("history", "_store", "_history_members")

    def __init__(self, name: str, store: HistoryStore) -> None:
        super().__init__(name)
        self._store = store
        self.history = store.open(name)
        self.seq = self.history.seq
        self._history_members = Room(name)

    def __len__(self) -> int:
        return len(self._members) + len(self._history_members)

    def __contains__(self, member: Member) -> bool:
        return member in self._members or member in self._history_members

    def add(self, member: Member) -> None:
        if getattr(member, "history", False):
            self._history_members.add(member)
        else:
            Room.add(self, member)

    def discard(self, member: Member) -> None:
        self._history_members.discard(member)
        Room.discard(self, member)
        if not self:
            self._store.close(self.history)

    def broadcast(
        self,
        frame: bytes,
        exclude: Member | None = None,
        batch: Batch | None = None,
        origin: str | None = None,
    ) -> None:
        Room.broadcast(self, frame, exclude, batch)
        record = self.history
        record.seq = seq = self.seq
        others = self._history_members
        if frame[6] & _JSON:  # the flags byte: binary deliveries are not kept
            self._store.keep(record, seq, frame)
            if others._members:  # not len(): one call less per message
                Room.broadcast(others, with_fields(frame, record.live_fields), exclude, batch)
        elif others._members:
            Room.broadcast(others, frame, exclude, batch)


class LocalHistory:
    """The history extension of a single node (``RelayFactory.history``)."""

    clustered = False

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        # What each connection's next JOIN ack of a room says of its replay.
        self._acks: weakref.WeakKeyDictionary[Any, dict[str, dict[str, Any]]] = weakref.WeakKeyDictionary()

    def make_room(self, name: str) -> Room:
        return HistoryRoom(name, self.store)

    def join(self, protocol: Any, room: str, since: tuple[int, str] | None, counted: Any) -> Any:
        """A history connection is joining ``room``: replay what it missed.

        Called before it joins, so the replay is queued before any live
        delivery; returns ``counted`` (see ``RoomRegistry.count_members``).
        """
        if since is None:
            return counted
        existing = protocol.factory.registry.get(room)
        record = existing.history if isinstance(existing, HistoryRoom) else self.store.find(room)
        frames: list[bytes] = []
        recovered = False
        if record is not None:
            frames, recovered = self.store.replay(record, *since, replay_budget(protocol))
        for frame in frames:
            protocol.enqueue(frame)
        self._acks.setdefault(protocol, {})[room] = {"recovered": recovered, "replayed": len(frames)}
        return counted

    def ack_fields(self, protocol: Any, room: str) -> dict[str, Any]:
        """What a history connection's JOIN ack carries: ``seq`` and ``epoch``
        now, and after a ``since`` whether it recovered."""
        fields = self._acks.get(protocol, {}).pop(room, {})
        joined = protocol.factory.registry.get(room)
        if isinstance(joined, HistoryRoom):
            fields = {"seq": joined.seq, "epoch": joined.history.epoch, **fields}
        return fields


def newest_within(frames: list[bytes], budget: int) -> list[bytes]:
    """The newest of ``frames`` (oldest first) whose bytes fit in ``budget``."""
    size = 0
    start = len(frames)
    while start and size + len(frames[start - 1]) <= budget:
        start -= 1
        size += len(frames[start])
    return frames[start:]


def replay_budget(protocol: Any) -> int:
    """Bytes one replay may queue: half of what a paused connection may hold."""
    return protocol.factory.config.max_pending // 2


def _history_size(value: str) -> int:
    number = positive_int(value)
    if number > MAX_HISTORY:
        raise ValueError(f"at most {MAX_HISTORY} deliveries per room")
    return number


def _byte_size(value: str) -> int:
    text = value.strip().lower()
    for suffix, factor in (("kib", 1024), ("mib", 1024**2), ("gib", 1024**3)):
        if text.endswith(suffix):
            return positive_int(text[: -len(suffix)]) * factor
    return positive_int(text)


# twistd options of the history extension: [name, short, default, help, coerce].
OPTIONS: list[list[Any]] = [
    ["history", None, 0, f"Deliveries each room keeps for the history extension (replay on JOIN with since), at most {MAX_HISTORY}; 0: off.", lambda value: 0 if value == "0" else _history_size(value)],
    ["history-ttl", None, DEFAULT_TTL, "Seconds a kept delivery (and an emptied room's history) lives.", positive_int],
    ["history-memory", None, DEFAULT_MEMORY, "Bytes all rooms' kept deliveries may take on this node (KiB/MiB/GiB suffixes); past it the least recently used rooms lose theirs first.", _byte_size],
]


def config_fields(options: Any) -> dict[str, Any]:
    """The RelayConfig fields of the history options."""
    return {
        "history": options["history"],
        "history_ttl": options["history-ttl"],
        "history_memory": options["history-memory"],
    }


def make_history(factory: Any) -> Any:
    """The history extension of a ``RelayFactory``, or None when ``--history`` is off.

    In a cluster the history lives in Redis (``relay.server.redis_history``).
    """
    config = factory.config
    if not config.history:
        return None
    if factory.backplane.clustered:
        from relay.server.redis_history import RedisHistory

        history: Any = RedisHistory(config, factory.reactor, factory.backplane)
    else:
        history = LocalHistory(
            HistoryStore(config.history, config.history_ttl, config.history_memory, factory.reactor.seconds)
        )
    factory.registry.make_room = history.make_room
    return history

