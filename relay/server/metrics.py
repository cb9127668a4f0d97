"""Metrics, health and the live dashboard, on one HTTP listener (``--metrics``).

``/metrics`` is Prometheus text made by ``prometheus_client`` from a custom
collector: every value is read at scrape time from what the server keeps
anyway (``Stats``, the room registry, the live connections), so the fan-out
path does no work for metrics.  The three distributions (fan-out size, bytes
queued at a flush, in-server latency) come from sampled batches
(``relay.server.fanout.Batch.probe_next``), a few per second.

``/healthz`` is JSON: 200 while serving, 503 once shutdown has begun or a
health check fails.  ``/rooms`` lists the largest rooms by members (capped).
``/`` is a self-contained dashboard page that polls the other two.

Other parts of the server add their own metrics with
``RelayCollector.add_source`` and their own health with
``Health.add_check``, so this module needs no change for them.
"""

from __future__ import annotations

import bisect
import heapq
from importlib import resources
from typing import Any, Callable, Iterable

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from relay import __version__
from relay.server.factory import RelayFactory
from relay.server.fanout import Probe
from relay.server.protocol import State
from relay.wire import ErrorCode, MessageType

log = Logger()

OPTIONS = [
    [
        "metrics",
        None,
        None,
        "Serve Prometheus metrics at /metrics, /healthz and a live dashboard at / on this "
        "strports description (e.g. tcp:9100:interface=127.0.0.1).",
        None,
    ],
]

# Batches probed per second for the distributions.
PROBE_INTERVAL = 0.1
# /rooms lists this many rooms unless ?limit= asks for fewer or more, up to the cap.
DEFAULT_TOP_ROOMS = 10
MAX_TOP_ROOMS = 100
TRANSPORTS = ("tcp", "tls", "unix", "websocket")
# Reasons shown at 0 before the first refusal, so that rates start from it.
REFUSAL_REASONS = ("max_connections",)
# Seconds; a delivery within one read and flush is usually well under 1 ms.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
FANOUT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
QUEUE_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)

MetricSource = Callable[[], Iterable[Metric]]
HealthCheck = Callable[[], tuple[bool, str]]


class Distribution:
    """Cumulative histogram buckets, for a HistogramMetricFamily at scrape time."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def buckets(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs, ending with +Inf."""
        cumulative = 0
        result = []
        for bound, count in zip([*map(_bucket_label, self.bounds), "+Inf"], self.counts):
            cumulative += count
            result.append((bound, cumulative))
        return result

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(name, documentation, buckets=self.buckets(), sum_value=self.sum)


def _bucket_label(bound: float) -> str:
    return repr(float(bound))


class Sampler:
    """Asks the factory's batch for a probe every ``interval`` and keeps the
    distributions the probes measured."""

    def __init__(self, factory: RelayFactory, interval: float = PROBE_INTERVAL) -> None:
        self.factory = factory
        self.latency = Distribution(LATENCY_BUCKETS)
        self.fanout = Distribution(FANOUT_BUCKETS)
        self.queued = Distribution(QUEUE_BUCKETS)
        self._loop = task.LoopingCall(self.probe)
        self._loop.clock = factory.reactor
        self._interval = interval

    def start(self) -> None:
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def probe(self) -> None:
        """Measure the next batch that queues anything."""
        self.factory.batch.probe_next(self.factory.reactor.seconds, self.observe)

    def observe(self, probe: Probe) -> None:
        self.latency.observe(max(0.0, probe.latency))
        for members, broadcasts in probe.fanout_sizes:
            self.fanout.observe(members, broadcasts)
        for size in probe.queued_bytes:
            self.queued.observe(size)


