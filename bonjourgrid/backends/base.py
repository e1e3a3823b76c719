"""The backend interface: the same recruitment, another middleware to run the DAG.

BonjourGrid's idea: the coordinator recruits idle peers over mDNS, then deploys a
middleware instance over them (HTCondor, BOINC, XtremWeb) or runs tasks on its own workers
(`native`). Backends are found through the entry point group `bonjourgrid.backends`.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol

from bonjourgrid.dag import Workflow
from bonjourgrid.discovery.txt import PeerRecord
from bonjourgrid.errors import ConfigError

ENTRY_POINT_GROUP = "bonjourgrid.backends"


class Backend(Protocol):
    """deploy(workers) / submit(dag) / poll / teardown, as DESIGN.md fixes it."""

    name: str

    async def deploy(self, workers: Sequence[PeerRecord]) -> None:
        """Make the recruited peers ready to run tasks (start middleware daemons, ...)."""

    async def submit(self, workflow: Workflow) -> str:
        """Hand the workflow to the middleware; an id to poll."""

    async def poll(self, handle: str) -> dict[str, Any]:
        """The job's progress in the report's shape (status, tasks)."""

    async def teardown(self) -> None:
        """Stop what deploy started; peers go back to idle."""


def available_backends() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_backend(name: str) -> type[Backend]:
    """The backend class registered under `name`; ConfigError listing the known ones."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            backend: type[Backend] = ep.load()
            return backend
    raise ConfigError(
        f"no backend named {name!r}; installed: {', '.join(available_backends()) or 'none'}"
    )
