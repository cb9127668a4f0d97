"""Relay client side: the client library, its WebSocket transport and the terminal client."""

from relay.client.protocol import (
    HELLO_TIMEOUT_SECONDS,
    MISSED_HEARTBEATS,
    BinaryRoomWriter,
    Message,
    MessageStream,
    ReconnectingClient,
    RelayClientProtocol,
    RelayError,
    build_endpoint,
    connect,
)

__all__ = [
    "HELLO_TIMEOUT_SECONDS",
    "MISSED_HEARTBEATS",
    "BinaryRoomWriter",
    "Message",
    "MessageStream",
    "ReconnectingClient",
    "RelayClientProtocol",
    "RelayError",
    "build_endpoint",
    "connect",
]
