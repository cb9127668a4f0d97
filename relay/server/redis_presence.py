"""Presence and direct messages across a cluster, in the backplane's Redis.

What lives in Redis (``P`` is the cluster name):

- hash ``P:presence:<room>``: field ``<node id> <user id>`` -> that user's
  connections in the room on that node.  Each node changes only its own
  fields (one script per join or leave).  A field counts only while its
  node's membership hash ``P:node:<node id>`` exists, and that hash expires
  ``--membership-ttl`` seconds after the node last refreshed it: so a node
  killed with SIGKILL drops out of every list within the TTL, with nobody's
  help.  Reading a list deletes the fields of dead nodes; the hash itself
  expires after the TTL unless a node serving the room refreshes it.
- channel ``P:presence-events:<room>``: join and leave events (the PRESENCE
  frame as sent to members), subscribed by the nodes that have a member of
  the room that enabled presence.
- channel ``P:user:<user id>``: direct messages to that user (the MESSAGE
  frame as delivered), subscribed by the nodes that hold one of its
  direct-enabled connections.  ``PUBLISH`` answers how many nodes took it.

Bounds: a presence hash has one field per user and node, each at most
12 + 1 + 128 characters; the channels carry frames no larger than the
server's own deliveries.

Everything goes over the backplane's connections (``IBackplaneChannels``);
nothing here imports a Redis client.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from relay.server.backplane import IBackplaneChannels

if TYPE_CHECKING:
    from relay.server.factory import RelayFactory

log = Logger()

# Adds ARGV[2] to this node's field ARGV[1] of the room's hash (deleting it
# at 0) and keeps the hash alive for ARGV[3] ms.  KEYS: the room's hash.
CHANGE_SCRIPT = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return n
"""
# The live fields of a room's hash, as user id, connections, user id, ...
# (a user on several nodes comes once per node); deletes dead nodes' fields.
# KEYS: the room's hash.  ARGV: the node key prefix.
LIST_SCRIPT = """
local fields = redis.call('HGETALL', KEYS[1])
local alive = {}
local out = {}
for i = 1, #fields, 2 do
  local field = fields[i]
  local space = string.find(field, ' ', 1, true)
  if space then
    local node = string.sub(field, 1, space - 1)
    local live = alive[node]
    if live == nil then
      live = redis.call('EXISTS', ARGV[1] .. node) == 1
      alive[node] = live
    end
    if live then
      out[#out + 1] = string.sub(field, space + 1)
      out[#out + 1] = fields[i + 1]
    else
      redis.call('HDEL', KEYS[1], field)
    end
  end
end
return out
"""
# Replaces this node's fields of one room's hash.  KEYS: the room's hash.
# ARGV: ttl ms, field prefix ("<node id> "), then field, count, field, count...
REGISTER_SCRIPT = """
local fields = redis.call('HKEYS', KEYS[1])
for _, field in ipairs(fields) do
  if string.sub(field, 1, #ARGV[2]) == ARGV[2] then
    redis.call('HDEL', KEYS[1], field)
  end
end
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if #ARGV > 2 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 0
"""
# Keeps every hash in KEYS alive for ARGV[1] ms.
REFRESH_SCRIPT = """
for _, key in ipairs(KEYS) do
  redis.call('PEXPIRE', key, ARGV[1])
end
return #KEYS
"""
# Rooms refreshed per script call.
REFRESH_CHUNK = 500


def _ignore(failure: Any) -> None:
    return None


