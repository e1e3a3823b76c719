"""The native backend and the decoding of bgrid workers' task messages into task events.

The backend is joined to an in-memory `WorkerChannel` (what the coordinator's peer pool
would send is recorded; what workers say is delivered by hand): no sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from bonjourgrid import wire
from bonjourgrid.backends.base import (
    BackendContext,
    Commands,
    PeerGone,
    StagedInput,
    TaskEvent,
    TaskFailed,
    TaskFinished,
    TaskRun,
    TaskStarted,
    load_backend,
)
from bonjourgrid.backends.native import NativeBackend
from bonjourgrid.backends.worker_events import Unreadable, WorkerChannel, WorkerEvents
from bonjourgrid.cache.store import FileRef
from bonjourgrid.errors import ConfigError
from bonjourgrid.protocol import (
    MAX_CONTROL_FRAME,
    Cancel,
    Denied,
    Message,
    Preempted,
    Refused,
    Run,
    RunPart,
    Source,
    Started,
    TaskDone,
)

REF = FileRef("ab" * 32, 5)
OUT = FileRef("cd" * 32, 7)


def task_done(
    task: str = "t",
    attempt: int = 1,
    exit_code: int = 0,
    outputs: tuple[tuple[str, FileRef], ...] = (("out.txt", OUT),),
    error: str = "",
) -> TaskDone:
    return TaskDone(
        "job-1",
        task,
        attempt,
        exit_code,
        outputs,
        "last words",
        error,
        fetch_s=0.25,
        run_s=1.5,
        bytes_fetched=30,
        fetched=(("d1", "coordinator", 10), ("d2", "peer-b", 20)),
        hit_bytes=40,
        stdout=b"out",
        stderr=b"err",
        stdout_size=3,
        stderr_size=3,
    )


def run(task: str = "t", attempt: int = 1, **kw: object) -> TaskRun:
    fields: dict[str, object] = {"command": "true", "outputs": ("out.txt",), "peer": "p"}
    fields.update(kw)
    return TaskRun(task, attempt, **fields)  # type: ignore[arg-type]


def expecting(*runs: TaskRun) -> WorkerEvents:
    events = WorkerEvents()
    for r in runs:
        events.expect(r)
    return events


# -- WorkerEvents: what workers say, as task events -----------------------------------------


def test_started_is_a_task_started() -> None:
    assert expecting(run()).translate("p", Started("job-1", "t", 1)) == TaskStarted("t", 1, "p")


def test_a_clean_task_done_is_a_task_finished_with_what_the_report_needs() -> None:
    event = expecting(run()).translate("p", task_done())
    assert isinstance(event, TaskFinished)
    assert (event.task, event.attempt, event.peer) == ("t", 1, "p")
    assert event.outputs == (("out.txt", OUT),)
    assert event.run_s == 1.5 and event.stderr_tail == "last words"
    detail = event.detail
    assert (detail.fetch_s, detail.bytes_fetched, detail.cache_hits) == (0.25, 30, 40)
    assert detail.peer_to_peer == 20  # what came from the coordinator does not count
    assert detail.logs and (detail.stdout, detail.stderr) == (b"out", b"err")


def test_a_non_zero_exit_is_a_task_failed_with_its_exit_code() -> None:
    event = expecting(run()).translate("p", task_done(exit_code=3, outputs=()))
    assert isinstance(event, TaskFailed)
    assert (event.exit_code, event.reason, event.stderr_tail) == (3, "exit code 3", "last words")
    assert event.run_s == 1.5 and event.detail.fetch_s == 0.25 and event.detail.logs


def test_a_worker_error_is_the_reason() -> None:
    event = expecting(run()).translate("p", task_done(exit_code=-1, error="fetch failed"))
    assert isinstance(event, TaskFailed)
    assert (event.exit_code, event.reason) == (-1, "fetch failed")


def test_outputs_the_run_did_not_declare_fail_it() -> None:
    sneaky = task_done(outputs=(("out.txt", OUT), ("extra.txt", OUT)))
    event = expecting(run()).translate("p", sneaky)
    assert isinstance(event, TaskFailed) and event.exit_code == 0
    assert event.reason == "peer p reported outputs that the task does not declare"


def test_a_report_of_a_run_never_given_is_a_failure_naming_it() -> None:
    event = expecting(run()).translate("p", task_done(attempt=7))
    assert isinstance(event, TaskFailed)
    assert event.reason == "peer p reported attempt 7 of t, which it was not given"
    # A run reports once: a second report of it is one it was not given either.
    events = expecting(run())
    assert isinstance(events.translate("p", task_done()), TaskFinished)
    assert isinstance(events.translate("p", task_done()), TaskFailed)


def test_a_refusal_is_a_failure_that_never_ran() -> None:
    event = expecting(run()).translate("p", Refused("job-1", "t", 1, "no free slot"))
    assert event == TaskFailed("t", 1, "p", "peer p refused the run: no free slot")
    assert event.exit_code is None


def test_an_unreadable_message_about_a_run_fails_that_run() -> None:
    why = "peer p sent a bad message: task_done outputs: '/etc/passwd' is not relative"
    event = expecting(run()).translate("p", Unreadable("t", 1, why))
    assert event == TaskFailed("t", 1, "p", why, exit_code=None)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (Preempted("job-1", "owner is back"), "preempted: owner is back"),
        (Denied("job-1", "lease ran out"), "it dropped the reservation: lease ran out"),
    ],
)
def test_a_peer_leaving_is_peer_gone(message: Preempted | Denied, reason: str) -> None:
    assert WorkerEvents().translate("p", message) == PeerGone("p", reason)


# -- the native backend over an in-memory channel -------------------------------------------


class Links:
    """The coordinator's side of the channel: held peers, and what was sent to them."""

    def __init__(self, held: Sequence[str] = ("p", "q")) -> None:
        self.held = set(held)
        self.sent: list[tuple[str, Message]] = []

    async def send(self, peer: str, message: Message) -> bool:
        if peer not in self.held:
            return False
        wire.encode(message)  # as the pool does: ProtocolError if it cannot go
        self.sent.append((peer, message))
        return True

    def sources(self, peer: str, digest: str, names: Sequence[str]) -> tuple[Source, ...]:
        return tuple(Source(f"tcp://{name}:1", "", name) for name in names)


