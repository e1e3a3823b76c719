"""A coordinator against a hostile peer: a test double that speaks the real wire on a real
zmq socket and lies in every way a message can. Whatever it sends, the attempt it names
fails with a clear reason, nothing lands outside the submit directory, and the job ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from bonjourgrid import wire
from bonjourgrid.coordinator import core, peers
from bonjourgrid.coordinator.peers import PeerLink, Timeouts
from bonjourgrid.coordinator.recruit import JobNeeds
from bonjourgrid.coordinator.shell import Coordinator
from bonjourgrid.dag import load_workflow
from bonjourgrid.discovery.txt import PeerRecord
from bonjourgrid.protocol import Source
from bonjourgrid.requirements import Requirement
from tests.records import idle_peer

pytestmark = pytest.mark.timeout(60)

ENDS_WITHIN_S = 20.0  # a job that has not ended by then hangs: the test fails
D = "ab" * 32

# What the hostile peer answers a `run` with (after which it answers heartbeats).
Reply = Callable[[dict[str, Any]], list[bytes]]


def done(run: dict[str, Any], **changes: Any) -> bytes:
    fields = {
        "job": run["job"],
        "task": run["task"],
        "attempt": run["attempt"],
        "exit_code": 0,
        "outputs": [["out.txt", D, 5]],
        "stderr_tail": "",
        "error": "",
        "fetch_s": 0.0,
        "run_s": 0.0,
        "bytes_fetched": 0,
        "fetched": [],
        "hit_bytes": 0,
        **changes,
    }
    return wire.pack_raw("task_done", **fields)


def started(run: dict[str, Any]) -> bytes:
    return wire.pack_raw("started", job=run["job"], task=run["task"], attempt=run["attempt"])


class HostilePeer:
    """A ROUTER on 127.0.0.1 that answers `run` with `reply` and every heartbeat with an
    ack listing no run at all."""

    def __init__(self, ctx: zmq.asyncio.Context, reply: Reply) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.reply = reply
        self.runs: list[dict[str, Any]] = []

    async def serve(self) -> None:
        while True:
            client, frame = await self.sock.recv_multipart()
            msg = wire.as_map(wire.decode(frame))
            if msg["t"] == "run":
                self.runs.append(msg)
                answers = self.reply(msg)
            elif msg["t"] == "heartbeat":
                answers = [wire.pack_raw("heartbeat_ack", job=msg["job"], running=[])]
            else:
                answers = []
            for answer in answers:
                await self.sock.send_multipart([client, answer])


def record(name: str, port: int) -> PeerRecord:
    return idle_peer(name, port=port)


Until = Callable[[Coordinator], bool]
Run = Callable[[Reply, int, Until | None], Awaitable[tuple[Coordinator, HostilePeer]]]


@pytest.fixture
async def run_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Run]:
    """Run a one-task job whose only peer is a hostile one; the coordinator once it ended."""
    monkeypatch.setattr(peers, "RUN_ACK_TIMEOUT_S", 0.5)
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def run(
        reply: Reply, retries: int = 0, until: Until | None = None
    ) -> tuple[Coordinator, HostilePeer]:
        """The job run until it ends (or `until` holds), within ENDS_WITHIN_S."""
        submit = tmp_path / "deep" / "submit"
        submit.mkdir(parents=True)
        (submit / "wf.yaml").write_text(
            f"tasks:\n  t: {{command: 'echo hi > out.txt', outputs: [out.txt], "
            f"retries: {retries}}}\n"
        )
        workflow = load_workflow(submit / "wf.yaml")
        needs = JobNeeds(grid="insecure", require=Requirement.parse(""))
        coord = Coordinator(workflow, needs, None, timeouts=Timeouts(peer_timeout_s=2.0))
        coord.core.backoff_base_s = 0.0  # retries at once
        hostile = HostilePeer(coord.ctx, reply)
        sock = wire.client_socket(coord.ctx, None, "", wire.MAX_CONTROL_FRAME)
        sock.connect(f"tcp://127.0.0.1:{hostile.port}")
        link = PeerLink(record("evil", hostile.port), sock)
        link.data_source = Source(f"tcp://127.0.0.1:{hostile.port}", "", "evil")
        coord._spawn(coord._pump_backend_events(coord.backend))
        coord.pool.adopt(link)
        coord._spawn(hostile.serve())
        coord._spawn(coord.pool.heartbeats())

        async def cleanup() -> None:
            for task in list(coord._tasks):
                task.cancel()
            await asyncio.gather(*coord._tasks, return_exceptions=True)
            coord.fetcher.close()
            sock.close(linger=0)
            hostile.sock.close(linger=0)
            coord.ctx.destroy(linger=0)

        cleanups.append(cleanup)
        coord.events.put_nowait(core.PeerJoined("evil", 1, {}))
        if until is None:
            await asyncio.wait_for(coord._drive(), ENDS_WITHIN_S)
        else:
            async with asyncio.timeout(ENDS_WITHIN_S):
                while not until(coord):
                    await coord._apply(await coord.events.get())
        return coord, hostile

    yield run
    for cleanup in cleanups:
        with contextlib.suppress(Exception):
            await cleanup()


def nothing_outside(root: Path, tmp: Path) -> None:
    """Nothing but the submit directory's own files anywhere under the test's directory."""
    assert not any(p.name in ("b", "escape") for p in tmp.rglob("*")), sorted(tmp.rglob("*"))
    assert not (root / "out.txt").exists()


@pytest.mark.parametrize(
    "digest",
    ["../../escape/b", "../../../escape/b" + "0" * 48, "ab" * 31 + "a\x00", "\x00" * 64],
    ids=["escaping", "escaping-64-chars", "nul", "all-nul"],
)
async def test_an_output_digest_that_is_not_a_digest_fails_the_attempt_and_ends_the_job(
    run_job: Run, tmp_path: Path, digest: str
) -> None:
    coord, _ = await run_job(
        lambda run: [started(run), done(run, outputs=[["out.txt", digest, 5]])], 0, None
    )
    assert coord.core.finished is not None and coord.core.finished.status == "failed"
    task = coord.core.tasks["t"]
    assert task.status is core.TaskStatus.FAILED
    assert "peer evil sent a bad message" in task.error and "digest" in task.error, task.error
    nothing_outside(coord.workflow.root, tmp_path)
    assert not coord.mover.partial_dir.exists() or not any(coord.mover.partial_dir.iterdir())


async def test_a_refused_run_is_retried_then_fails_with_the_peers_reason(run_job: Run) -> None:
    def refuse(run: dict[str, Any]) -> list[bytes]:
        fields = {k: run[k] for k in ("job", "task", "attempt")}
        return [wire.pack_raw("refused", **fields, reason="no room for you")]

    coord, hostile = await run_job(refuse, 1, None)
    task = coord.core.tasks["t"]
    assert task.status is core.TaskStatus.FAILED and task.attempts == 2
    assert task.error == "peer evil refused the run: no room for you"
    assert [r["attempt"] for r in hostile.runs] == [1, 2]


async def test_a_run_never_acknowledged_fails_and_the_job_ends(run_job: Run) -> None:
    coord, _ = await run_job(lambda run: [], 0, None)
    assert coord.core.tasks["t"].error == "peer evil never acknowledged the run of t"
    assert coord.core.finished is not None and coord.core.finished.status == "failed"


async def test_a_run_its_peer_stops_listing_fails_and_the_job_ends(run_job: Run) -> None:
    coord, _ = await run_job(lambda run: [started(run)], 0, None)  # heartbeats without it
    assert coord.core.tasks["t"].error == "peer evil is not running it"


async def test_a_report_for_a_run_it_does_not_have_drops_the_peer(run_job: Run) -> None:
    def lie(run: dict[str, Any]) -> list[bytes]:
        # A malformed report of a task attempt this peer does not run: the peer is dropped.
        return [started(run), done({**run, "attempt": 7}, outputs=[["/etc/passwd", D, 1]])]

    coord, _ = await run_job(lie, 0, lambda c: "evil" not in c.pool.links and c.events.empty())
    assert "evil" not in coord.pool.links
    task = coord.core.tasks["t"]  # not its fault: it waits for another peer
    assert task.status is core.TaskStatus.READY and task.failures == 0


async def test_a_background_task_that_dies_cancels_the_job_with_the_reason(
    tmp_path: Path,
) -> None:
    (tmp_path / "wf.yaml").write_text("tasks:\n  t: {command: 'true'}\n")
    needs = JobNeeds(grid="insecure", require=Requirement.parse(""))
    coord = Coordinator(load_workflow(tmp_path / "wf.yaml"), needs, None)

    async def broken() -> None:
        raise RuntimeError("a bug")

    try:
        coord._spawn(broken())
        event = await asyncio.wait_for(coord.events.get(), ENDS_WITHIN_S)
        assert event == core.CancelRequested(
            "internal error in the coordinator: RuntimeError: a bug"
        )
    finally:
        coord.fetcher.close()
        coord.ctx.destroy(linger=0)
