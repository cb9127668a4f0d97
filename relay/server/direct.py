"""The direct extension: messages to a user rather than to a room.

A connection that enabled ``direct`` in HELLO may send MESSAGE
``{"to": userId, "content", "id"?}`` (no ``"room"``), and receives, on
every one of its user's connections that enabled ``direct``, MESSAGE
``{"to", "from", "content", "timestamp"}``.  When no such connection
exists anywhere the sender gets ``USER_OFFLINE`` (non-fatal).  With
authentication, sending needs a token with ``"direct": true``
(``FORBIDDEN`` otherwise).

``DirectRegistry`` maps each user id to its local direct-enabled
connections: one dict entry per such connection, nothing for the others.
In a cluster (``cluster``, a ``relay.server.redis_presence.ClusterDirect``)
the node subscribes to the user's Redis channel while it holds one of them,
and a direct message is also published there; the number of nodes that
received it says whether anyone did.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from twisted.internet import defer

from relay.requests import MAX_USER_ID, RequestError, has_control_character, json_body
from relay.server.limits import clip
from relay.wire import MAX_ENVELOPE, ErrorCode, Flags, Frame, MessageType, ProtocolError, encode_json

if TYPE_CHECKING:
    from relay.server.factory import RelayFactory

DIRECT = "direct"
_JSON = int(Flags.JSON)


class DirectRequest(NamedTuple):
    """A direct MESSAGE: who it is for and what it carries."""

    request_id: Any
    to: str
    content: Any


def direct_request(frame: Frame) -> DirectRequest | None:
    """The direct message a MESSAGE the room path refused carries: a JSON
    object with ``"to"`` and no ``"room"``; None if it is not one.

    Raises RequestError (BAD_REQUEST) for a malformed one.
    """
    if not frame.flags & _JSON:
        return None
    try:
        body, request_id = json_body(frame)
    except (RequestError, ProtocolError):
        return None  # the room path's refusal says it
    if "to" not in body or "room" in body:
        return None
    to = body.get("to")
    if not isinstance(to, str) or not 0 < len(to) <= MAX_USER_ID or has_control_character(to):
        raise RequestError(
            ErrorCode.BAD_REQUEST,
            f'"to" must be a user id: 1-{MAX_USER_ID} characters, no control characters',
            request_id,
        )
    if "content" not in body:
        raise RequestError(ErrorCode.BAD_REQUEST, '"content" is required', request_id)
    return DirectRequest(request_id, to, body["content"])


class DirectRegistry:
    """User id -> this node's connections of that user that enabled ``direct``."""

    def __init__(self, factory: RelayFactory) -> None:
        self._factory = factory
        self._users: dict[str, dict[Any, None]] = {}
        self.cluster: Any = None

    def __len__(self) -> int:
        """Users with at least one direct-enabled connection here."""
        return len(self._users)

    def add(self, connection: Any) -> None:
        """``connection`` enabled direct: it receives its user's direct messages."""
        user = connection.user_id
        connections = self._users.setdefault(user, {})
        connections[connection] = None
        if self.cluster is not None and len(connections) == 1:
            self.cluster.subscribe(user)

    def remove(self, connection: Any) -> None:
        """``connection`` is gone."""
        user = connection.user_id
        connections = self._users.get(user)
        if connections is None or connections.pop(connection, False) is not None:
            return
        if not connections:
            del self._users[user]
            if self.cluster is not None:
                self.cluster.unsubscribe(user)

    def users(self) -> list[str]:
        """The user ids with direct-enabled connections here."""
        return list(self._users)

    def send(self, sender: Any, request: DirectRequest) -> defer.Deferred[bool] | bool:
        """Deliver a direct message from ``sender``.

        True if some connection got it; in a cluster, when none here did, a
        Deferred of whether one on another node did.  Raises RequestError.
        """
        request_id, to, content = request
        grant = sender.grant
        if grant is not None and not grant.direct:
            raise RequestError(
                ErrorCode.FORBIDDEN, "direct messages are not granted to this connection", request_id
            )
        try:
            delivery = encode_json(
                MessageType.MESSAGE,
                {
                    "to": to,
                    "from": sender.user_id,
                    "content": content,
                    "timestamp": int(self._factory.reactor.seconds() * 1000),
                },
            )
        except ValueError:
            raise RequestError(
                ErrorCode.BAD_REQUEST, '"content" is nested too deeply to relay', request_id
            ) from None
        if len(delivery) - 4 > self._factory.config.max_frame_size + MAX_ENVELOPE:
            raise RequestError(
                ErrorCode.BAD_REQUEST,
                "the message would exceed the largest frame the server delivers",
                request_id,
            )
        delivered = self.deliver(to, delivery, None if sender.echo else sender)
        if self.cluster is None:
            return delivered
        published = self.cluster.publish(to, delivery)
        if delivered:
            return True
        return published

    def deliver(self, user: str, delivery: bytes, exclude: Any = None) -> bool:
        """Hand ``delivery`` to ``user``'s direct-enabled connections here
        (but ``exclude``); whether there was one."""
        connections = self._users.get(user)
        delivered = False
        if connections:
            for connection in tuple(connections):
                if connection is not exclude:
                    connection.enqueue(delivery)
                    delivered = True
        return delivered


def offline_error(to: str, request_id: Any) -> RequestError:
    """The refusal of a direct message nobody could receive."""
    return RequestError(
        ErrorCode.USER_OFFLINE, f"user {clip(to)} has no connection that takes direct messages", request_id
    )
