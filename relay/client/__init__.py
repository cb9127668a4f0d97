"""Relay client side: the client library, its WebSocket transport and the terminal client."""

from relay.client.endpoints import build_endpoint, connect
from relay.client.protocol import (
    HELLO_TIMEOUT_SECONDS,
    MISSED_HEARTBEATS,
    BinaryRoomWriter,
    DirectMessage,
    MemberList,
    Message,
    MessageStream,
    PresenceEvent,
    RelayClientProtocol,
    RelayError,
)
from relay.client.reconnect import ReconnectingClient

__all__ = [
    "HELLO_TIMEOUT_SECONDS",
    "MISSED_HEARTBEATS",
    "BinaryRoomWriter",
    "DirectMessage",
    "MemberList",
    "Message",
    "MessageStream",
    "PresenceEvent",
    "ReconnectingClient",
    "RelayClientProtocol",
    "RelayError",
    "build_endpoint",
    "connect",
]