@pytest.fixture
def links() -> Links:
    return Links()


@pytest.fixture
def channel(links: Links) -> WorkerChannel:
    return WorkerChannel(links.send, links.sources)


@pytest.fixture
def backend(channel: WorkerChannel, tmp_path: Path) -> NativeBackend:
    context = BackendContext("job-1", tmp_path, tmp_path / "state", Commands(), peers=channel)
    return NativeBackend(context)


async def next_event(events: AsyncIterator[TaskEvent]) -> TaskEvent:
    return await asyncio.wait_for(anext(events), 5.0)


def test_native_is_registered_and_needs_native_workers() -> None:
    assert load_backend("native") is NativeBackend
    assert NativeBackend.capabilities.middleware == "native"
    assert NativeBackend.capabilities.placement == "core"


def test_the_native_backend_needs_the_workers_links(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"BackendContext\.peers"):
        NativeBackend(BackendContext("job-1", tmp_path, tmp_path, Commands()))


async def test_submit_sends_the_run_with_its_inputs_sources(
    backend: NativeBackend, links: Links
) -> None:
    staged = StagedInput("in.txt", REF, ("coordinator", "q"))
    await backend.submit(run(inputs=(staged,), env={"A": "1"}, limits={"cpu_s": 5}))
    [(peer, message)] = links.sent
    assert peer == "p" and isinstance(message, Run)
    assert (message.job, message.task, message.attempt, message.command) == (
        "job-1",
        "t",
        1,
        "true",
    )
    assert message.outputs == ("out.txt",) and message.env == {"A": "1"}
    assert message.limits == {"cpu_s": 5}
    [task_input] = message.inputs
    assert (task_input.path, task_input.ref) == ("in.txt", REF)
    assert [s.label for s in task_input.sources] == ["coordinator", "q"]


async def test_a_run_too_big_for_one_frame_goes_in_parts(
    backend: NativeBackend, links: Links
) -> None:
    outputs = tuple(f"out/{i:05d}-{'x' * 3000}.txt" for i in range(2000))  # ~6 MB of paths
    await backend.submit(run(outputs=outputs))
    kinds = [type(m) for _, m in links.sent]
    assert kinds[0] is Run and kinds[1:] and set(kinds[1:]) == {RunPart}
    sent = [o for _, m in links.sent for o in m.outputs]  # type: ignore[attr-defined]
    assert tuple(sent) == outputs


async def test_a_run_that_cannot_be_sent_fails_without_running(
    backend: NativeBackend, links: Links
) -> None:
    events = backend.events()
    await backend.submit(run(command="true " + "x" * (MAX_CONTROL_FRAME * 4 // 5)))
    assert links.sent == []
    event = await next_event(events)
    assert isinstance(event, TaskFailed) and event.exit_code is None
    assert event.reason.startswith("the run of t cannot be sent:"), event.reason


async def test_events_follow_what_the_worker_says(
    backend: NativeBackend, channel: WorkerChannel
) -> None:
    events = backend.events()
    await backend.submit(run())
    channel.deliver("p", Started("job-1", "t", 1))
    channel.deliver("p", task_done())
    assert await next_event(events) == TaskStarted("t", 1, "p")
    assert isinstance(await next_event(events), TaskFinished)


async def test_cancel_stops_the_run_on_its_peer_once(backend: NativeBackend, links: Links) -> None:
    await backend.submit(run(peer="q"))
    links.sent.clear()
    await backend.cancel("t", 1, "its input exists again")
    await backend.cancel("t", 1, "again")  # nothing more is owed
    assert links.sent == [("q", Cancel("job-1", "t"))]


async def test_a_run_for_a_peer_no_longer_held_sends_nothing_and_is_forgotten(
    backend: NativeBackend, links: Links
) -> None:
    await backend.submit(run(peer="gone"))
    await backend.cancel("t", 1, "stop")
    assert links.sent == []
