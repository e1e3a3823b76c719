"""Faults on a real LAN (issue 4, "Survive the desktop"): every test ends with correct outputs
and every surviving peer idle.

Six hosts in network namespaces, shared by the module. Each test starts its own worker
daemons on hosts 1-4 under names of its own and stops them when it ends, so no test sees
another's peers and the order of tests does not matter; host 5 submits; host 6 is "another
terminal" (a second coordinator, `bgrid cancel`, a resumed submit). Every submit shrinks the
timeouts with `--peer-timeout 2 --lease 3` and tasks sleep 3 s at most. Nothing waits
blindly: tests poll `bgrid peers --json`, files that tasks append a line to each time they
start (every namespace shares the filesystem), or processes, each with a deadline.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Generator
from pathlib import Path

import pytest

from tests.waiting import wait_until as _wait

from .conftest import Bgrid, MdnsWatcher
from .harness import DETECTED_S as _DETECTED_S
from .harness import (
    LEASE_S,
    LanGrid,
    Submitted,
    Worker,
    count_starts,
    mark_start,
    share_grid_key,
)
from .harness import SEEN_S as _SEEN_S
from .harness import SLACK_S as _SLACK_S
from .harness import STARTED_S as _STARTED_S
from .netns import Host, Lan

_EXPIRED_S = LEASE_S + _SLACK_S  # a peer whose coordinator vanished is idle again by then
_RELEASED_S = 1.0 + _SLACK_S  # DESIGN.md: a released peer shows idle within a second
_SUBMITTER, _OTHER = 4, 5  # host indexes; workers run on hosts 0-3
_MIB = 1 << 20


class FaultGrid(LanGrid):
    """The LAN of this module: host 5 submits, host 6 is "another terminal"."""

    def __init__(self, lan: Lan, bgrid: Bgrid, tmp: Path) -> None:
        super().__init__(lan, bgrid, tmp, _SUBMITTER)

    @property
    def other(self) -> Host:
        return self.lan.hosts[_OTHER]


@pytest.fixture(scope="module")
def keyed_lan(lan6: Lan, bgrid: Bgrid) -> Lan:
    """Every host holds the same grid key (public and secret halves)."""
    share_grid_key(lan6, bgrid)
    return lan6


@pytest.fixture
def grid(keyed_lan: Lan, bgrid: Bgrid, tmp_path: Path) -> Generator[FaultGrid, None, None]:
    """This test's workers and submits; its workers are stopped when it ends."""
    faults = FaultGrid(keyed_lan, bgrid, tmp_path)
    try:
        yield faults
    finally:
        faults.stop_workers()


def _sleepers(host: Host) -> list[int]:
    """Pids of `sleep` processes in `host`'s namespace (only tasks run `sleep` there)."""
    out = subprocess.run(
        ["ip", "netns", "pids", host.name], capture_output=True, text=True, check=True
    ).stdout
    found = []
    for pid in (int(tok) for tok in out.split() if tok.isdigit()):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if Path(argv0.decode(errors="replace")).name == "sleep":
            found.append(pid)
    return found


def _one_task_workflow(grid: FaultGrid, starts: Path) -> Path:
    """One 3-second task `t` that marks each start in `starts` and writes t.txt."""
    command = f"{mark_start(starts)}; sleep 3; echo ok > t.txt"
    return grid.workflow("fault", {"t": {"command": command, "outputs": ["t.txt"]}})


def _assert_rescheduled(done: Submitted, wf: Path, spare: Worker) -> None:
    """The job succeeded with t's second attempt on the spare peer, and t.txt is right."""
    assert done.code == 0, done.explain()
    t = done.task("t")
    assert (t["status"], t["peer"], t["attempts"]) == ("done", spare.name, 2), done.explain()
    assert (wf.parent / "t.txt").read_text() == "ok\n"


