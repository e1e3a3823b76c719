"""The worker's settings: `$XDG_CONFIG_HOME/bonjourgrid/worker.toml`, then flags (flags win).

```toml
[worker]
name = "lab-12"          # peer name on the LAN (default: host name)
cpus = 2                 # task slots (default: CPU count)
ram = "4GiB"             # memory offered to tasks; a bare number is MiB (default: available)
cost = 0.5               # price per CPU-hour (default 0)
cache_dir = "~/bgrid-cache"
cache_size = "10GiB"     # the local cache's bound (LRU); a bare number is MiB (default: the disk)
middleware = ["slurm"]   # what `mw` advertises, `native` always (default: detected, middleware.py)

[idle]
idle_minutes = 15        # idle after this long without keyboard/mouse (HTCondor's default)
max_load = 0.3           # ... and other work under this fraction of the CPUs (1: ignore load)
activity_file = "~/.bgrid-active"   # its mtime is the owner's last activity (replaces the probes)
activity_command = "..." # prints the seconds since the last input (replaces the probes)
always_idle = false      # a dedicated machine: never wait for an owner
vacate_after = 600       # seconds the owner may stay before suspended tasks are killed (0: at once)
```
Relative paths in the file are relative to the file's directory. An unknown table or key is
an error (exit 2) that names the file and suggests the closest known name, as in bgrid.toml.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonjourgrid.errors import ConfigError
from bonjourgrid.keys import key_dir
from bonjourgrid.units import MIB, parse_size, parse_size_mib
from bonjourgrid.worker.core import VACATE_AFTER_S
from bonjourgrid.worker.idle import IdleSettings
from bonjourgrid.worker.middleware import middleware_list

# Every setting: its table in worker.toml and the types it accepts there. The flag of each
# is the same name with dashes (`--idle-minutes`), argparse's dest is the name itself.
_SCHEMA: dict[str, tuple[str, tuple[type, ...]]] = {
    "name": ("worker", (str,)),
    "cpus": ("worker", (int,)),
    "ram": ("worker", (str, int)),
    "cost": ("worker", (int, float)),
    "cache_dir": ("worker", (str,)),
    "cache_size": ("worker", (str, int)),
    "middleware": ("worker", (list, str)),  # a list in the file, "a,b" as a flag
    "idle_minutes": ("idle", (int, float)),
    "max_load": ("idle", (int, float)),
    "activity_file": ("idle", (str,)),
    "activity_command": ("idle", (str,)),
    "always_idle": ("idle", (bool,)),
    "vacate_after": ("idle", (int, float)),
}
_PATHS = ("cache_dir", "activity_file")


@dataclass(frozen=True)
class WorkerSettings:
    """What the user asked of this worker; None: detect it (host name, CPU count, free RAM)."""

    name: str | None = None
    cpus: int | None = None
    ram_mib: int | None = None
    cost: float = 0.0
    cache_dir: Path | None = None
    cache_size: int | None = None  # bytes; None: bounded by the disk only
    middleware: tuple[str, ...] | None = None  # None: detect what is installed
    always_idle: bool = False
    idle: IdleSettings = field(default_factory=IdleSettings)
    vacate_after_s: float = VACATE_AFTER_S  # suspended tasks are vacated after it (core.py)


def worker_config_path() -> Path:
    """Where the worker's config file lives: $XDG_CONFIG_HOME/bonjourgrid/worker.toml."""
    return key_dir() / "worker.toml"


