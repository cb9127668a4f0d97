"""Log output for ``twistd relay``: the format (text or JSON lines) and the level.

twistd lets an application bring its own log observer (an ``ILogObserver``
component on the application); ``RelayService`` sets one built here, writing
where twistd would have written (``--logfile``, or stdout with ``-n``), so
``--logfile`` and SIGUSR1 rotation keep working.

- ``text`` (the default) is twistd's usual human-readable line.
- ``json`` is one JSON object per line: ``time`` (seconds since the epoch),
  ``level``, ``namespace``, ``message`` (the formatted text) and the event's
  own structured fields (``conn``, ``room``, ``user``, ...).

``--log-level warn`` drops info events, among them the per-connection
connect, disconnect, join and leave lines; ``--debug`` implies ``debug``.
"""

from __future__ import annotations

import signal
import sys
from typing import IO, Any

import orjson
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python import logfile
from zope.interface import implementer

FORMATS = ("text", "json")
LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


def log_format(value: str) -> str:
    """A --log-format value: text or json."""
    if value not in FORMATS:
        raise ValueError(f"--log-format: {value!r} is not one of {', '.join(FORMATS)}")
    return value


log_format.coerceDoc = "text or json."  # type: ignore[attr-defined]


def log_level(value: str) -> str:
    """A --log-level value, one of LEVELS."""
    if value not in LEVELS:
        raise ValueError(f"--log-level: {value!r} is not one of {', '.join(LEVELS)}")
    return value


log_level.coerceDoc = "debug, info, warn, error or critical."  # type: ignore[attr-defined]


OPTIONS = [
    ["log-format", None, "text", "Log lines as human-readable text, or as one JSON object per line (json).", log_format],
    ["log-level", None, "info", "Least severe log events written; warn drops per-connection lines.", log_level],
]

# Fields of every event that are twisted.logger's own, or not worth shipping.
_SKIPPED_FIELDS = frozenset({"log_logger", "log_source", "log_io", "log_trace", "log_observer"})


def event_as_json(event: LogEvent) -> bytes:
    """One log event as a JSON line (ending in a newline)."""
    record: dict[str, Any] = {
        "time": event.get("log_time"),
        "level": _level_name(event.get("log_level")),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _SKIPPED_FIELDS or key in record:
            continue
        record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE)


def _level_name(level: Any) -> str | None:
    return getattr(level, "name", None)


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one JSON object on a line of its own."""

    def __init__(self, out: IO[Any]) -> None:
        self._out = out

    def __call__(self, event: LogEvent) -> None:
        self._out.write(event_as_json(event).decode("utf-8"))
        flush = getattr(self._out, "flush", None)
        if flush is not None:
            flush()


def make_observer(out: IO[Any], format_: str = "text", level: str = "info") -> ILogObserver:
    """An observer writing ``out`` in ``format_`` and dropping events below ``level``."""
    base = JSONLinesObserver(out) if format_ == "json" else textFileLogObserver(out)
    return FilteringLogObserver(base, [LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])])


def open_twistd_log(twistd_options: Any) -> IO[Any] | None:
    """Where twistd would write its log, given its own options; None when
    another logger (``--syslog``, ``--logger``) is configured."""
    if twistd_options.get("syslog") or twistd_options.get("logger"):
        return None
    name = twistd_options.get("logfile")
    if name == "-" or (twistd_options.get("nodaemon") and not name):
        return sys.stdout
    log_file = logfile.LogFile.fromFullPath(name or "twistd.log")
    _rotate_on_sigusr1(log_file)
    return log_file


def _rotate_on_sigusr1(log_file: logfile.LogFile) -> None:
    """Rotate on SIGUSR1, as twistd does with its own log file."""
    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum: int, frame: Any) -> None:
        # No I/O in a signal handler: the reactor rotates between events.
        from twisted.internet import reactor

        reactor.callFromThread(log_file.rotate)

    signal.signal(signal.SIGUSR1, rotate)
