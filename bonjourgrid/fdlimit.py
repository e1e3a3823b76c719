"""File descriptors: as many as the system lets this process have.

A desktop session usually starts processes with a soft limit of 1024 open files and a hard
limit far above it. A worker or a coordinator holds one descriptor per TCP connection, and
anyone on the LAN may open connections to its ports before any key is checked: 1,100 idle
connections used to leave a worker unable to accept a coordinator or to start a task
("Too many open files"). Raising the soft limit to the hard one is what an unprivileged
process may do; the CURVE handshake timeout (`wire.HANDSHAKE_IVL_MS`) then closes the
connections that never prove a key.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

_WANTED = 1 << 20  # enough for any LAN; also the kernel's usual nr_open


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _WANTED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as err:  # a hard limit of "unlimited" above nr_open
            log.warning("could not raise the open-file limit from %d: %s", soft, err)
    return soft, hard