class ClusterPresence:
    """The cluster side of ``relay.server.presence.Presence``."""

    def __init__(self, factory: RelayFactory, link: Any) -> None:
        self._factory = factory
        self._link = link
        prefix = link.key_prefix
        self._hash_prefix = f"{prefix}presence:"
        self._channel_prefix = f"{prefix}presence-events:".encode()
        self._field_prefix = f"{link.node_id} "
        self._ttl_ms = int(link.membership_ttl * 1000)

    def _hash(self, room: str) -> str:
        return self._hash_prefix + room

    def _channel(self, room: str) -> bytes:
        return self._channel_prefix + room.encode()

    def changed(self, room: str, user_id: str, delta: int) -> None:
        """A local member of ``user_id`` joined (+1) or left (-1) ``room``."""
        field = self._field_prefix + user_id
        self._link.command("EVAL", CHANGE_SCRIPT, 1, self._hash(room), field, delta, self._ttl_ms).addErrback(
            _ignore
        )

    def members(self, room: str) -> defer.Deferred[dict[str, int]]:
        """User id -> connections in ``room``, on every live node."""
        listing = self._link.command("EVAL", LIST_SCRIPT, 1, self._hash(room), self._link.node_key_prefix)
        return listing.addCallback(_users)

    def publish_event(self, room: str, frame: bytes) -> None:
        self._link.publish(self._channel(room), frame)

    def watch(self, room: str) -> None:
        """A local member of ``room`` enabled presence: receive the others' events."""
        self._link.subscribe(self._channel(room), lambda frame: self._event(room, frame))

    def unwatch(self, room: str) -> None:
        self._link.unsubscribe(self._channel(room))

    def _event(self, room: str, frame: bytes) -> None:
        self._factory.presence.deliver_remote(room, frame)

    def register(self) -> None:
        """Write this node's fields again (the command link is back: Redis may
        have lost them, or they may be out of date)."""
        for room in list(self._factory.registry):
            args: list[Any] = [self._ttl_ms, self._field_prefix]
            for user, count in Counter(m.user_id for m in room.members).items():
                args += (self._field_prefix + user, count)
            self._link.command("EVAL", REGISTER_SCRIPT, 1, self._hash(room.name), *args).addErrback(_ignore)

    def refresh(self) -> None:
        """Keep the hashes of this node's rooms alive for another TTL."""
        keys = [self._hash(room.name) for room in self._factory.registry]
        for start in range(0, len(keys), REFRESH_CHUNK):
            chunk = keys[start : start + REFRESH_CHUNK]
            self._link.command("EVAL", REFRESH_SCRIPT, len(chunk), *chunk, self._ttl_ms).addErrback(_ignore)


def _users(flat: list[Any]) -> dict[str, int]:
    users: Counter[str] = Counter()
    for index in range(0, len(flat) - 1, 2):
        user = flat[index]
        user = user.decode("utf-8", "replace") if isinstance(user, bytes) else str(user)
        users[user] += int(flat[index + 1])
    return dict(users)


class ClusterDirect:
    """The cluster side of ``relay.server.direct.DirectRegistry``."""

    def __init__(self, factory: RelayFactory, link: Any) -> None:
        self._factory = factory
        self._link = link
        self._channel_prefix = f"{link.key_prefix}user:".encode()
        self._subscribed: set[str] = set()

    def _channel(self, user: str) -> bytes:
        return self._channel_prefix + user.encode()

    def subscribe(self, user: str) -> None:
        self._subscribed.add(user)
        self._link.subscribe(self._channel(user), lambda frame: self._received(user, frame))

    def unsubscribe(self, user: str) -> None:
        self._subscribed.discard(user)
        self._link.unsubscribe(self._channel(user))

    def publish(self, user: str, frame: bytes) -> defer.Deferred[bool]:
        """Send a direct delivery to the other nodes; fires with whether one took it."""
        ours = 1 if user in self._subscribed else 0
        return self._link.publish(self._channel(user), frame).addCallback(lambda nodes: nodes - ours > 0)

    def _received(self, user: str, frame: bytes) -> None:
        self._factory.direct.deliver(user, frame)


def attach(factory: RelayFactory, link: Any) -> None:
    """Give the factory's presence and direct registries their cluster side."""
    assert IBackplaneChannels.providedBy(link)
    presence = ClusterPresence(factory, link)
    factory.presence.cluster = presence
    factory.direct.cluster = ClusterDirect(factory, link)
    link.add_link_hook(presence.register, presence.refresh)
