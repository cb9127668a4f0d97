"""``--workers N``: one host, N Relay processes sharing the listening sockets.

The supervisor (the ``twistd relay`` process itself) opens every
``--port`` and ``--websocket`` listener once and never accepts on them.  It
starts N workers, each an ordinary ``twistd -n relay`` with the same
options but ``--workers``, inheriting the listening sockets as file
descriptors 3, 4, ...; each worker adopts them
(``IReactorSocket.adoptStreamPort``) and the kernel hands every new
connection to one of the workers waiting in ``accept``.  The workers share
their rooms through the Redis backplane (``--redis`` is required).

The listeners are opened through Twisted's own endpoint parsers, given a
stand-in reactor (``ListenerCapture`` in the supervisor, ``Adopter`` in a
worker), so every description works as without ``--workers``: ``tcp:``,
``ssl:`` (the worker wraps the adopted port in TLS), ``unix:``.

A worker that dies is restarted, after a backoff that grows while it keeps
dying young, and logged.  SIGTERM (or SIGINT) to the supervisor sends
SIGTERM to every worker, which drain their clients (SERVER_SHUTDOWN) as a
single process does; a worker still running after the grace is killed.
The workers' output is logged by the supervisor, line by line, with the
worker's number and pid.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from twisted.application import service, strports
from twisted.internet import defer, main, protocol
from twisted.internet.interfaces import IReactorSSL, IReactorTCP, IReactorUNIX, IReadDescriptor
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from relay.server.factory import SHUTDOWN_GRACE_SECONDS

log = Logger()

# Told to a worker: the file descriptors it inherited, one per listener, in
# the order of the command line's --port then --websocket options.
FDS_VARIABLE = "RELAY_WORKER_FDS"
INDEX_VARIABLE = "RELAY_WORKER"
FIRST_FD = 3
# Restarts: after RESTART_DELAY, doubling while a worker dies within
# STABLE_SECONDS of starting, up to MAX_RESTART_DELAY.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 10.0
STABLE_SECONDS = 10.0
# A worker gets the shutdown grace its clients get, and a margin to exit.
STOP_GRACE_SECONDS = SHUTDOWN_GRACE_SECONDS + 3.0
# Longest line of a worker's output that is logged whole.
MAX_LINE = 4096


class _Proxy:
    """Every attribute of the wrapped reactor but the ones a subclass defines."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class _NoConnections(protocol.Factory):
    """The supervisor's listeners never accept: a factory for nothing."""

    def buildProtocol(self, addr: Any) -> None:
        return None


@implementer(IReactorTCP, IReactorSSL, IReactorUNIX)
class ListenerCapture(_Proxy):
    """The supervisor's reactor for the endpoint parsers: it binds and listens
    as asked, but never accepts; ``ports`` are what it opened."""

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.ports: list[Any] = []

    def _keep(self, port: Any) -> Any:
        port.stopReading()  # the workers accept, not the supervisor
        self.ports.append(port)
        return port

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        return self._keep(self._reactor.listenTCP(port, _NoConnections(), backlog, interface))

    def listenSSL(self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = "") -> Any:
        # TLS is the workers' business: the socket under it is plain TCP.
        return self.listenTCP(port, factory, backlog, interface)

    def listenUNIX(self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0) -> Any:
        return self._keep(self._reactor.listenUNIX(address, _NoConnections(), backlog, mode, wantPID))


@implementer(IReactorTCP, IReactorSSL, IReactorUNIX)
class Adopter(_Proxy):
    """A worker's reactor for one listener: instead of binding, it adopts the
    inherited listening socket ``fd`` (whatever address was asked for)."""

    def __init__(self, reactor: Any, fd: int) -> None:
        super().__init__(reactor)
        self._fd = fd

    def _adopt(self, factory: Any) -> Any:
        with socket.socket(fileno=os.dup(self._fd)) as inherited:
            family = inherited.family
        port = self._reactor.adoptStreamPort(self._fd, family, factory)
        os.close(self._fd)  # the reactor listens on a duplicate
        return port

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        return self._adopt(factory)

    def listenSSL(self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = "") -> Any:
        return self._adopt(TLSMemoryBIOFactory(contextFactory, False, factory))

    def listenUNIX(self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0) -> Any:
        return self._adopt(factory)


def inherited_listeners(reactor: Any, environ: dict[str, str] | None = None) -> list[Adopter]:
    """In a worker, one ``Adopter`` per inherited listener, in order; else []."""
    environ = os.environ if environ is None else environ
    fds = environ.get(FDS_VARIABLE, "")
    return [Adopter(reactor, int(fd)) for fd in fds.split(",") if fd]


@implementer(IReadDescriptor)
class _SupervisorWatch:
    """A worker's end of the pipe on its stdin: at EOF the supervisor is gone."""

    def __init__(self, reactor: Any, fd: int = 0) -> None:
        self._reactor = reactor
        self._fd = fd
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "supervisor-pipe"

    def doRead(self) -> Any:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError as error:
            return error
        return None if data else main.CONNECTION_DONE

    def connectionLost(self, reason: Any) -> None:
        log.warn("The supervisor is gone: stopping")
        if self._reactor.running:
            self._reactor.stop()


