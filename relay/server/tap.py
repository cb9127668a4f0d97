"""twistd plugin glue: command-line options become services."""

from __future__ import annotations

import os
import re
import socket
from typing import Any

from twisted.application import service, strports
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from relay.rlimits import open_file_limit, raise_open_file_limit
from relay.server import limits, tls
from relay.server.factory import RelayConfig, RelayFactory

log = Logger()

DEFAULT_PORT = "tcp:4000"


def default_backlog() -> int:
    """1024, or the kernel's cap on listen backlogs (somaxconn) if that is higher.

    Twisted's default of 50 stalls a reconnect storm: past it the kernel drops
    SYNs and each client waits a full second to retry.  Even 1024 overflows
    when 2,000 clients connect at once faster than one process accepts them.
    """
    try:
        with open("/proc/sys/net/core/somaxconn") as somaxconn:
            ceiling = int(somaxconn.read())
    except (OSError, ValueError):
        ceiling = socket.SOMAXCONN
    return max(1024, ceiling)


DEFAULT_BACKLOG = default_backlog()
# Endpoint types whose strports descriptions take ``backlog=``.
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "ssl", tls.TLS_PREFIX, "unix"})
_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def with_backlog(description: str, backlog: int = DEFAULT_BACKLOG) -> str:
    """``description`` with ``backlog=`` added, unless it gives one already.

    Every listener the server opens goes through this (``RelayService.listen``).
    Descriptions of endpoint types that take no backlog are returned as they are.
    """
    fields = _UNESCAPED_COLON.split(description)
    kind = fields[0].lower()
    if kind.isdigit():  # an old-style bare port number is TCP
        kind = "tcp"
    if kind not in _BACKLOG_TYPES or len(fields) < 2:
        return description
    if any(field.lower().startswith("backlog=") for field in fields[1:]):
        return description
    return f"{description}:backlog={backlog}"


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"{value} is not a positive integer")
    return number


_positive_int.coerceDoc = "Must be a positive integer."  # type: ignore[attr-defined]


class Options(usage.Options):
    """Options of ``twistd relay``."""

    synopsis = "[options]"
    longdesc = (
        "Run the Relay message relay. Clients connect, join rooms and every "
        "message published to a room is fanned out to its other members."
    )
    optFlags = [
        ["debug", None, "Log every frame and state transition (also RELAY_DEBUG=1)."],
    ]
    optParameters = [
        ["max-frame-size", None, RelayConfig.max_frame_size, "Largest frame length accepted, in bytes.", _positive_int],
        ["idle-timeout", None, RelayConfig.idle_timeout, "Seconds of client silence before the connection is closed.", _positive_int],
        ["max-pending", None, RelayConfig.max_pending, "Bytes queued for a paused client before it is cut off as a slow consumer.", _positive_int],
        ["max-rooms", None, RelayConfig.max_rooms, "Rooms one connection may be in at once.", _positive_int],
        ["max-connections", None, None, "Concurrent client connections accepted [default: the open-file limit less headroom, at most 50000]", _positive_int],
        ["read-size", None, RelayConfig.read_size, "Bytes read from a client socket at once (also its write buffer before it is paused).", _positive_int],
        ["tls-client-ca", None, None, "PEM file of CA certificates: TLS listeners then require a client certificate signed by one; its common name is the user id."],
    ] + limits.OPTIONS

    def __init__(self) -> None:
        super().__init__()
        self["ports"] = []
        self["websockets"] = []
        self["allowed-origins"] = []

    def opt_port(self, description: str) -> None:
        """Listen on this strports description (repeatable) [default: tcp:4000]."""
        self["ports"].append(description)

    opt_p = opt_port

    def opt_websocket(self, description: str) -> None:
        """Serve WebSocket at /relay and the demo page at / on this strports description; ssl: gives wss (repeatable)."""
        self["websockets"].append(description)

    def opt_allowed_origins(self, origins: str) -> None:
        """Comma-separated browser origins allowed to open WebSockets, * as wildcard (repeatable) [default: any]."""
        self["allowed-origins"].extend(o.strip() for o in origins.split(",") if o.strip())

    def postOptions(self) -> None:
        if not self["ports"]:
            self["ports"] = [DEFAULT_PORT]
        if not self["allowed-origins"]:
            self["allowed-origins"] = ["*"]
        client_ca = self["tls-client-ca"]
        if client_ca is not None and not os.path.isfile(client_ca):
            raise usage.UsageError(f"--tls-client-ca: no such file: {client_ca}")
        if os.environ.get("RELAY_DEBUG", "") not in ("", "0"):
            self["debug"] = True

    def config(self) -> RelayConfig:
        return RelayConfig(
            max_frame_size=self["max-frame-size"],
            idle_timeout=self["idle-timeout"],
            max_pending=self["max-pending"],
            max_rooms=self["max-rooms"],
            max_connections=self["max-connections"] or limits.default_max_connections(open_file_limit()),
            read_size=self["read-size"],
            debug=bool(self["debug"]),
            **limits.config_fields(self),
        )


