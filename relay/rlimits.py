"""Process limits: raising the open-file limit, for the server and the tools alike."""

from __future__ import annotations

from twisted.logger import Logger

log = Logger()


def raise_open_file_limit() -> None:
    """Raise the soft limit on open files to the hard limit, and log it."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:
            log.warn("Could not raise the open file limit: {error}", error=error)
    log.info("Open file limit: {limit}", limit=soft)
