"""Which middleware this peer can run, for its TXT `mw`: detected from the programs installed.

A backend needs its middleware's daemons on the peers it recruits (backends/base.py
`Capabilities.middleware`); recruitment only takes peers whose `mw` names it. A peer has a
middleware when every program of one of its rows of `_DETECT` is on PATH or in the system's
sbin directories (where Debian puts `slurmd` and `munged`). `native`, our own task runner, is
always there. The user's list (`middleware = [...]` in worker.toml, `bgrid worker
--middleware`) replaces detection; `native` is kept first whatever it says.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Sequence

from bonjourgrid.errors import ConfigError

NATIVE = "native"
# middleware -> alternatives, each a set of programs that must all be installed
_DETECT: dict[str, tuple[tuple[str, ...], ...]] = {
    "slurm": (("slurmd", "munged"),),
    "condor": (("condor_startd",), ("condor_master",)),
    "boinc": (("boinc",), ("boinc_client",)),
}
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
# As the TXT schema takes it (discovery/txt.py): at most 16 names like these.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_MAX = 16


def search_path(path: str | None = None) -> list[str]:
    """The directories looked in: `path` (default $PATH), then the system's sbin ones."""
    dirs = [d for d in (path if path is not None else os.environ.get("PATH", "")).split(":") if d]
    return [*dirs, *(d for d in _SBIN if d not in dirs)]


def detect_middleware(dirs: Sequence[str] | None = None) -> tuple[str, ...]:
    """The middleware installed in `dirs` (default `search_path()`), `native` first."""
    where = os.pathsep.join(dirs if dirs is not None else search_path())
    found = [
        name
        for name, alternatives in _DETECT.items()
        if any(all(shutil.which(p, path=where) for p in programs) for programs in alternatives)
    ]
    return (NATIVE, *found)


def middleware_list(names: Iterable[str], where: str) -> tuple[str, ...]:
    """The user's list, checked (`where` names its origin in the error), `native` first."""
    out = [NATIVE]
    for name in names:
        name = name.strip().lower()
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: {name!r} is not a middleware name (lower case letters, digits, _ or -;"
                " e.g. slurm, condor, boinc)"
            )
        if name not in out:
            out.append(name)
    if len(out) > _MAX:
        raise ConfigError(f"{where}: more than {_MAX} middleware names")
    return tuple(out)
