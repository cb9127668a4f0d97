"""The ``history`` extension in a cluster: each room's history and seq live in Redis.

Keys (``P`` is the cluster name):

- hash ``P:history:<room>``: ``epoch``, ``seq`` (the room's last seq) and
  ``lost`` (the highest seq dropped from the log);
- stream ``P:history:<room>:log``: the kept JSON deliveries, entry id
  ``<seq>-0``, fields ``t`` (publish time, ms) and ``f`` (the v1 frame).

Both expire ``--history-ttl`` after the room's last publish or join; a room
whose keys are gone gets a new epoch.

Every publish to a room goes through ``PUBLISH_SCRIPT``, which, in one
atomic step, opens the room's history if needed, gives each frame the next
seq (``HINCRBY``), writes the seq into the frame, appends the JSON ones to
the log (trimmed to N, the trimmed seq raising ``lost``), refreshes the
TTLs, and publishes one *history envelope* on the room's channel::

    version u8 (2) | epoch length u8 | epoch | connection id length u8 |
    connection id (the excluded sender, or empty) | first seq length u8 |
    first seq (decimal) | Relay frames, seq written in

Every node, the publisher's included, delivers from the channel, so all
members of a room see one sequence, gap-free and in order, whichever node
each publisher is on.  The price: a member on the publisher's node gets a
message one Redis round trip later than without history; only rooms with
history (only servers started with ``--history``) pay it.  A read's
broadcasts to one room from one connection go in one script call.

A join with ``since`` runs ``REPLAY_SCRIPT`` (``XRANGE`` after seq) once the
node receives the room's channel; deliveries that arrive meanwhile wait for
the replay, and those it already covers are dropped, so nothing is
delivered twice or out of order.

Redis down: publishes to history rooms are delivered to this node's members
only, numbered by the node, under an epoch of the node's own (so a client
that re-joins with it is told it did not recover); they are not kept.  A
join meanwhile is acked with the room's last known seq and that epoch.
Nothing waits for Redis, so nothing grows while it is away.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from relay.server.backplane import IRedisBackplane
from relay.server.history import (
    epoch_fields,
    is_json,
    new_epoch,
    newest_within,
    replay_budget,
    replay_fields,
    with_fields,
)
from relay.server.redis_backplane import EnvelopeError, call, split_frames
from relay.server.rooms import Room

if TYPE_CHECKING:
    from relay.server.fanout import Batch, Member

log = Logger()

ENVELOPE_VERSION = 2
_SEQ_FIELD = b'"seq":'

# KEYS: hash, log, channel.  ARGV: candidate epoch, N, ttl ms, now ms,
# excluded connection id, then kind ('j': a JSON frame's head, everything
# before its seq value; 'b': a whole binary frame) and data, for each frame.
PUBLISH_SCRIPT = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'lost', 0)
end
local limit = tonumber(ARGV[2])
local frames = {}
local first
for i = 6, #ARGV, 2 do
  local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  first = first or seq
  local text = string.format('%d', seq)
  if ARGV[i] == 'j' then
    local frame = ARGV[i + 1] .. text .. '}'
    frame = struct.pack('>I4', #frame - 4) .. string.sub(frame, 5)
    frames[#frames + 1] = frame
    redis.call('XADD', KEYS[2], text .. '-0', 't', ARGV[4], 'f', frame)
    local over = redis.call('XLEN', KEYS[2]) - limit
    if over > 0 then
      local trimmed = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', over)
      redis.call('XTRIM', KEYS[2], 'MAXLEN', limit)
      local id = trimmed[#trimmed][1]
      redis.call('HSET', KEYS[1], 'lost', string.sub(id, 1, string.find(id, '-') - 1))
    end
  else
    frames[#frames + 1] = ARGV[i + 1]
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local firsttext = string.format('%d', first)
redis.call('PUBLISH', KEYS[3], string.char(2, #epoch) .. epoch .. string.char(#ARGV[5]) .. ARGV[5]
  .. string.char(#firsttext) .. firsttext .. table.concat(frames))
return first
"""

