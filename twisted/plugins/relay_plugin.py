from twisted.application.service import ServiceMaker

relay = ServiceMaker(
    "Relay",
    "relay.server.tap",
    "Real-time message relay: rooms and fan-out over one binary framed protocol.",
    "relay",
)
