"""What every backend must do on the namespace LAN (issue 11, "A conformance suite").

One module, parametrized by backend: a diamond with files, a failing task with a retry, a peer
killed mid-run, Ctrl-C, `--resume`, and every peer idle after each of them. A backend joins
the suite by adding itself to `BACKENDS`, with what it needs on this machine; where that is
missing, its cases are skipped with the reason (never silently passed).

Six hosts: workers on hosts 1-4, host 5 submits, host 6 is "another terminal" (a resumed
submit). Each test starts its own worker daemons under names of its own and stops them at the
end. Nothing waits blindly: files that tasks append a line to when they start (every namespace
shares the filesystem) and `bgrid peers --json`, each with a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Generator, Sequence
from pathlib import Path

import psutil
import pytest

from tests.waiting import wait_until

from .conftest import Bgrid
from .harness import (
    DETECTED_S,
    LEASE_S,
    SEEN_S,
    SLACK_S,
    STARTED_S,
    LanGrid,
    Worker,
    count_starts,
    mark_start,
    share_grid_key,
)
from .netns import Lan

_SUBMITTER, _OTHER = 4, 5
_RELEASED_S = 1.0 + SLACK_S  # a released peer shows idle within a second (DESIGN.md)
_EXPIRED_S = LEASE_S + SLACK_S  # a peer whose coordinator vanished is idle again by then
_DAEMONS = {"slurmctld", "slurmd", "slurmstepd", "munged", "condor_master", "condor_startd"}


def _missing(*programs: str) -> str | None:
    absent = [p for p in programs if shutil.which(p) is None]
    return f"{', '.join(absent)} not installed on this machine" if absent else None


# backend name -> why it cannot run here (None: it runs)
BACKENDS = {
    "native": None,
    # A transient Slurm cluster: slurmctld + munged here, slurmd + munged on each peer.
    "slurm": _missing("slurmctld", "slurmd", "munged", "sbatch", "nsenter"),
    # A personal HTCondor pool: no registry reachable from our machines ships its daemons.
    "condor": _missing("condor_master", "condor_startd", "condor_dagman"),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    reason = BACKENDS[name]
    if reason is not None:
        pytest.skip(f"backend {name}: {reason}")
    return name


@pytest.fixture(scope="module")
def keyed_lan(lan6: Lan, bgrid: Bgrid) -> Lan:
    share_grid_key(lan6, bgrid)
    return lan6


class ConformanceGrid(LanGrid):
    def __init__(self, lan: Lan, bgrid: Bgrid, tmp: Path, backend: str) -> None:
        super().__init__(lan, bgrid, tmp, _SUBMITTER)
        self.backend = backend
        # slurmd 22.05 needs /sys/fs/cgroup, which `ip netns exec` hides.
        self.host_sys = backend == "slurm"
        self._short = Path(tempfile.mkdtemp(prefix="bgc-"))

    def start_worker(
        self, role: str, host_index: int, cost: float, *flags: str, ram: str = "1GiB"
    ) -> Worker:
        # A short cache directory: the daemons' unix sockets in a service run's directory
        # must fit 108 bytes, and pytest's temporary paths are long.
        cache = self._short / f"{role}-{self.tag}"
        return super().start_worker(role, host_index, cost, "--cache-dir", str(cache), *flags,
                                    ram=ram)  # fmt: skip

    def wait_nothing_left(
        self, workers: Sequence[Worker], what: str, deadline_s: float = _RELEASED_S
    ) -> None:
        """Every peer idle, and no middleware daemon of this test left on any host."""
        self.wait_idle(workers, deadline_s, what)
        wait_until(lambda: not self._daemons_left(), deadline_s,
                   lambda: f"middleware daemons still running: {self._daemons_left()}")  # fmt: skip

    def _daemons_left(self) -> list[str]:
        """Middleware daemons in this LAN's network namespaces (each test runs alone there)."""
        ours = {os.stat(f"/run/netns/{host.name}").st_ino for host in self.lan.hosts}
        left = []
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            if proc.info["name"] not in _DAEMONS:
                continue
            try:
                where = os.stat(f"/proc/{proc.info['pid']}/ns/net").st_ino
            except OSError:
                continue  # gone meanwhile
            if where in ours:
                left.append(" ".join(proc.info["cmdline"] or ()))
        return left

    def cleanup(self) -> None:
        self.stop_workers()
        shutil.rmtree(self._short, ignore_errors=True)

    def run_flags(self, *flags: str) -> tuple[str, ...]:
        return ("-v", "--backend", self.backend, *flags)


