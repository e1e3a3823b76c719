"""The deployment side as the coordinator drives it: peers reach the core only once the backend
can run on them, and a backend that cannot deploy stops the job with its reason."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

import pytest

from bonjourgrid.backends.base import (
    Capabilities,
    CommandFailed,
    HeldPeer,
    JobPlan,
    TaskEvent,
    TaskRun,
)
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.deployment import Deployment, DeploymentError
from bonjourgrid.coordinator.services import PeerServices
from bonjourgrid.discovery.txt import PeerRecord
from bonjourgrid.protocol import Message
from tests.records import idle_peer


class RecordingBackend:
    """A backend plug-in that runs nothing and writes down its deployment side; `broken`
    makes its deploy fail as a middleware that is not installed would."""

    name: ClassVar[str] = "recording"
    capabilities: ClassVar[Capabilities] = Capabilities(middleware="native", services=True)

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.calls: list[tuple[Any, ...]] = []

    async def deploy(self, peers: Sequence[HeldPeer]) -> None:
        self.calls.append(("deploy", tuple(p.name for p in peers)))
        if self.broken:
            raise CommandFailed("slurmctld: not found; is it installed?")

    async def add_peer(self, peer: HeldPeer) -> None:
        self.calls.append(("add", peer.name))

    async def remove_peer(self, peer: str, reason: str) -> None:
        self.calls.append(("remove", peer, reason))

    async def teardown(self) -> None:
        self.calls.append(("teardown",))

    def translate(self, plan: JobPlan) -> dict[str, str]:
        return {}

    async def submit(self, run: TaskRun) -> None:
        raise AssertionError("no run in these tests")

    async def submit_plan(self, plan: JobPlan) -> None:
        raise AssertionError("no run in these tests")

    async def events(self) -> AsyncIterator[TaskEvent]:
        return
        yield

    async def cancel(self, task: str, attempt: int, reason: str) -> None:
        return None


class Harness:
    def __init__(self, backend: RecordingBackend) -> None:
        self.to_core: list[core.Event] = []
        self.handed_back: list[str] = []
        self.records: dict[str, PeerRecord] = {}
        self.tasks: set[asyncio.Task[None]] = set()

        async def send(peer: str, message: Message) -> None:
            raise ConnectionError(peer)

        async def hand_back(peer: str) -> None:
            self.handed_back.append(peer)

        def spawn(coro: Any) -> asyncio.Task[None]:
            task: asyncio.Task[None] = asyncio.ensure_future(coro)
            self.tasks.add(task)
            return task

        self.deployment = Deployment(
            backend,  # a plug-in: structurally a Backend
            PeerServices("job", send),
            self.records,
            self.to_core.append,
            spawn,
            hand_back,
        )

    def join(self, name: str) -> None:
        self.records[name] = idle_peer(name, cpus=2, ram=4 << 30, mw=("native", "slurm"))
        self.deployment.from_pool(core.PeerJoined(name, 2, {}))

    async def settle(self) -> None:
        await asyncio.gather(*self.tasks)


async def test_the_first_peers_join_the_core_only_after_deploy_over_all_of_them() -> None:
    backend = RecordingBackend()
    h = Harness(backend)
    h.join("a")
    h.join("b")
    assert h.to_core == []  # held back until the middleware runs on them
    await h.deployment.deploy()
    assert backend.calls == [("deploy", ("a", "b"))]
    assert [e.peer for e in h.to_core if isinstance(e, core.PeerJoined)] == ["a", "b"]

    h.join("c")  # recruited later: added, then joins
    await h.settle()
    assert backend.calls[-1] == ("add", "c")
    assert h.to_core[-1] == core.PeerJoined("c", 2, {})


async def test_a_released_peer_leaves_the_backend_before_it_is_handed_back() -> None:
    backend = RecordingBackend()
    h = Harness(backend)
    h.join("a")
    await h.deployment.deploy()
    await h.deployment.release("a")
    assert backend.calls[-1] == ("remove", "a", "released")
    assert h.handed_back == ["a"]


async def test_a_peer_lost_before_deploy_never_joins() -> None:
    backend = RecordingBackend()
    h = Harness(backend)
    h.join("a")
    h.join("b")
    h.deployment.from_pool(core.PeerLost("b", "silent for 5 s"))
    await h.deployment.deploy()
    assert backend.calls == [("deploy", ("a",))]
    assert h.to_core == [core.PeerJoined("a", 2, {})]  # nothing about b: the core never knew it


async def test_a_backend_that_cannot_deploy_stops_the_job_saying_why() -> None:
    h = Harness(RecordingBackend(broken=True))
    h.join("a")
    with pytest.raises(DeploymentError) as caught:
        await h.deployment.deploy()
    assert str(caught.value) == (
        "the recording backend could not deploy over a: slurmctld: not found; is it installed?"
    )
    assert caught.value.exit_code == 3
    assert h.to_core == []
