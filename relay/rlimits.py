"""Process limits: raising the open-file limit, for the server and the tools alike."""

from __future__ import annotations

from twisted.logger import Logger

log = Logger()


def open_file_limit() -> int | None:
    """The open-file limit the process can raise itself to (the hard limit).

    None where there is no such limit to read (not POSIX) or it is unlimited.
    """
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return None if hard == resource.RLIM_INFINITY else hard


def raise_open_file_limit() -> int | None:
    """Raise the soft limit on open files to the hard limit, log it, and return it."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:
            log.warn("Could not raise the open file limit: {error}", error=error)
    log.info("Open file limit: {limit}", limit=soft)
    return None if soft == resource.RLIM_INFINITY else soft