def test_a_peer_killed_mid_task_is_replaced_and_the_chain_finishes(grid: FaultGrid) -> None:
    """kill -9 of the peer running b (a -> b): b runs again elsewhere within the timeout."""
    victim = grid.start_worker("victim", 0, cost=0.0)
    spare = grid.start_worker("spare", 1, cost=1.0)
    grid.wait_idle([victim, spare], _SEEN_S, "both workers listed idle")
    b_starts = grid.tmp / "b.starts"
    wf = grid.workflow(
        "kill9",
        {
            # mid.txt is an intermediate: made on the victim, read by b.
            "a": {"command": "echo intermediate > mid.txt", "outputs": ["mid.txt"]},
            "b": {
                "command": f"{mark_start(b_starts)}; sleep 3; tr a-z A-Z < mid.txt > final.txt",
                "inputs": ["mid.txt"],
                "outputs": ["final.txt"],
            },
        },
    )
    job = grid.start_submit(wf, "--workers", "1..1")  # the cheapest peer (victim) runs a and b
    _wait(lambda: count_starts(b_starts) >= 1, _STARTED_S, "b started")
    victim.kill()
    took = _wait(lambda: count_starts(b_starts) >= 2, _DETECTED_S, "b started again after kill -9")
    print(f"b started again {took:.1f} s after its peer was killed")
    done = job.finish()
    assert done.code == 0, done.explain()
    b = done.task("b")
    assert (b["status"], b["peer"], b["attempts"]) == ("done", spare.name, 2), done.explain()
    # a ran once on the victim, or again on the spare if its output was lost with the victim.
    assert done.task("a")["status"] == "done"
    assert done.task("a")["peer"] in {victim.name, spare.name}
    assert (wf.parent / "final.txt").read_text() == "INTERMEDIATE\n"
    listed = grid.wait_idle([spare], _RELEASED_S, "the surviving peer idle after the job")
    assert victim.name not in listed, f"a killed peer is still listed: {listed[victim.name]}"


def test_a_frozen_peer_is_replaced_and_idle_again_when_thawed(grid: FaultGrid) -> None:
    """SIGSTOP of a peer mid-task: the task runs elsewhere; thawed, the peer's late report is
    ignored and it is idle again once its lease has run out."""
    frozen = grid.start_worker("frozen", 1, cost=0.0)
    spare = grid.start_worker("spare", 2, cost=1.0)
    grid.wait_idle([frozen, spare], _SEEN_S, "both workers listed idle")
    starts = grid.tmp / "t.starts"
    wf = _one_task_workflow(grid, starts)
    job = grid.start_submit(wf, "--workers", "1..1")
    _wait(lambda: count_starts(starts) >= 1, _STARTED_S, "t started")
    frozen.signal(signal.SIGSTOP)
    try:
        took = _wait(
            lambda: count_starts(starts) >= 2, _DETECTED_S, "t started again after SIGSTOP"
        )
        print(f"t started again {took:.1f} s after its peer froze")
    finally:
        # Thawed while the second attempt runs: the first one's late report must not count.
        frozen.signal(signal.SIGCONT)
    done = job.finish()
    _assert_rescheduled(done, wf, spare)
    grid.wait_idle([frozen, spare], _EXPIRED_S, "the thawed peer idle again, the spare released")


def test_a_peer_whose_link_is_cut_is_replaced_and_idle_again_when_plugged_back(
    grid: FaultGrid,
) -> None:
    """`ip link set eth0 down` on a peer mid-task: the task runs elsewhere; link up again, the
    peer is listed idle (its lease ran out while it was cut off)."""
    cut = grid.start_worker("cut", 2, cost=0.0)
    spare = grid.start_worker("spare", 3, cost=1.0)
    grid.wait_idle([cut, spare], _SEEN_S, "both workers listed idle")
    starts = grid.tmp / "t.starts"
    wf = _one_task_workflow(grid, starts)
    job = grid.start_submit(wf, "--workers", "1..1")
    _wait(lambda: count_starts(starts) >= 1, _STARTED_S, "t started")
    cut.host.set_link(False)
    try:
        took = _wait(
            lambda: count_starts(starts) >= 2, _DETECTED_S, "t started again after link down"
        )
        print(f"t started again {took:.1f} s after its peer's link was cut")
    finally:
        cut.host.set_link(True)  # while the second attempt runs, as a cable plugged back in
    done = job.finish()
    _assert_rescheduled(done, wf, spare)
    grid.wait_idle([cut, spare], _SEEN_S, "the plugged-back peer idle again, the spare released")