def read_worker_file(path: Path) -> dict[str, tuple[Any, str]]:
    """The settings in a worker.toml, each with where it came from; {} if there is no file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read the worker config {path}: {err}") from err
    found: dict[str, tuple[Any, str]] = {}
    tables = {table for table, _ in _SCHEMA.values()}
    for table, entries in data.items():
        if table not in tables or not isinstance(entries, dict):
            raise _unknown(path, f"table [{table}]", table, sorted(tables))
        known = [k for k, (t, _) in _SCHEMA.items() if t == table]
        for key, value in entries.items():
            where = f"{path}: [{table}] {key}"
            if key not in known:
                raise _unknown(path, f"key {key!r} in [{table}]", key, known)
            types = _SCHEMA[key][1]
            # TOML booleans are not numbers here, whatever Python thinks of bool and int.
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                wanted = " or ".join(t.__name__ for t in types)
                raise ConfigError(f"{where} = {value!r}: expected a {wanted}")
            if key in _PATHS:
                value = str(path.parent / Path(str(value)).expanduser())
            found[key] = (value, where)
    return found


def _unknown(path: Path, what: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    return ConfigError(f"{path}: unknown {what}; {hint}")


def worker_settings(flags: Mapping[str, Any], path: Path | None = None) -> WorkerSettings:
    """The file's settings overridden by the flags that were given (not None), checked.

    `path`: a config file the user named (it must exist); None: the default one, if any.
    """
    if path is not None and not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    values = read_worker_file(path or worker_config_path())
    for key in _SCHEMA:
        if flags.get(key) is not None:
            values[key] = (flags[key], "--" + key.replace("_", "-"))

    def get(key: str) -> Any:
        return values[key][0] if key in values else None

    def check(key: str, ok: bool, what: str) -> None:
        if key in values and not ok:
            raise ConfigError(f"{values[key][1]} {values[key][0]!r}: {what}")

    cpus, cost = get("cpus"), get("cost")
    check("cpus", cpus is None or cpus >= 1, "a worker needs at least 1 task slot")
    check(
        "cost",
        cost is None or (math.isfinite(cost) and cost >= 0),
        "cost is a price per CPU-hour, 0 or more",
    )
    minutes, load = get("idle_minutes"), get("max_load")
    check(
        "idle_minutes",
        minutes is None or (math.isfinite(minutes) and minutes >= 0),
        "minutes without keyboard/mouse activity, 0 or more",
    )
    check(
        "max_load",
        load is None or 0 < load <= 1,
        "a fraction of the CPUs in (0, 1], e.g. 0.3 (1 ignores load)",
    )
    vacate_after = get("vacate_after")
    check(
        "vacate_after",
        vacate_after is None or (math.isfinite(vacate_after) and vacate_after >= 0),
        "seconds the owner may stay before suspended tasks are vacated, 0 or more",
    )
    ram = get("ram")
    ram_mib = None
    if ram is not None:
        try:
            ram_mib = ram if isinstance(ram, int) else parse_size_mib(ram)
        except ConfigError as err:
            raise ConfigError(f"{values['ram'][1]}: {err}") from None
        check("ram", ram_mib > 0, "offer at least 1 MiB")
    activity_file = get("activity_file")
    idle = IdleSettings(
        idle_after_s=60.0 * minutes if minutes is not None else IdleSettings.idle_after_s,
        max_load=float(load) if load is not None else IdleSettings.max_load,
        activity_file=Path(activity_file).expanduser() if activity_file else None,
        activity_command=get("activity_command"),
    )
    cache_size = get("cache_size")
    cache_bytes = None
    if cache_size is not None:
        try:
            # A bare number is MiB, as for `ram`; a size with a unit keeps its exact bytes.
            bare = isinstance(cache_size, int) or cache_size.strip().replace(".", "").isdigit()
            cache_bytes = int(float(cache_size) * MIB) if bare else parse_size(cache_size)
        except ConfigError as err:
            raise ConfigError(f"{values['cache_size'][1]}: {err}") from None
        check("cache_size", cache_bytes >= 0, "a size of 0 or more, e.g. 10GiB")
    cache_dir = get("cache_dir")
    middleware = get("middleware")
    if middleware is not None:
        where = values["middleware"][1]
        names = middleware.split(",") if isinstance(middleware, str) else middleware
        if not all(isinstance(n, str) for n in names):
            raise ConfigError(f'{where}: a list of middleware names, e.g. ["slurm"]')
        middleware = middleware_list(names, where)
    return WorkerSettings(
        name=get("name"),
        cpus=cpus,
        ram_mib=ram_mib,
        cost=float(cost) if cost is not None else 0.0,
        cache_dir=Path(cache_dir).expanduser() if cache_dir else None,
        cache_size=cache_bytes,
        middleware=middleware,
        always_idle=bool(get("always_idle")),
        idle=idle,
        vacate_after_s=float(vacate_after) if vacate_after is not None else VACATE_AFTER_S,
    )
