"""The native backend: tasks run on BonjourGrid's own worker daemons.

The coordinator shell (`coordinator/shell.py`) is this backend's engine; the class names it
in the backend registry so that `--backend native` and the plug-ins share one interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bonjourgrid.dag import Workflow
from bonjourgrid.discovery.txt import PeerRecord


class NativeBackend:
    """Our own workers: nothing to deploy, the coordinator talks to them directly."""

    name = "native"

    def __init__(self) -> None:
        self.workers: list[PeerRecord] = []
        self.workflow: Workflow | None = None

    async def deploy(self, workers: Sequence[PeerRecord]) -> None:
        self.workers = list(workers)

    async def submit(self, workflow: Workflow) -> str:
        self.workflow = workflow
        return workflow.name

    async def poll(self, handle: str) -> dict[str, Any]:
        return {"status": "running" if self.workflow is not None else "unknown"}

    async def teardown(self) -> None:
        self.workers = []