@pytest.mark.parametrize("tamper", [False, True], ids=["intact", "tampered"])
def test_a_killed_coordinator_frees_its_peers_and_resume_finishes_the_job(
    grid: FaultGrid, tamper: bool
) -> None:
    """kill -9 of `bgrid submit` mid-run: its peers are idle once their lease runs out, and
    `bgrid submit --resume` (from another host: the journal is in the submit directory) runs
    only what is not done; an output changed since is made again (checked by digest)."""
    workers = [grid.start_worker("r1", 0, cost=0.0), grid.start_worker("r2", 1, cost=1.0)]
    grid.wait_idle(workers, _SEEN_S, "both workers listed idle")
    starts = {name: grid.tmp / f"{name}.starts" for name in ("first", "side", "second")}
    wf = grid.workflow(
        "resume",
        {
            "first": {"command": f"{mark_start(starts['first'])}; echo one > one.txt",
                      "outputs": ["one.txt"]},
            "side": {"command": f"{mark_start(starts['side'])}; echo side > side.txt",
                     "outputs": ["side.txt"]},
            # `after`, not a file: first's and side's outputs are final outputs, in the submit
            # directory, whatever the data placement.
            "second": {"command": f"{mark_start(starts['second'])}; sleep 3; echo two > two.txt",
                       "outputs": ["two.txt"], "after": ["first", "side"]},
        },
    )  # fmt: skip
    job = grid.start_submit(wf, "--workers", "2..2")
    _wait(lambda: count_starts(starts["second"]) >= 1, _STARTED_S, "second started")
    job.kill()
    took = time.monotonic()
    grid.wait_idle(workers, _EXPIRED_S, "peers of the killed coordinator idle after the lease")
    print(f"peers idle {time.monotonic() - took:.1f} s after the coordinator was killed")
    if tamper:
        (wf.parent / "one.txt").write_text("tampered\n")

    done = grid.submit(wf, "--resume", "--workers", "2..2", host=grid.other)
    assert done.code == 0, done.explain()
    runs = {name: count_starts(path) for name, path in starts.items()}
    assert runs == {"first": 2 if tamper else 1, "side": 1, "second": 2}, done.explain()
    for rel, text in (("one.txt", "one\n"), ("side.txt", "side\n"), ("two.txt", "two\n")):
        assert (wf.parent / rel).read_text() == text, rel
    assert all(t["status"] == "done" for t in done.report["tasks"].values()), done.explain()
    grid.wait_idle(workers, _RELEASED_S, "every peer idle after the resumed job")


def test_two_coordinators_at_once_never_hold_one_peer_and_both_finish(grid: FaultGrid) -> None:
    """Two submits from two hosts at the same moment, for 1 peer each, over 2 equal peers."""
    workers = [grid.start_worker("duo1", 0, cost=0.5), grid.start_worker("duo2", 1, cost=0.5)]
    grid.wait_idle(workers, _SEEN_S, "both workers listed idle")
    watcher = MdnsWatcher(grid.lan.hosts[2])
    try:
        watcher.wait_until(
            lambda w: all(w.history(x.name)[-1:] == [("idle", None)] for x in workers),
            _SEEN_S,
            "the watcher sees both peers idle",
        )
        tasks = {
            f"t{i}": {"command": f"sleep 1; echo $BGRID_JOB > o{i}.txt", "outputs": [f"o{i}.txt"]}
            for i in range(3)
        }
        wfs = [grid.workflow(f"race{n}", tasks, subdir=f"wf{n}") for n in (1, 2)]
        jobs = [
            grid.start_submit(wfs[0], "--workers", "1..1"),
            grid.start_submit(wfs[1], "--workers", "1..1", host=grid.other),
        ]
        dones = [job.finish() for job in jobs]
        for done in dones:
            assert done.code == 0, done.explain()
        used = [done.peers_used() for done in dones]
        assert len(used[0]) == len(used[1]) == 1 and used[0] != used[1], f"peers used: {used}"
        for wf, done in zip(wfs, dones, strict=True):
            for i in range(3):
                assert (wf.parent / f"o{i}.txt").read_text() == done.report["job"] + "\n"
        grid.wait_idle(workers, _RELEASED_S, "both peers idle after both jobs")
        watcher.wait_until(
            lambda w: all(w.history(x.name)[-1:] == [("idle", None)] for x in workers),
            _SEEN_S,
            "the watcher sees both peers idle again",
        )
    finally:
        watcher.stop()
    jobs_seen: dict[str, set[str]] = {}
    for worker in workers:
        holder: str | None = None
        history = watcher.history(worker.name)
        for state, job in history:
            if state == "reserved":
                assert holder in (None, job), f"{worker.name} went {holder} -> {job}: {history}"
                holder = job
                jobs_seen.setdefault(worker.name, set()).add(str(job))
            else:
                holder = None
    expected = {next(iter(u)): {d.report["job"]} for u, d in zip(used, dones, strict=True)}
    assert jobs_seen == expected, f"mDNS saw {jobs_seen}; the reports say {expected}"