@implementer(IStreamServerEndpoint)
class _RecordingEndpoint:
    """Wraps a server endpoint to remember the port it listens on."""

    def __init__(self, endpoint: IStreamServerEndpoint, ports: list[IListeningPort]) -> None:
        self._endpoint = endpoint
        self._ports = ports

    def listen(self, factory: Any) -> defer.Deferred[IListeningPort]:
        def record(port: IListeningPort) -> IListeningPort:
            self._ports.append(port)
            log.info("Listening on {address}", address=port.getHost())
            return port

        return self._endpoint.listen(factory).addCallback(record)


class RelayService(service.MultiService):
    """The listeners plus the factory's lifecycle: file limit, shutdown, summary."""

    def __init__(self, factory: RelayFactory) -> None:
        super().__init__()
        self.factory = factory
        self.listening_ports: list[IListeningPort] = []

    def listen(self, description: str, factory: Any) -> None:
        """Add a listener for a strports description, serving ``factory``.

        A port that cannot be bound makes startService raise.
        """
        listener = strports.service(with_backlog(description), factory, reactor=self.factory.reactor)
        listener.endpoint = _RecordingEndpoint(listener.endpoint, self.listening_ports)
        listener.setServiceParent(self)

    def startService(self) -> None:
        open_files = raise_open_file_limit()
        config = self.factory.config
        if open_files is not None and config.max_connections > open_files - limits.FILE_HEADROOM:
            log.warn(
                "--max-connections {connections} is above the open-file limit {limit} less "
                "{headroom} in reserve: connections past it are reset, not refused",
                connections=config.max_connections,
                limit=open_files,
                headroom=limits.FILE_HEADROOM,
            )
        log.info(
            "Open file limit {limit}; max connections {connections}",
            limit=open_files,
            connections=config.max_connections,
        )
        super().startService()
        log.info("Relay started with {config}", config=config)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        # Listeners stop first, so nobody new arrives while clients are told.
        yield super().stopService()
        yield self.factory.shutdown()
        log.info("Relay stopped. Summary: {summary}", summary=self.factory.summary())


def makeService(options: Options, reactor: Any = None) -> RelayService:
    """Build the Relay service tree from parsed options."""
    if reactor is None:
        from twisted.internet import reactor
    factory = RelayFactory(options.config(), reactor=reactor)
    relay = RelayService(factory)
    client_ca = options["tls-client-ca"]
    for description in options["ports"]:
        relay.listen(tls.endpoint_description(description, client_ca), factory)
    if options["websockets"]:
        # Imported here so that `twistd relay` without WebSocket does not pay for autobahn.
        from relay.server.websocket import make_site

        site = make_site(factory, options["allowed-origins"])
        for description in options["websockets"]:
            relay.listen(tls.endpoint_description(description, client_ca), site)
    return relay