@pytest.fixture
def grid(
    keyed_lan: Lan, bgrid: Bgrid, tmp_path: Path, backend: str
) -> Generator[ConformanceGrid, None, None]:
    conformance = ConformanceGrid(keyed_lan, bgrid, tmp_path, backend)
    try:
        yield conformance
    finally:
        conformance.cleanup()


def test_a_diamond_with_files_runs_and_frees_every_peer(grid: ConformanceGrid) -> None:
    workers = [grid.start_worker(f"d{i}", i, cost=float(i)) for i in range(3)]
    grid.wait_idle(workers, SEEN_S, "the workers listed idle")
    wf = grid.workflow(
        "diamond",
        {
            "top": {"command": "echo seed > seed.txt", "outputs": ["seed.txt"]},
            "left": {"command": "tr a-z A-Z < seed.txt > left.txt",
                     "inputs": ["seed.txt"], "outputs": ["left.txt"]},
            "right": {"command": "rev < seed.txt > right.txt",
                      "inputs": ["seed.txt"], "outputs": ["right.txt"]},
            "bottom": {"command": "cat left.txt right.txt > bottom.txt",
                       "inputs": ["left.txt", "right.txt"], "outputs": ["bottom.txt"]},
        },
    )  # fmt: skip
    done = grid.submit(wf, *grid.run_flags("--workers", "2..3"))
    assert done.code == 0, done.explain()
    assert (wf.parent / "bottom.txt").read_text() == "SEED\ndees\n"
    assert {t["status"] for t in done.report["tasks"].values()} == {"done"}, done.explain()
    grid.wait_nothing_left(workers, "every peer idle after the job")


def test_the_shipped_example_diamond_runs(grid: ConformanceGrid, bgrid: Bgrid) -> None:
    """`bgrid submit examples/dags/diamond.yaml --backend B`: 8 tasks over 3 peers."""
    workers = [grid.start_worker(f"e{i}", i, cost=float(i)) for i in range(3)]
    grid.wait_idle(workers, SEEN_S, "the workers listed idle")
    examples = grid.tmp / "examples"
    made = bgrid(grid.submitter, "examples", str(examples), timeout=30)
    assert made.returncode == 0, made.stderr
    wf = examples / "diamond.yaml"
    done = grid.submit(wf, *grid.run_flags("--workers", "3..3"))
    assert done.code == 0, done.explain()
    assert (wf.parent / "diamond.txt").read_text().splitlines() == [
        "count 100", "sum 5050", "squares 338350", "evens 50", "min 1", "max 100",
    ]  # fmt: skip
    assert len(done.peers_used()) >= 2, done.explain()
    grid.wait_nothing_left(workers, "every peer idle after the job")


def test_a_failing_task_is_retried_and_the_job_succeeds(grid: ConformanceGrid) -> None:
    workers = [grid.start_worker(f"f{i}", i, cost=float(i)) for i in range(2)]
    grid.wait_idle(workers, SEEN_S, "the workers listed idle")
    starts = grid.tmp / "flaky.starts"
    # Fails its first attempt only (the namespaces share the filesystem, so wherever it runs).
    command = f"{mark_start(starts)}; [ $BGRID_ATTEMPT -ge 2 ] || exit 3; echo ok > out.txt"
    wf = grid.workflow("retry", {"flaky": {"command": command, "outputs": ["out.txt"],
                                           "retries": 1}})  # fmt: skip
    done = grid.submit(wf, *grid.run_flags("--workers", "1..2"))
    assert done.code == 0, done.explain()
    flaky = done.task("flaky")
    assert (flaky["status"], flaky["attempts"]) == ("done", 2), done.explain()
    assert count_starts(starts) == 2
    assert (wf.parent / "out.txt").read_text() == "ok\n"
    grid.wait_nothing_left(workers, "every peer idle after the job")