def become_worker(reactor: Any, environ: dict[str, str] | None = None) -> bool:
    """In a worker process (started by a supervisor), leave the terminal's
    process group, so that only the supervisor tells it when to stop, and
    stop if the supervisor dies.  Elsewhere, do nothing; True in a worker."""
    environ = os.environ if environ is None else environ
    if INDEX_VARIABLE not in environ:
        return False
    os.setpgrp()
    reactor.addReader(_SupervisorWatch(reactor))
    return True


def worker_argv(argv: list[str]) -> list[str]:
    """The relay options a worker runs with: the supervisor's, less ``--workers``."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            kept.append(arg)
    return kept


def restart_delay(consecutive: int) -> float:
    """Seconds before restarting a worker that died young ``consecutive`` times in a row."""
    return min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** min(consecutive - 1, 30))


class _Worker(protocol.ProcessProtocol):
    """One worker process: its output goes to the supervisor's log."""

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.started = 0.0
        self.ended: defer.Deferred[None] = defer.Deferred()
        self._partial = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *lines, self._partial[fd] = (self._partial.get(fd, b"") + data).split(b"\n")
        if len(self._partial[fd]) > MAX_LINE:
            lines.append(self._partial[fd])
            self._partial[fd] = b""
        for line in lines:
            self._log(line)

    def _log(self, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip()
        if text:
            log.info(
                "worker {index} [{pid}] {line}",
                index=self.index,
                pid=self.pid,
                line=text[:MAX_LINE],
            )

    def processEnded(self, reason: Any) -> None:
        for rest in self._partial.values():
            if rest:
                self._log(rest)
        self.supervisor.worker_ended(self, reason.value)
        self.ended.callback(None)

    def signal(self, name: str) -> None:
        if self.pid is not None and not self.ended.called:
            try:
                self.transport.signalProcess(name)
            except OSError:
                pass


class WorkerSupervisor(service.Service):
    """Opens the listeners once and keeps ``count`` workers running on them."""

    def __init__(self, count: int, descriptions: list[str], argv: list[str], reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.count = count
        self.descriptions = descriptions
        self.argv = worker_argv(argv)
        self.capture = ListenerCapture(reactor)
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self._young_deaths: dict[int, int] = {}
        self._pending: dict[int, Any] = {}
        self._stopping = False

    @property
    def listening_ports(self) -> list[Any]:
        return self.capture.ports

    def startService(self) -> None:
        super().startService()
        for description in self.descriptions:
            # A port that cannot be bound raises here and aborts startup.
            strports.service(description, _NoConnections(), reactor=self.capture).startService()
        for port in self.capture.ports:
            log.info("Listening on {address}, shared by {count} workers", address=port.getHost(), count=self.count)
        for index in range(1, self.count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._pending.pop(index, None)
        if self._stopping:
            return
        worker = _Worker(self, index)
        fds = {0: "w", 1: "r", 2: "r"}
        for offset, port in enumerate(self.capture.ports):
            fds[FIRST_FD + offset] = port.fileno()
        env = dict(os.environ)
        env[FDS_VARIABLE] = ",".join(str(FIRST_FD + i) for i in range(len(self.capture.ports)))
        env[INDEX_VARIABLE] = str(index)
        command = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "relay", *self.argv,
        ]
        self.reactor.spawnProcess(worker, sys.executable, command, env=env, childFDs=fds)
        worker.started = self.reactor.seconds()
        self.workers[index] = worker
        log.info("worker {index} started, pid {pid}", index=index, pid=worker.pid)

    def worker_ended(self, worker: _Worker, how: Any) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self._stopping:
            log.info("worker {index} (pid {pid}) stopped: {how}", index=worker.index, pid=worker.pid, how=how)
            return
        lived = self.reactor.seconds() - worker.started
        young = self._young_deaths.get(worker.index, 0) + 1 if lived < STABLE_SECONDS else 1
        self._young_deaths[worker.index] = young
        delay = restart_delay(young)
        self.restarts += 1
        log.warn(
            "worker {index} (pid {pid}) exited after {lived:.1f} s: {how}; restarting it in {delay:.1f} s",
            index=worker.index,
            pid=worker.pid,
            lived=lived,
            how=how,
            delay=delay,
        )
        self._pending[worker.index] = self.reactor.callLater(delay, self._spawn, worker.index)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """SIGTERM every worker, wait for them to drain; kill stragglers."""
        self._stopping = True
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending = {}
        workers = list(self.workers.values())
        for worker in workers:
            worker.signal("TERM")
        ended = defer.DeferredList([worker.ended for worker in workers])
        grace = self.reactor.callLater(STOP_GRACE_SECONDS, self._kill, workers)
        yield ended
        if grace.active():
            grace.cancel()
        for port in self.capture.ports:
            yield port.stopListening()
        yield super().stopService()
        log.info("All workers stopped")

    def _kill(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if not worker.ended.called:
                log.warn("worker {index} (pid {pid}) did not stop in time: killed", index=worker.index, pid=worker.pid)
                worker.signal("KILL")