class RelayCollector:
    """The ``relay_`` metrics, read from the factory at each scrape.

    ``add_source(fn)`` adds more: ``fn()`` returns metric families.
    """

    def __init__(self, factory: RelayFactory, sampler: Sampler | None = None) -> None:
        self.factory = factory
        self.sampler = sampler
        self.sources: list[MetricSource] = [self._core]
        if sampler is not None:
            self.sources.append(self._distributions)

    def add_source(self, source: MetricSource) -> None:
        self.sources.append(source)

    def collect(self) -> Iterable[Metric]:
        for source in self.sources:
            yield from source()

    def _core(self) -> Iterable[Metric]:
        factory = self.factory
        stats = factory.stats

        yield _gauge("relay_info", "Relay's version, as a label.", 1, version=__version__)
        yield _gauge(
            "relay_serving", "1 while the server serves, 0 once shutdown has begun.",
            0 if factory.shutting_down else 1,
        )
        yield _gauge(
            "relay_start_time_seconds", "When the server started, in seconds since the epoch.",
            stats.started,
        )
        connections = GaugeMetricFamily(
            "relay_connections", "Client connections open now, by transport.", labels=["transport"]
        )
        for transport in TRANSPORTS:
            connections.add_metric([transport], stats.connections_by_transport[transport])
        yield connections
        yield _gauge("relay_connections_peak", "Most client connections open at once.", stats.connections_peak)
        refused = CounterMetricFamily(
            "relay_connections_refused",
            "Connections turned away before any work, by reason.",
            labels=["reason"],
        )
        for reason in sorted(set(REFUSAL_REASONS) | set(stats.refused)):
            refused.add_metric([reason], stats.refused[reason])
        yield refused
        yield _counter(
            "relay_connections_accepted",
            "Client connections accepted (not refused).",
            stats.connections_total - sum(stats.refused.values()),
        )

        draining = queued = 0
        for connection in factory.connections:
            if connection.state is State.DRAINING:
                draining += 1
                queued += connection.queued_bytes
        yield _gauge(
            "relay_connections_draining",
            "Connections whose socket buffer is full (DRAINING): frames wait in their queue.",
            draining,
        )
        yield _gauge(
            "relay_outbound_queue_bytes", "Bytes waiting in the queues of DRAINING connections.", queued
        )

        registry = factory.registry
        yield _gauge("relay_rooms", "Rooms that exist now (with at least one member).", len(registry))
        yield _gauge(
            "relay_memberships", "Room memberships now (a connection in 3 rooms counts 3).",
            sum(len(room) for room in registry),
        )

        yield from self._frames()
        yield _counter("relay_bytes_received", "Bytes read from clients.", stats.bytes_in)
        yield _counter("relay_bytes_sent", "Bytes written to clients.", stats.bytes_out)
        yield _counter(
            "relay_messages_published",
            "Messages accepted from publishers and fanned out.",
            stats.messages_published,
        )

        errors = CounterMetricFamily(
            "relay_errors_sent", "ERROR frames sent to clients, by code.", labels=["code"]
        )
        for code in ErrorCode:
            errors.add_metric([code.value], stats.errors_sent[code])
        yield errors
        yield _counter(
            "relay_slow_consumers",
            "Connections cut off as slow consumers (SLOW_CONSUMER).",
            stats.errors_sent[ErrorCode.SLOW_CONSUMER],
        )
        yield _counter(
            "relay_auth_failures", "Connections refused for authentication (UNAUTHORIZED).",
            stats.errors_sent[ErrorCode.UNAUTHORIZED],
        )
        yield _counter(
            "relay_rate_limited", "Requests refused by a rate limit (RATE_LIMITED).",
            stats.errors_sent[ErrorCode.RATE_LIMITED],
        )

    def _frames(self) -> Iterable[Metric]:
        stats = self.factory.stats
        received = CounterMetricFamily(
            "relay_frames_received", "Frames read from clients, by type.", labels=["type"]
        )
        sent = CounterMetricFamily("relay_frames_sent", "Frames written to clients, by type.", labels=["type"])
        in_by_type = stats.frames_in_by_type
        out_by_type = stats.frames_out_by_type
        # Shared fan-out frames are not counted by type (that would be work
        # per delivery): they are all MESSAGEs, the rest of frames_out.
        shared = stats.frames_out - sum(out_by_type.values())
        for type_ in MessageType:
            if type_ is MessageType.MESSAGE:
                frames_in = stats.frames_in - sum(in_by_type.values())
                frames_out = shared + out_by_type[type_]
            else:
                frames_in = in_by_type[type_]
                frames_out = out_by_type[type_]
            received.add_metric([type_.name], frames_in)
            sent.add_metric([type_.name], frames_out)
        yield received
        yield sent

    def _distributions(self) -> Iterable[Metric]:
        sampler = self.sampler
        yield sampler.latency.family(
            "relay_delivery_latency_seconds",
            "In-server latency, sampled: from the first frame a read queues to the end of its writes.",
        )
        yield sampler.fanout.family(
            "relay_broadcast_fanout_members",
            "Members a broadcast is handed to, sampled (counted once per broadcast).",
        )
        yield sampler.queued.family(
            "relay_flush_queue_bytes",
            "Bytes an outbox holds when it is flushed, sampled (once per connection flushed).",
        )