def test_bgrid_cancel_from_another_host_stops_the_job_and_releases_its_peers(
    grid: FaultGrid,
) -> None:
    """`bgrid cancel JOB` on a third host: submit exits 1 saying so; peers idle, tasks gone."""
    workers = [grid.start_worker("long1", 0, cost=0.0), grid.start_worker("long2", 1, cost=1.0)]
    grid.wait_idle(workers, _SEEN_S, "both workers listed idle")
    starts = grid.tmp / "long.starts"
    tasks = {
        f"long{i}": {"command": f"{mark_start(starts)}; sleep 60; echo late > l{i}.txt",
                     "outputs": [f"l{i}.txt"]}
        for i in (1, 2)
    }  # fmt: skip
    wf = grid.workflow("cancelme", tasks)
    job = grid.start_submit(wf, "--workers", "2..2")
    _wait(lambda: count_starts(starts) >= 2, _STARTED_S, "both long tasks started")
    peers = grid.peers()
    job_ids = {p["job"] for p in peers.values()}
    assert len(job_ids) == 1 and None not in job_ids, f"peers while the job runs: {peers}"
    job_id = str(job_ids.pop())

    cancelled = grid.bgrid(grid.other, "cancel", job_id, timeout=30)
    assert cancelled.returncode == 0, f"`bgrid cancel` said:\n{cancelled.stdout}{cancelled.stderr}"
    done = job.finish(timeout=10 + _SLACK_S)
    assert done.code == 1, done.explain()
    assert done.report.get("status") == "failed", done.explain()
    assert "cancel" in done.report.get("reason", "").lower(), done.explain()
    assert "cancel" in done.stdout.lower(), done.explain()
    assert not any((wf.parent / f"l{i}.txt").exists() for i in (1, 2))
    grid.wait_idle(workers, _RELEASED_S, "every peer idle after the cancel")
    _wait(lambda: not any(_sleepers(w.host) for w in workers), _SLACK_S, "the tasks stopped")


@pytest.fixture
def tiny_cache(grid: FaultGrid) -> Generator[Path, None, None]:
    """A 1 MiB tmpfs for a worker's cache (mounts are not namespaced here: unmounted after)."""
    path = grid.tmp / "tiny-cache"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        grid.stop_workers()  # nothing may hold the mount
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def _fill_the_disk(grid: FaultGrid, retries: int) -> Path:
    """A task writing a 4 MiB output: more than a 1 MiB cache holds."""
    command = f"head -c {4 * _MIB} /dev/zero > big.bin"
    return grid.workflow(
        "diskfull", {"big": {"command": command, "outputs": ["big.bin"], "retries": retries}}
    )