# KEYS: hash, log.  ARGV: since seq (-1: none), since epoch, oldest time
# kept (ms), candidate epoch, ttl ms.  Returns epoch, seq, recovered (0/1),
# then the kept frames after since.
REPLAY_SCRIPT = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'lost', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local since = tonumber(ARGV[1])
local reply = {epoch, seq, 0}
if since < 0 or epoch ~= ARGV[2] or since > seq then
  return reply
end
local lost = tonumber(redis.call('HGET', KEYS[1], 'lost'))
local cutoff = tonumber(ARGV[3])
for _, entry in ipairs(redis.call('XRANGE', KEYS[2], string.format('%d', since + 1) .. '-0', '+')) do
  local fields = entry[2]
  if tonumber(fields[2]) < cutoff then
    lost = tonumber(string.sub(entry[1], 1, string.find(entry[1], '-') - 1))
  else
    reply[#reply + 1] = fields[4]
  end
end
if since >= lost then
  reply[3] = 1
end
return reply
"""


def parse_history_envelope(payload: bytes) -> tuple[str, str, int, list[bytes]]:
    """A history envelope's epoch, excluded connection id, first seq and frames."""
    try:
        position = 1
        fields = []
        for _ in range(3):
            end = position + 1 + payload[position]
            if end > len(payload):
                raise EnvelopeError("truncated history envelope")
            fields.append(payload[position + 1 : end].decode())
            position = end
        first = int(fields[2])
    except (IndexError, UnicodeDecodeError, ValueError) as error:
        raise EnvelopeError(f"malformed history envelope: {error}") from None
    return fields[0], fields[1], first, split_frames(payload, position)


def frame_head(frame: bytes) -> bytes | None:
    """A JSON delivery up to its seq value (the seq being its last field), or None."""
    at = frame.rfind(_SEQ_FIELD)
    return frame[: at + len(_SEQ_FIELD)] if at > 0 else None


class ClusterHistoryRoom(Room):
    """A room with history in a cluster: every delivery comes from Redis.

    Its broadcasts go to Redis (``RedisHistory.publish``) instead of to its
    members; ``deliver`` hands what the room's channel brings to the v1
    members as it is and to the history members with the epoch added.
    """

    __slots__ = ("_history", "_history_members", "_joining", "epoch", "_local", "__weakref__")

    def __init__(self, name: str, history: RedisHistory) -> None:
        super().__init__(name)
        self._history = history
        self._history_members: dict[Member, None] = {}
        # History members waiting for their replay: the deliveries meanwhile.
        self._joining: dict[Member, list[tuple[int, bytes]]] = {}
        self.epoch = ""  # the last one Redis gave
        self._local = False  # delivering on its own while Redis is away

    def __len__(self) -> int:
        return len(self._members) + len(self._history_members)

    def __contains__(self, member: Member) -> bool:
        return member in self._members or member in self._history_members

    def add(self, member: Member) -> None:
        if getattr(member, "history", False):
            self._history_members[member] = None
        else:
            Room.add(self, member)

    def discard(self, member: Member) -> None:
        self._history_members.pop(member, None)
        self._joining.pop(member, None)
        Room.discard(self, member)

    def broadcast(
        self,
        frame: bytes,
        exclude: Member | None = None,
        batch: Batch | None = None,
        origin: str | None = None,
    ) -> None:
        self._history.publish(self, frame, exclude, origin, batch)

    def deliver(self, frames: list[bytes], batch: Batch | None) -> None:
        """Frames from a v1 envelope: none should come (every node has history)."""
        for frame in frames:
            self._deliver_one(frame, None, None, batch)

    def deliver_history(self, epoch: str, exclude: Member | None, first: int, frames: list[bytes],
                        batch: Batch | None) -> None:
        """Hand what the room's channel brought to the local members."""
        self.epoch = epoch
        self._local = False
        fields = epoch_fields(epoch)
        for seq, frame in enumerate(frames, first):
            self._deliver_one(frame, exclude, fields, batch, seq)
        self.seq = max(self.seq, first + len(frames) - 1)

    def deliver_local(self, frames: list[bytes], exclude: Member | None, batch: Batch | None) -> None:
        """Redis is away: this node's members only, under an epoch of the node's own."""
        if not self._local:
            self._local = True
            self.epoch = new_epoch()
        fields = epoch_fields(self.epoch)
        for frame in frames:
            self._deliver_one(frame, exclude, fields, batch)

    def _deliver_one(self, frame: bytes, exclude: Member | None, fields: bytes | None,
                     batch: Batch | None, seq: int = 0) -> None:
        Room.broadcast(self, frame, exclude, batch)
        if not self._history_members:
            return
        live = with_fields(frame, fields) if fields is not None and is_json(frame) else frame
        joining = self._joining
        for member in tuple(self._history_members):
            if member is exclude:
                continue
            if member in joining:
                joining[member].append((seq, live))
            else:
                member.enqueue(live)

    def start_joining(self, member: Member) -> None:
        self._joining[member] = []

    def end_joining(self, member: Member, covered: int) -> None:
        """Queue what arrived while ``member`` waited, past seq ``covered``."""
        for seq, frame in self._joining.pop(member, ()):
            if seq > covered:
                member.enqueue(frame)


class RedisHistory:
    """The history extension of a cluster node (``RelayFactory.history``)."""

    clustered = True

    def __init__(self, config: Any, reactor: Any, backplane: Any) -> None:
        self._backplane: IRedisBackplane = backplane
        self._reactor = reactor
        self.limit = config.history
        self.ttl_ms = int(config.history_ttl * 1000)
        self._prefix = f"{backplane.cluster_name}:history:"
        self._channel_prefix = f"{backplane.cluster_name}:room:"
        self._rooms: weakref.WeakValueDictionary[str, ClusterHistoryRoom] = weakref.WeakValueDictionary()
        # Publishing connections that are excluded from their own messages.
        self._senders: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        # Broadcasts since the last flush: [room, excluded sender id, frames].
        self._pending: list[tuple[ClusterHistoryRoom, str, Any, list[bytes]]] = []
        self._acks: weakref.WeakKeyDictionary[Any, dict[str, dict[str, Any]]] = weakref.WeakKeyDictionary()
        self.failures = 0  # script calls that failed (their frames went local)
        backplane.add_envelope_handler(ENVELOPE_VERSION, self.received)

    def make_room(self, name: str) -> Room:
        room = self._rooms[name] = ClusterHistoryRoom(name, self)
        return room

    def _keys(self, room: str) -> tuple[str, str]:
        key = self._prefix + room
        return key, key + ":log"

    # Publishing

    def publish(self, room: ClusterHistoryRoom, frame: bytes, exclude: Any, origin: str | None,
                batch: Batch | None) -> None:
        sender = (origin or "") if exclude is not None else ""
        if sender:
            self._senders[sender] = exclude
        pending = self._pending
        if pending and pending[-1][0] is room and pending[-1][1] == sender:
            pending[-1][3].append(frame)
            return
        if not pending and batch is not None:
            batch.mark_dirty(self)  # flushed with the members' outboxes
        pending.append((room, sender, exclude, [frame]))
        if batch is None:
            self.flush()

    def flush(self) -> None:
        """Send what was published since the last flush: one script call per run."""
        pending, self._pending = self._pending, []
        command = self._backplane.command_connection()
        for room, sender, exclude, frames in pending:
            if command is None:
                room.deliver_local(frames, exclude, None)
                continue
            args = self._publish_args(room, sender, frames)
            call(command, "EVAL", PUBLISH_SCRIPT, 3, *args).addErrback(self._failed, room, frames, exclude)
        if command is None and pending:
            self._backplane.flush_node()  # what was queued for local members

    def _publish_args(self, room: ClusterHistoryRoom, sender: str, frames: list[bytes]) -> list[Any]:
        hash_key, log_key = self._keys(room.name)
        args: list[Any] = [
            hash_key, log_key, self._channel_prefix + room.name,
            new_epoch(), self.limit, self.ttl_ms, int(self._reactor.seconds() * 1000), sender,
        ]
        for frame in frames:
            head = frame_head(frame) if is_json(frame) else None
            args += (b"j", head) if head is not None else (b"b", frame)
        return args

    def _failed(self, failure: Any, room: ClusterHistoryRoom, frames: list[bytes], exclude: Any) -> None:
        self.failures += 1
        if self.failures == 1 or self.failures % 1000 == 0:
            log.warn(
                "History publish to Redis failed ({why}); delivered on this node only ({count} so far)",
                why=failure.getErrorMessage(),
                count=self.failures,
            )
        room.deliver_local(frames, exclude, self._backplane.batch())
        self._backplane.flush_node()

    # Deliveries from the room's channel

    def received(self, room_name: str, payload: bytes) -> None:
        """A history envelope for ``room_name`` (from any node, this one included)."""
        epoch, sender, first, frames = parse_history_envelope(payload)
        room = self._rooms.get(room_name)
        if room is None:
            return
        exclude = self._senders.get(sender) if sender else None
        room.deliver_history(epoch, exclude, first, frames, self._backplane.batch())

    # Joining

    def join(self, protocol: Any, room: str, since: tuple[int, str] | None, counted: Any) -> Any:
        """A history connection is joining ``room``: once the node receives
        the room's channel, replay what it missed from Redis."""
        if not isinstance(counted, defer.Deferred):  # Redis is away: this node only
            self._acks.setdefault(protocol, {})[room] = self._local_fields(room, since)
            return counted
        return counted.addCallback(self._counted, protocol, room, since)

    def _local_fields(self, room: str, since: tuple[int, str] | None) -> dict[str, Any]:
        joined = self._rooms.get(room)
        fields: dict[str, Any] = {"seq": joined.seq if joined is not None else 0,
                                  "epoch": joined.epoch if joined is not None else ""}
        if since is not None:
            fields.update(recovered=False, replayed=0)
        return fields

    def _counted(self, members: int, protocol: Any, room: str, since: tuple[int, str] | None) -> Any:
        command = self._backplane.command_connection()
        if not protocol.accepting or command is None:
            self._acks.setdefault(protocol, {})[room] = self._local_fields(room, since)
            return members
        joined = protocol.factory.registry.join(protocol, room)
        joined.start_joining(protocol)
        seq, epoch = since if since is not None else (-1, "")
        cutoff = int(self._reactor.seconds() * 1000) - self.ttl_ms
        replaying = call(command, "EVAL", REPLAY_SCRIPT, 2, *self._keys(room), seq, epoch, cutoff,
                         new_epoch(), self.ttl_ms)
        replaying.addCallback(self._replayed, protocol, joined, since)
        replaying.addErrback(self._replay_failed, protocol, joined, since)
        return replaying.addCallback(lambda _: members)

    def _replayed(self, reply: list[Any], protocol: Any, joined: ClusterHistoryRoom,
                  since: tuple[int, str] | None) -> None:
        epoch, seq, recovered, frames = reply[0].decode(), int(reply[1]), bool(reply[2]), reply[3:]
        fields = replay_fields(epoch)
        fitting = newest_within(frames, replay_budget(protocol) - len(fields) * len(frames))
        recovered = recovered and len(fitting) == len(frames)
        frames = fitting
        for frame in frames:
            protocol.enqueue(with_fields(frame, fields))
        joined.end_joining(protocol, seq)
        if not joined.epoch or joined.seq <= seq:
            joined.epoch, joined.seq = epoch, seq
        ack: dict[str, Any] = {"seq": seq, "epoch": epoch}
        if since is not None:
            ack.update(recovered=recovered, replayed=len(frames))
        self._acks.setdefault(protocol, {})[joined.name] = ack

    def _replay_failed(self, failure: Any, protocol: Any, joined: ClusterHistoryRoom,
                       since: tuple[int, str] | None) -> None:
        log.warn("History replay from Redis failed: {why}", why=failure.getErrorMessage())
        joined.end_joining(protocol, joined.seq)
        self._acks.setdefault(protocol, {})[joined.name] = self._local_fields(joined.name, since)

    def ack_fields(self, protocol: Any, room: str) -> dict[str, Any]:
        """What a history connection's JOIN ack carries (see ``join``)."""
        fields = self._acks.get(protocol, {}).pop(room, None)
        return fields if fields is not None else self._local_fields(room, None)