def test_a_peer_killed_mid_run_is_replaced(grid: ConformanceGrid) -> None:
    victim = grid.start_worker("victim", 0, cost=0.0)
    spare = grid.start_worker("spare", 1, cost=1.0)
    grid.wait_idle([victim, spare], SEEN_S, "both workers listed idle")
    starts = grid.tmp / "t.starts"
    wf = grid.workflow(
        "kill9", {"t": {"command": f"{mark_start(starts)}; sleep 3; echo ok > t.txt",
                        "outputs": ["t.txt"]}}
    )  # fmt: skip
    job = grid.start_submit(wf, *grid.run_flags("--workers", "1..1"))
    wait_until(lambda: count_starts(starts) >= 1, STARTED_S, "t started")
    victim.kill()
    wait_until(lambda: count_starts(starts) >= 2, DETECTED_S, "t started again after kill -9")
    done = job.finish()
    assert done.code == 0, done.explain()
    t = done.task("t")
    assert (t["status"], t["peer"]) == ("done", spare.name), done.explain()
    assert (wf.parent / "t.txt").read_text() == "ok\n"
    # The desktop restarts its worker (as its service manager would): the new life ends what
    # the killed one left running (a middleware's job step included), and is idle.
    reborn = grid.start_worker("victim", 0, cost=0.0)
    grid.wait_nothing_left(
        [spare, reborn], "both peers idle, nothing left of the killed life", SEEN_S
    )


def test_ctrl_c_stops_the_job_and_frees_every_peer(grid: ConformanceGrid) -> None:
    workers = [grid.start_worker(f"c{i}", i, cost=float(i)) for i in range(2)]
    grid.wait_idle(workers, SEEN_S, "the workers listed idle")
    starts = grid.tmp / "long.starts"
    wf = grid.workflow("ctrlc", {"long": {"command": f"{mark_start(starts)}; sleep 60"}})
    job = grid.start_submit(wf, *grid.run_flags("--workers", "1..2"))
    wait_until(lambda: count_starts(starts) >= 1, STARTED_S, "the long task started")
    job.proc.send_signal(signal.SIGINT)
    done = job.finish(timeout=30)
    assert done.code == 128 + signal.SIGINT, done.explain()
    grid.wait_nothing_left(workers, "every peer idle after Ctrl-C")


def test_resume_runs_only_what_is_not_done(grid: ConformanceGrid) -> None:
    workers = [grid.start_worker(f"r{i}", i, cost=float(i)) for i in range(2)]
    grid.wait_idle(workers, SEEN_S, "the workers listed idle")
    starts = {name: grid.tmp / f"{name}.starts" for name in ("first", "second")}
    wf = grid.workflow(
        "resume",
        {
            "first": {"command": f"{mark_start(starts['first'])}; echo one > one.txt",
                      "outputs": ["one.txt"]},
            "second": {"command": f"{mark_start(starts['second'])}; sleep 3; echo two > two.txt",
                       "outputs": ["two.txt"], "after": ["first"]},
        },
    )  # fmt: skip
    job = grid.start_submit(wf, *grid.run_flags("--workers", "1..2"))
    wait_until(lambda: count_starts(starts["second"]) >= 1, STARTED_S, "second started")
    job.kill()
    grid.wait_idle(workers, _EXPIRED_S, "peers of the killed coordinator idle after the lease")
    done = grid.submit(
        wf, *grid.run_flags("--resume", "--workers", "1..2"), host=grid.lan.hosts[_OTHER]
    )
    assert done.code == 0, done.explain()
    assert {n: count_starts(p) for n, p in starts.items()} == {"first": 1, "second": 2}
    assert (wf.parent / "two.txt").read_text() == "two\n"
    grid.wait_nothing_left(workers, "every peer idle after the resumed job")
