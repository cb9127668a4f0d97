"""The presence extension: who is in a room, told to the members who asked.

A connection that enabled ``presence`` in HELLO gets a PRESENCE frame
``{"room", "event": "join"|"leave", "userId", "connectionId"}`` whenever
another member joins or leaves one of its rooms (a disconnect is a leave),
and may ask for the member list with PRESENCE ``{"room", "id"?}``.

Cost and memory, by design:

- Nothing per message: the fan-out path never looks at presence.
- Per join or leave: one dict lookup when nobody in the room watches; one
  encoded event handed to each watching member otherwise, unless the room
  has more than ``--presence-events-limit`` members (events would cost the
  square of the room's size).
- Per room: one dict entry per local member that enabled presence
  (``_watchers``), and the room's cluster-wide size when it is known.  The
  member list is not stored: it is computed from the room's members (one
  node) or read from Redis (a cluster, ``relay.server.redis_presence``) when
  asked, and capped at ``--presence-list-limit`` users and at the largest
  frame the server may send.

The room registry calls ``joined``/``left`` once per change of membership
(a repeated join changes nothing; a connection lost leaves each of its
rooms once), so each event is sent exactly once.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from relay.requests import RequestError, json_body, room_field
from relay.server.limits import clip, positive_int
from relay.wire import MAX_ENVELOPE, ErrorCode, Frame, MessageType, dumps, encode_json

if TYPE_CHECKING:
    from relay.server.factory import RelayFactory
    from relay.server.rooms import Room

log = Logger()

PRESENCE = "presence"
DEFAULT_LIST_LIMIT = 1000
DEFAULT_EVENTS_LIMIT = 1000
# Bytes a listed user adds to the reply besides its id: {"userId":"","connections":N},
_ENTRY_OVERHEAD = 40


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{value} is negative")
    return number


# twistd options: [name, short, default, help, coerce].
OPTIONS: list[list[Any]] = [
    ["presence-list-limit", None, DEFAULT_LIST_LIMIT, "Users listed at most in a presence member list; past it the reply says \"truncated\": true.", positive_int],
    ["presence-events-limit", None, DEFAULT_EVENTS_LIMIT, "Rooms with more members than this (cluster-wide) send no presence join/leave events; 0 sends none.", _non_negative_int],
]


def config_fields(options: Any) -> dict[str, Any]:
    """The RelayConfig fields of this module's options."""
    return {
        "presence_list_limit": options["presence-list-limit"],
        "presence_events_limit": options["presence-events-limit"],
    }


def event_frame(room: str, event: str, user_id: str, connection_id: str) -> bytes:
    """The PRESENCE frame telling that ``user_id`` joined or left ``room``."""
    body = {"room": room, "event": event, "userId": user_id, "connectionId": connection_id}
    return encode_json(MessageType.PRESENCE, body)


def member_list(
    room: str, users: dict[str, int], limit: int, max_bytes: int, request_id: Any
) -> dict[str, Any]:
    """The body of a member-list reply: ``users`` (user id -> connections)
    sorted by user id, at most ``limit`` of them and ``max_bytes`` of JSON."""
    members = []
    size = 0
    truncated = False
    for user in sorted(users):
        size += len(dumps(user)) + _ENTRY_OVERHEAD
        if len(members) == limit or size > max_bytes:
            truncated = True
            break
        members.append({"userId": user, "connections": users[user]})
    body: dict[str, Any] = {"room": room, "members": members, "count": len(users)}
    if truncated:
        body["truncated"] = True
    if request_id is not None:
        body["id"] = request_id
    return body