def _gauge(name: str, documentation: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def backplane_source(backplane: Any) -> MetricSource:
    """The cluster backplane's own metrics (its link, what crossed it), at each scrape."""

    def collect() -> Iterable[Metric]:
        for name, kind, documentation, value in backplane.metric_values():
            if kind == "counter":
                yield _counter(name, documentation, value)
            else:
                yield _gauge(name, documentation, value)

    return collect


class Health:
    """What /healthz reports: serving unless shutting down or a check fails.

    ``add_check(name, fn)``: ``fn()`` returns ``(ok, detail)``.
    """

    def __init__(self, factory: RelayFactory) -> None:
        self.factory = factory
        self.checks: dict[str, HealthCheck] = {}

    def add_check(self, name: str, check: HealthCheck) -> None:
        self.checks[name] = check

    def report(self) -> tuple[int, dict[str, Any]]:
        """The HTTP status and the JSON body."""
        factory = self.factory
        checks = {}
        healthy = True
        for name, check in self.checks.items():
            ok, detail = check()
            checks[name] = {"ok": ok, "detail": detail}
            healthy = healthy and ok
        if factory.shutting_down:
            status = "shutting_down"
        elif not healthy:
            status = "degraded"
        else:
            status = "serving"
        body = {
            "status": status,
            "version": __version__,
            "uptime": round(factory.reactor.seconds() - factory.stats.started, 3),
            "connections": len(factory.connections),
            "checks": checks,
        }
        return (200 if status == "serving" else 503), body


def top_rooms(factory: RelayFactory, limit: int) -> dict[str, Any]:
    """The ``limit`` largest rooms by members, largest first."""
    largest = heapq.nlargest(limit, factory.registry, key=len)
    return {
        "rooms": [{"room": room.name, "members": len(room)} for room in largest],
        "total": len(factory.registry),
        "limit": limit,
    }


class _Page(Resource):
    """A leaf that answers HEAD like GET without a body (health checkers
    use HEAD; twisted.web would log a line for every one otherwise)."""

    isLeaf = True

    def render_HEAD(self, request: Request) -> bytes:
        body = self.render_GET(request)  # type: ignore[attr-defined]
        request.setHeader(b"content-length", b"%d" % len(body))
        return b""


class _JSONResource(_Page):

    def send_json(self, request: Request, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return orjson.dumps(body)


class HealthResource(_JSONResource):
    def __init__(self, health: Health) -> None:
        super().__init__()
        self.health = health

    def render_GET(self, request: Request) -> bytes:
        status, body = self.health.report()
        return self.send_json(request, status, body)


class RoomsResource(_JSONResource):
    def __init__(self, factory: RelayFactory) -> None:
        super().__init__()
        self.factory = factory

    def render_GET(self, request: Request) -> bytes:
        limit = DEFAULT_TOP_ROOMS
        raw = request.args.get(b"limit", [b""])[0][:8]
        if raw:
            try:
                limit = int(raw)
            except ValueError:
                return self.send_json(request, 400, {"error": "limit must be an integer"})
        limit = max(1, min(MAX_TOP_ROOMS, limit))
        return self.send_json(request, 200, top_rooms(self.factory, limit))


class MetricsResource(_Page):

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return generate_latest(self.registry)


def dashboard_page() -> bytes:
    """The dashboard, read from the installed package."""
    return resources.files("relay.server").joinpath("static", "dashboard.html").read_bytes()


class DashboardPage(_Page):
    """The dashboard: one self-contained HTML file that polls /metrics and /rooms."""

    def __init__(self, page: bytes) -> None:
        super().__init__()
        self._page = page

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-cache")
        # Nothing but this page's own inline code and its own server.
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            b"connect-src 'self'; img-src data:",
        )
        return self._page


class MetricsSite(Site):
    """The metrics listener's site; it keeps no access log, since a scraper
    every few seconds would drown the server's own log lines."""

    def log(self, request: Request) -> None:
        pass


class Metrics:
    """Everything behind ``--metrics``: the collector, health, the sampler, the site."""

    def __init__(self, factory: RelayFactory, process_metrics: bool = True) -> None:
        self.factory = factory
        self.sampler = Sampler(factory)
        self.collector = RelayCollector(factory, self.sampler)
        self.health = Health(factory)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    def site(self) -> Site:
        """The HTTP site: /, /metrics, /healthz and /rooms."""
        root = Resource()
        root.putChild(b"", DashboardPage(dashboard_page()))
        root.putChild(b"metrics", MetricsResource(self.registry))
        root.putChild(b"healthz", HealthResource(self.health))
        root.putChild(b"rooms", RoomsResource(self.factory))
        site = MetricsSite(root, timeout=self.factory.config.idle_timeout, reactor=self.factory.reactor)
        site.displayTracebacks = False
        return site


class SamplerService(service.Service):
    """Runs the sampler while the metrics listener is up."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def startService(self) -> None:
        super().startService()
        self.sampler.start()

    def stopService(self) -> None:
        self.sampler.stop()
        return super().stopService()