def test_a_full_disk_fails_the_task_there_with_a_clear_error_and_the_peer_stays_healthy(
    grid: FaultGrid, tiny_cache: Path
) -> None:
    """A 4 MiB output on a peer whose cache is a 1 MiB tmpfs: the task fails saying the disk
    is full, and the peer stays a healthy idle peer that runs the next (small) job."""
    tiny = grid.start_worker("tiny", 0, 0.0, "--cache-dir", str(tiny_cache))
    grid.wait_idle([tiny], _SEEN_S, "the worker listed idle")
    wf = _fill_the_disk(grid, retries=0)
    failed = grid.submit(wf)
    assert failed.code == 1, failed.explain()
    big = failed.task("big")
    assert (big["status"], big["peer"]) == ("failed", tiny.name), failed.explain()
    grid.wait_idle([tiny], _RELEASED_S, "the full peer idle after the job")

    small = grid.workflow(
        "small", {"s": {"command": "echo small > s.txt", "outputs": ["s.txt"]}}, subdir="small"
    )
    done = grid.submit(small)
    assert done.code == 0, done.explain()
    assert done.task("s")["peer"] == tiny.name
    assert (small.parent / "s.txt").read_text() == "small\n"
    grid.wait_idle([tiny], _RELEASED_S, "the peer idle after the small job")

    said = f"{big.get('error', '')}\n{big.get('stderr_tail', '')}"
    assert re.search(r"disk is full|no space left", said, re.IGNORECASE), (
        f"the task failed without saying that the peer's disk is full: {big}"
    )


def test_a_task_that_fills_a_peers_disk_is_retried_on_another_peer(
    grid: FaultGrid, tiny_cache: Path
) -> None:
    """retries: 1; the cheapest peer's cache is a 1 MiB tmpfs: the 4 MiB output is made, on
    the second attempt, by another peer."""
    tiny = grid.start_worker("tiny", 0, 0.0, "--cache-dir", str(tiny_cache))
    roomy = grid.start_worker("roomy", 1, cost=1.0)
    grid.wait_idle([tiny, roomy], _SEEN_S, "both workers listed idle")
    wf = _fill_the_disk(grid, retries=1)
    done = grid.submit(wf, "--workers", "1..2")
    grid.wait_idle([tiny, roomy], _RELEASED_S, "both peers idle after the job")
    assert done.code == 0, done.explain()
    big = done.task("big")
    assert (big["status"], big["peer"], big["attempts"]) == ("done", roomy.name, 2), done.explain()
    assert (wf.parent / "big.bin").stat().st_size == 4 * _MIB


def test_a_task_failing_everywhere_fails_the_job_after_backed_off_retries(
    grid: FaultGrid,
) -> None:
    """retries: 2 and exit 3 every time: 3 attempts spaced 1 s then 2 s apart, the job fails
    with the task's stderr, its descendant is skipped, the independent branch's output kept."""
    workers = [grid.start_worker("f1", 0, cost=0.0), grid.start_worker("f2", 1, cost=1.0)]
    grid.wait_idle(workers, _SEEN_S, "both workers listed idle")
    wf = grid.workflow(
        "boom",
        {
            "boom": {"command": "echo boom >&2; exit 3", "outputs": ["x.txt"], "retries": 2},
            "after_boom": {"command": "cp x.txt y.txt", "inputs": ["x.txt"],
                           "outputs": ["y.txt"]},
            "fine": {"command": "echo fine > fine.txt", "outputs": ["fine.txt"]},
        },
    )  # fmt: skip
    done = grid.submit(wf, "--workers", "1..2")
    assert done.code == 1, done.explain()
    assert done.report["status"] == "failed"
    boom = done.task("boom")
    assert (boom["status"], boom["attempts"], boom["exit_code"]) == ("failed", 3, 3), boom
    assert "boom" in boom["stderr_tail"], boom
    assert "boom" in done.stdout, "the summary does not show the failing task's stderr"
    # Exponential backoff, base 1 s: 1 s before the 2nd attempt, 2 s before the 3rd.
    assert boom["end"] >= 1.0 + 2.0, f"3 attempts ended {boom['end']} s into the job"
    assert done.task("after_boom")["status"] == "skipped"
    assert done.task("fine")["status"] == "done"
    assert (wf.parent / "fine.txt").read_text() == "fine\n"
    assert not (wf.parent / "y.txt").exists()
    grid.wait_idle(workers, _RELEASED_S, "every peer idle after the failed job")