class Presence:
    """Per-room presence state of one node: who watches, events, the list.

    It is the registry's watcher (``RoomRegistry.watcher``).  ``cluster``,
    set in a cluster, is a ``relay.server.redis_presence.ClusterPresence``:
    it keeps the cluster-wide list in Redis and carries events to and from
    the other nodes.
    """

    def __init__(self, factory: RelayFactory) -> None:
        self._factory = factory
        self._list_limit = factory.config.presence_list_limit
        self._events_limit = factory.config.presence_events_limit
        # Room name -> its local members that enabled presence, in join order.
        self._watchers: dict[str, dict[Any, None]] = {}
        # Room name -> its latest cluster-wide member count (from a JOIN).
        self._sizes: dict[str, int] = {}
        self.cluster: Any = None
        # The largest member list that fits a frame the server may send.
        self._max_list_bytes = factory.config.max_frame_size + MAX_ENVELOPE - 600
        factory.registry.watcher = self

    @property
    def watched_rooms(self) -> int:
        """Rooms with at least one local member that enabled presence."""
        return len(self._watchers)

    # The registry's watcher

    def joined(self, room: Room, member: Any) -> None:
        """``member`` became a member of ``room``."""
        if self.cluster is not None:
            self.cluster.changed(room.name, member.user_id, 1)
        self._tell(room, member, "join")
        if getattr(member, "presence", False):
            self._watchers.setdefault(room.name, {})[member] = None
            if self.cluster is not None and len(self._watchers[room.name]) == 1:
                self.cluster.watch(room.name)

    def left(self, room: Room, member: Any) -> None:
        """``member`` is no longer a member of ``room``."""
        name = room.name
        watchers = self._watchers.get(name)
        if watchers is not None and watchers.pop(member, False) is None and not watchers:
            del self._watchers[name]
            if self.cluster is not None:
                self.cluster.unwatch(name)
        if self.cluster is not None:
            self.cluster.changed(name, member.user_id, -1)
        self._tell(room, member, "leave")
        if not room:
            self._sizes.pop(name, None)

    def counted(self, room: str, members: int) -> None:
        """The cluster counted ``members`` in ``room`` for a join."""
        self._sizes[room] = members

    def _quiet(self, room: Room) -> bool:
        """Whether ``room`` is past the events limit (its cluster-wide size as last known)."""
        size = max(len(room), self._sizes.get(room.name, 0))
        return size > self._events_limit

    def _tell(self, room: Room, member: Any, event: str) -> None:
        watchers = self._watchers.get(room.name)
        if (not watchers and self.cluster is None) or self._quiet(room):
            return
        frame = event_frame(room.name, event, member.user_id, member.connection_id)
        if watchers:
            for watcher in watchers:
                if watcher is not member:
                    watcher.enqueue(frame)
        if self.cluster is not None:
            self.cluster.publish_event(room.name, frame)

    def deliver_remote(self, room_name: str, frame: bytes) -> None:
        """An event from another node: to this node's watchers of the room."""
        watchers = self._watchers.get(room_name)
        room = self._factory.registry.get(room_name)
        if not watchers or room is None or self._quiet(room):
            return
        for watcher in tuple(watchers):
            watcher.enqueue(frame)

    # PRESENCE requests

    def query(self, connection: Any, frame: Frame) -> bytes | defer.Deferred[bytes]:
        """The reply to a member-list request: a frame, or (in a cluster) a
        Deferred of one.  Raises RequestError: the asker must be a member."""
        body, request_id = json_body(frame)
        name = room_field(body, request_id)
        if name not in connection.rooms:
            grant = connection.grant
            if grant is not None and not grant.may_join(name):
                raise RequestError(
                    ErrorCode.FORBIDDEN, f"room {clip(name)} is not granted to this connection", request_id
                )
            raise RequestError(ErrorCode.NOT_IN_ROOM, f"not a member of room {clip(name)}", request_id)
        room = self._factory.registry.get(name)
        if self.cluster is None or room is None:
            return self._reply(name, self.local_users(room), request_id)
        counting = self.cluster.members(name)
        # Redis unreachable: this node's members are all it can tell.
        counting.addErrback(lambda failure: self.local_users(self._factory.registry.get(name)))
        return counting.addCallback(lambda users: self._reply(name, users, request_id))

    def _reply(self, name: str, users: dict[str, int], request_id: Any) -> bytes:
        body = member_list(name, users, self._list_limit, self._max_list_bytes, request_id)
        return encode_json(MessageType.PRESENCE, body)

    @staticmethod
    def local_users(room: Room | None) -> dict[str, int]:
        """User id -> connections, of this node's members of ``room``."""
        if room is None:
            return {}
        return dict(Counter(member.user_id for member in room.members))
