"""twistd plugin glue: command-line options become services."""

from __future__ import annotations

import os
import re
import socket
from typing import Any

from twisted.application import service, strports
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized
from zope.interface import implementer

from relay.rlimits import open_file_limit, raise_open_file_limit
from relay.server import auth, backplane, compression, history, limits, logs, metrics, presence, tls, workers
from relay.server.factory import RelayConfig, RelayFactory
from relay.server.limits import positive_int as _positive_int
from relay.server.signals import StopSignals

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


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{value} is not a non-negative integer")
    return number


_non_negative_int.coerceDoc = "Must be 0 or a positive integer."  # type: ignore[attr-defined]


class Options(usage.Options):
    """Options of ``twistd relay``."""

    synopsis = "[options]"
    longdesc = (
        "Run the Relay message relay. Clients connect, join rooms and every "
        "message published to a room is fanned out to its other members."
    )
    optFlags = [
        ["debug", None, "Log every frame and state transition (also RELAY_DEBUG=1)."],
    ] + auth.FLAGS
    optParameters = [
        ["max-frame-size", None, RelayConfig.max_frame_size, "Largest frame length accepted, in bytes.", _positive_int],
        ["idle-timeout", None, RelayConfig.idle_timeout, "Seconds of client silence before the connection is closed; 0 never closes a silent client (TCP keepalive still finds dead peers).", _non_negative_int],
        ["max-pending", None, RelayConfig.max_pending, "Bytes queued for a paused client before it is cut off as a slow consumer.", _positive_int],
        ["max-rooms", None, RelayConfig.max_rooms, "Rooms one connection may be in at once.", _positive_int],
        ["max-connections", None, None, "Concurrent client connections accepted [default: the open-file limit less headroom, at most 50000]", _positive_int],
        ["read-size", None, RelayConfig.read_size, "Bytes read from a client socket at once (also its write buffer before it is paused).", _positive_int],
        ["tls-client-ca", None, None, "PEM file of CA certificates: TLS listeners then require a client certificate signed by one; its common name is the user id."],
    ] + metrics.OPTIONS + logs.OPTIONS + backplane.OPTIONS + auth.OPTIONS + limits.OPTIONS + history.OPTIONS
    optParameters += compression.OPTIONS + presence.OPTIONS

    def __init__(self) -> None:
        super().__init__()
        self.argv: list[str] = []  # as given, for --workers to pass on
        self["ports"] = []
        self["websockets"] = []
        self["allowed-origins"] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        self.argv = list(options) if options is not None else []
        super().parseOptions(options)

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
        if self["workers"] and self["redis"] is None:
            raise usage.UsageError("--workers needs --redis: the workers share their rooms through it")
        if self["workers"] and self["metrics"] is not None:
            raise usage.UsageError(
                "--metrics cannot be combined with --workers: every worker would bind its port"
            )
        # Key files are read now, so a bad one stops startup with a usage error.
        self["authenticator"] = auth.from_options(self)

    def config(self) -> RelayConfig:
        return RelayConfig(
            max_frame_size=self["max-frame-size"],
            idle_timeout=self["idle-timeout"],
            max_pending=self["max-pending"],
            max_rooms=self["max-rooms"],
            max_connections=self["max-connections"] or limits.default_max_connections(open_file_limit()),
            read_size=self["read-size"],
            debug=bool(self["debug"]),
            # Cluster
            redis=self["redis"],
            cluster_name=self["cluster-name"],
            redis_queue=self["redis-queue"],
            membership_ttl=self["membership-ttl"],
            **limits.config_fields(self),
            **compression.config_fields(self),
            **history.config_fields(self),
            **presence.config_fields(self),
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
        # Observability (relay.server.metrics, logs, signals); set by makeService.
        self.metrics: metrics.Metrics | None = None
        self.metrics_ports: list[IListeningPort] = []
        # The metrics listener outlives the relay's own: /healthz says 503
        # while clients drain, and it stops last.
        self._metrics_service: service.MultiService | None = None
        self.log_observer: ILogObserver | None = None
        self.stop_signals: StopSignals | None = None
        # In a --workers worker: the inherited listening sockets, in order.
        self._adopted = workers.inherited_listeners(factory.reactor)

    def listen(
        self,
        description: str,
        factory: Any,
        parent: service.MultiService | None = None,
        ports: list[IListeningPort] | None = None,
    ) -> None:
        """Add a listener for a strports description, serving ``factory``.

        A port that cannot be bound makes startService raise.
        """
        # A --workers worker adopts the supervisor's sockets for its own
        # listeners, in order; the metrics listener is its own.
        adopted = ports is None and self._adopted
        reactor = self._adopted.pop(0) if adopted else self.factory.reactor
        listener = strports.service(with_backlog(description), factory, reactor=reactor)
        listener.endpoint = _RecordingEndpoint(
            listener.endpoint, self.listening_ports if ports is None else ports
        )
        listener.setServiceParent(self if parent is None else parent)

    # Observability: the metrics listener, the log observer, signal handling.

    def serve_metrics(self, description: str) -> metrics.Metrics:
        """Serve /metrics, /healthz, /rooms and the dashboard on ``description``."""
        self.metrics = metrics.Metrics(self.factory)
        self.metrics.collector.add_source(compression.metrics_source(self.factory.compressor))
        if self.factory.config.redis is not None:
            # The cluster's link: in the metrics, and /healthz is 503 while it is down.
            self.metrics.collector.add_source(metrics.backplane_source(self.factory.backplane))
            self.metrics.health.add_check("cluster", self.factory.backplane.health)
        self._metrics_service = service.MultiService()
        metrics.SamplerService(self.metrics.sampler).setServiceParent(self._metrics_service)
        self.listen(description, self.metrics.site(), self._metrics_service, self.metrics_ports)
        return self.metrics

    def setServiceParent(self, parent: Any) -> None:
        # twistd's application takes its log observer from this component.
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # twistd binds the ports here: a port that cannot be bound is one
        # clear line and exit status 1, not two tracebacks.
        try:
            super().privilegedStartService()
            if self._metrics_service is not None:
                self._metrics_service.privilegedStartService()
        except CannotListenError as error:
            log.critical("Relay cannot start: {error}", error=str(error))
            raise SystemExit(1) from None

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
        if self._metrics_service is not None:
            self._metrics_service.startService()
        super().startService()
        if self.stop_signals is not None:
            # After the reactor's own handlers, which it installs at startup.
            self.factory.reactor.callWhenRunning(self.stop_signals.install)
        log.info("Relay started with {config}", config=self.factory.config)
        self.factory.backplane.start(self.factory)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        self.factory.shutting_down = True
        # Listeners stop first, so nobody new arrives while clients are told.
        yield super().stopService()
        yield self.factory.shutdown()
        yield self.factory.backplane.stop()
        log.info(SUMMARY_FORMAT, **self.factory.summary())
        if self._metrics_service is not None:
            yield self._metrics_service.stopService()
        if self.stop_signals is not None:
            self.stop_signals.uninstall()


SUMMARY_FORMAT = (
    "Relay stopped after {uptime} s: connections {connections_total} (peak {connections_peak}), "
    "rooms peak {rooms_peak} ({rooms_now} left), messages published {messages_published}, "
    "in {frames_in} frames / {bytes_in} bytes, out {frames_out} frames / {bytes_out} bytes"
)


def makeService(options: Options, reactor: Any = None) -> service.Service:
    """Build the Relay service tree from parsed options."""
    if reactor is None:
        from twisted.internet import reactor
    if options["workers"]:
        descriptions = [
            tls.endpoint_description(description, options["tls-client-ca"])
            for description in options["ports"] + options["websockets"]
        ]
        return workers.WorkerSupervisor(options["workers"], descriptions, options.argv, reactor=reactor)
    workers.become_worker(reactor)
    config = options.config()
    cluster = None
    if config.redis is not None:
        # Imported here so that `twistd relay` without a cluster does not pay for a Redis client.
        from relay.server.redis_backplane import RedisBackplane

        cluster = RedisBackplane(
            config.redis, config.cluster_name, config.redis_queue, config.membership_ttl, reactor=reactor
        )
    factory = RelayFactory(config, reactor=reactor, backplane=cluster, auth=options["authenticator"])
    relay = RelayService(factory)
    if factory.auth is not None:
        auth.ReloadOnHangup(factory.auth, reactor).setServiceParent(relay)
    _observability(options, relay)
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


def _observability(options: Options, relay: RelayService) -> None:
    """The metrics listener; under twistd, the log observer and signal handling."""
    if options["metrics"]:
        relay.serve_metrics(options["metrics"])
    twistd_options = getattr(options, "parent", None)
    if twistd_options is None:  # not run by twistd: logging and signals are the caller's
        return
    out = logs.open_twistd_log(twistd_options)
    if out is not None:
        level = "debug" if options["debug"] else options["log-level"]
        relay.log_observer = logs.make_observer(out, options["log-format"], level)
    relay.stop_signals = StopSignals(relay.factory.reactor)
