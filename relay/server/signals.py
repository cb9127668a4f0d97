"""SIGTERM and SIGINT handling that does no I/O in the signal handler.

Twisted's own handlers log "Received SIGTERM" from inside the handler.  A
Python signal handler runs in the main thread between two bytecodes, possibly
in the middle of a write to the very log file it then writes to, whose lock
that thread already holds: the process can deadlock and never stop (Twisted
ticket 7736).  The handler here only records the signal and wakes the reactor
(``callFromThread`` appends to a list and writes a byte to the reactor's
wake-up pipe, taking no lock); the reactor's own ``sigTerm``/``sigInt`` then
run between events, where logging is safe, and stop the reactor as usual,
so twistd still exits by re-raising the signal after the graceful shutdown.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any, Callable

# What the reactor does for each signal, by the name of its method.
_REACTOR_HANDLERS = {signal.SIGTERM: "sigTerm", signal.SIGINT: "sigInt"}


class StopSignals:
    """Installs the handlers; the first SIGTERM or SIGINT stops the reactor.

    Later signals are ignored: the shutdown already under way ends within
    its grace period.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Replace the current SIGTERM and SIGINT handlers (call once the
        reactor is running: it installs its own at startup)."""
        for signum in _REACTOR_HANDLERS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        """Put the handlers found by ``install`` back."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # No I/O here, not even logging: see the module docstring.
        if self.received is not None:
            return
        self.received = signum
        self._reactor.callFromThread(self._stop, signum)

    def _stop(self, signum: int) -> None:
        stop: Callable[[int], None] = getattr(self._reactor, _REACTOR_HANDLERS[signum], None)
        if stop is not None:
            stop(signum)  # logs "Received SIG...", stops the reactor, records the signal
        else:
            self._reactor.stop()
