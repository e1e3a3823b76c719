"""Surviving the desktop: a killed coordinator resumed, `bgrid cancel`, backoff, frozen peers.

Real `bgrid` processes on 127.0.0.1. Tasks run in sandboxes on worker daemons of this
machine, so they count their runs by appending to files under the test's tmp_path.
Timeouts are shrunk with --lease / --peer-timeout; nothing sleeps blindly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from bonjourgrid.coordinator.cancel import CancelFailed, JobNotFound, cancel_job, find_job
from bonjourgrid.coordinator.journal import journal_path, read_journal
from bonjourgrid.dag import load_workflow
from bonjourgrid.discovery.txt import JOB_SERVICE, JobRecord, job_txt, parse_job
from tests.multiproc.conftest import LOOPBACK, Grid, RogueHost, bgrid_cmd, write_workflow
from tests.waiting import wait_until as wait_for

LEASE = "2"  # seconds: a dead coordinator's peers are idle again this soon


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def start_submit(grid: Grid, workflow: Path, *flags: str) -> subprocess.Popen[str]:
    out = open(workflow.parent / "submit.out", "w")  # noqa: SIM115  (closed by the child)
    proc = subprocess.Popen(
        bgrid_cmd(
            "submit",
            str(workflow),
            "--interface",
            LOOPBACK,
            "--report",
            str(workflow.parent / "report.json"),
            *flags,
        ),
        env=grid.env,
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out.close()
    return proc


def finish(proc: subprocess.Popen[str], workflow: Path, timeout: float = 60) -> tuple[int, Any]:
    code = proc.wait(timeout)
    report_file = workflow.parent / "report.json"
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    return code, report


def output_of(workflow: Path) -> str:
    return (workflow.parent / "submit.out").read_text()


def chain(directory: Path) -> tuple[Path, Path, Path]:
    """a -> b -> c; b sleeps on its first run only. Returns (workflow, a's counter, b's)."""
    count_a, count_b = directory / "a.count", directory / "b.count"
    wf = write_workflow(
        directory / "wf",
        f"""
name: chain
tasks:
  a: {{command: "echo run >> {count_a}; echo A > a.txt", outputs: [a.txt]}}
  b:
    command: "n=$(cat {count_b} 2>/dev/null | wc -l); echo run >> {count_b};
      [ $n -gt 0 ] || sleep 30; cat a.txt > b.txt; echo B >> b.txt"
    inputs: [a.txt]
    outputs: [b.txt]
  c: {{command: "cat b.txt > c.txt; echo C >> c.txt", inputs: [b.txt], outputs: [c.txt]}}
""",
    )
    return wf, count_a, count_b


@pytest.mark.parametrize("tamper", [False, True], ids=["intact", "tampered"])
def test_a_killed_coordinator_frees_its_peers_and_resume_skips_intact_tasks(
    tmp_path: Path, grid: Grid, tamper: bool
) -> None:
    grid.start_worker("k1", "--cpus", "1")
    grid.wait_all_idle()
    wf, count_a, count_b = chain(tmp_path)
    job = start_submit(grid, wf, "--lease", LEASE)
    wait_for(lambda: bool(lines(count_b)), 30, "b to start")
    # a is journaled, with its output's digest, before b was sent anywhere.
    journal = read_journal(journal_path(load_workflow(wf)))
    assert set(journal.done) == {"a"} and journal.end is None
    a_txt = wf.parent / "a.txt"
    assert not a_txt.exists()  # an intermediate: it stays on the peer that made it

    job.kill()  # kill -9: no release, no goodbye
    job.wait()
    wait_for(
        lambda: all(p["state"] == "idle" for p in grid.peers().values()),
        float(LEASE) + 5,
        "the dead coordinator's peer to be idle again",
    )
    if tamper:
        a_txt.write_text("tampered\n")

    code, report = finish(start_submit(grid, wf, "--resume", "--lease", LEASE), wf)
    assert code == 0, output_of(wf)
    assert (wf.parent / "c.txt").read_text() == "A\nB\nC\n"
    assert len(lines(count_b)) == 2  # b was running when the coordinator died: it runs again
    a = report["tasks"]["a"]
    if tamper:
        assert len(lines(count_a)) == 2  # a's output failed its digest check: a ran again
        assert a["attempts"] == 1 and "resumed" not in a
        assert "a.txt changed" in report["resumed_from"]["rerun"]["a"]
        assert "a runs again" in output_of(wf)
    else:
        # a never ran again: the peer's cache still held a.txt, and b read it there
        assert len(lines(count_a)) == 1
        assert (a["status"], a["attempts"], a["resumed"]) == ("done", 0, True)
        assert not a_txt.exists()
        assert "3/3 tasks done (1 kept from an earlier run)" in output_of(wf)
    assert report["tasks"]["c"]["status"] == "done"
    assert report["resumed_from"]["kept"] == (0 if tamper else 1)
    grid.wait_all_idle()

    # Everything is done now: a second resume runs nothing and needs no peer. (A stray
    # a.txt in the submit directory that is not what `a` made would make `a` run again.)
    a_txt.unlink(missing_ok=True)
    code, report = finish(start_submit(grid, wf, "--resume"), wf, timeout=30)
    assert code == 0, output_of(wf)
    assert all(t["resumed"] for t in report["tasks"].values())
    assert report["peers"] == []


def test_resume_right_after_a_kill_waits_for_the_dead_coordinator_s_peers(
    tmp_path: Path, grid: Grid
) -> None:
    grid.start_worker("k2", "--cpus", "1")
    grid.wait_all_idle()
    wf, count_a, count_b = chain(tmp_path)
    job = start_submit(grid, wf, "--lease", LEASE)
    wait_for(lambda: bool(lines(count_b)), 30, "b to start")
    job.kill()
    job.wait()
    # No waiting here: the only peer is still reserved by the dead job for up to a lease.
    code, report = finish(start_submit(grid, wf, "--resume"), wf)
    assert code == 0, output_of(wf)
    assert len(lines(count_a)) == 1 and report["tasks"]["a"]["resumed"]
    assert (wf.parent / "c.txt").read_text() == "A\nB\nC\n"
    grid.wait_all_idle()


def test_resume_without_a_journal_says_so(tmp_path: Path, grid: Grid) -> None:
    wf = write_workflow(tmp_path / "wf", "tasks:\n  a: {command: 'echo a > a', outputs: [a]}\n")
    out = grid.run("submit", str(wf), "--resume", "--interface", LOOPBACK)
    assert out.returncode == 2
    assert "nothing to resume" in out.stderr and "without --resume" in out.stderr


def test_bgrid_cancel_stops_the_job_and_releases_its_peers(
    tmp_path: Path, grid: Grid, rogue: RogueHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid.start_worker("c1", "--cpus", "2")
    grid.wait_all_idle()
    started = tmp_path / "started"
    wf = write_workflow(
        tmp_path / "wf",
        f"""
name: longjob
tasks:
  l1: {{command: "echo go >> {started}; sleep 60; echo late > l1.txt", outputs: [l1.txt]}}
  l2: {{command: "echo go >> {started}; sleep 60; echo late > l2.txt", outputs: [l2.txt]}}
""",
    )
    job = start_submit(grid, wf)
    try:
        wait_for(lambda: len(lines(started)) == 2, 30, "both tasks to start")
        status = grid.run("status", "--json", "--interface", LOOPBACK, "--wait", "0.7", check=True)
        ours = [j for j in json.loads(status.stdout) if j["job"].startswith("longjob-")]
        assert len(ours) == 1 and ours[0]["key"], ours  # it advertises its control key
        job_id = ours[0]["job"]

        # Somebody outside the grid cannot stop it: the CURVE handshake never completes.
        stranger = Grid(tmp_path / "stranger")
        stranger.root.mkdir()
        stranger.init_key()
        monkeypatch.setenv("XDG_CONFIG_HOME", stranger.env["XDG_CONFIG_HOME"])
        with pytest.raises(CancelFailed, match="did not prove the grid's key"):
            asyncio.run(cancel_job(job_id, [LOOPBACK], wait=0.7, timeout=1.0))
        assert job.poll() is None

        # A host of the LAN spoofs the job's record (its own CURVE key, the real TXT): the
        # grid's members still reach the real coordinator, and the spoof learns nothing.
        monkeypatch.setenv("XDG_CONFIG_HOME", grid.env["XDG_CONFIG_HOME"])
        with spoofed_coordinator(rogue, job_id, ours[0]) as heard:
            status = grid.run("status", "--interface", LOOPBACK, "--wait", "0.7", check=True)
            assert "1 job record(s) not shown" in status.stdout, status.stdout
            listed = grid.run("status", "--json", "--interface", LOOPBACK, "--wait", "0.7")
            claims = [j for j in json.loads(listed.stdout) if j["job"] == job_id]
            assert sorted(j["verified"] for j in claims) == [False, True], claims
            out = grid.run("cancel", job_id, "--interface", LOOPBACK)
            assert heard() == 0
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"job {job_id}: cancelling" in out.stdout
        code, report = finish(job, wf, timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert code == 1
    assert report["status"] == "failed"
    assert report["reason"].startswith("cancelled from ")
    assert "cancelled from" in output_of(wf)
    assert not (wf.parent / "l1.txt").exists()
    grid.wait_all_idle(timeout=3)
    end = read_journal(journal_path(load_workflow(wf))).end
    assert end is not None and end[1].startswith("cancelled from ")

    gone = grid.run("cancel", "no-such-job-000000", "--interface", LOOPBACK, "--wait", "0.5")
    assert gone.returncode == 2 and "no job named" in gone.stderr


def test_a_retry_waits_longer_after_each_failure(tmp_path: Path, grid: Grid) -> None:
    grid.start_worker("b1", "--cpus", "1")
    grid.wait_all_idle()
    marks = tmp_path / "attempts"
    wf = write_workflow(
        tmp_path / "wf",
        f"""
tasks:
  flaky:
    command: "date +%s.%N >> {marks}; [ $(wc -l < {marks}) -ge 3 ] || exit 1; echo ok > ok.txt"
    outputs: [ok.txt]
    retries: 2
""",
    )
    code, report = finish(start_submit(grid, wf), wf)
    assert code == 0, output_of(wf)
    flaky = report["tasks"]["flaky"]
    assert (flaky["status"], flaky["attempts"], flaky["exit_code"]) == ("done", 3, 0)
    times = [float(t) for t in lines(marks)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 2
    assert 1.0 <= gaps[0] < 2.0 and gaps[1] >= 2.0, gaps  # 1 s, then 2 s of backoff
    assert (wf.parent / "ok.txt").read_text() == "ok\n"
    grid.wait_all_idle()


def test_a_frozen_peer_is_lost_within_the_peer_timeout(tmp_path: Path, grid: Grid) -> None:
    victim = grid.start_worker("frozen", "--cost", "0")
    spare = grid.start_worker("spare", "--cost", "1")
    grid.wait_all_idle()
    starts = tmp_path / "starts"
    wf = write_workflow(
        tmp_path / "wf",
        f"tasks:\n  t: {{command: 'echo go >> {starts}; sleep 2; echo ok > t.txt', "
        "outputs: [t.txt]}\n",
    )
    job = start_submit(grid, wf, "--workers", "1..1", "--peer-timeout", "1", "--lease", LEASE)
    try:
        wait_for(lambda: len(lines(starts)) == 1, 30, "t to start on the cheaper peer")
        os.kill(grid.procs[victim].pid, signal.SIGSTOP)  # frozen: no answer, no goodbye
        wait_for(lambda: len(lines(starts)) == 2, 10, "t to start again elsewhere")
        code, report = finish(job, wf)
    finally:
        os.kill(grid.procs[victim].pid, signal.SIGCONT)
        if job.poll() is None:
            job.kill()
    assert code == 0, output_of(wf)
    assert report["tasks"]["t"]["peer"] == spare
    assert (wf.parent / "t.txt").read_text() == "ok\n"
    grid.wait_all_idle()  # the thawed peer's lease has run out: idle again


@contextlib.contextmanager
def spoofed_coordinator(
    rogue: RogueHost, job: str, listed: dict[str, Any]
) -> Iterator[Callable[[], int]]:
    """A job record claiming `job` (the TXT `bgrid status --json` listed for it) served by a
    CURVE ROUTER with a key of its own; yields how many messages it has received."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    public, secret = zmq.curve_keypair()
    sock.curve_server, sock.curve_publickey, sock.curve_secretkey = True, public, secret
    port = sock.bind_to_random_port(f"tcp://{LOOPBACK}")
    record = JobRecord(
        name=f"spoof-{job}",
        addresses=(LOOPBACK,),
        port=port,
        job=job,
        state="running",
        tasks=listed["tasks"],
        done=0,
        failed=0,
        running=1,
        peers=1,
        user="mallory",
        started=time.time(),
        key=public.decode(),
    )
    rogue.advertise(record.name, port, job_txt(record), service=JOB_SERVICE)
    received = 0

    def heard() -> int:
        nonlocal received
        while sock.poll(0):
            sock.recv_multipart()
            received += 1
        return received

    try:
        yield heard
    finally:
        sock.close(linger=0)
        ctx.term()


def test_a_spoofed_job_record_gets_a_clear_error_and_learns_nothing(
    tmp_path: Path, grid: Grid, rogue: RogueHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", grid.env["XDG_CONFIG_HOME"])
    with spoofed_coordinator(rogue, "payroll-c0ffee", {"tasks": 3}) as heard:
        out = grid.run("cancel", "payroll-c0ffee", "--interface", LOOPBACK, "--wait", "0.7")
        assert out.returncode == 1, out.stdout + out.stderr
        assert "cancelling" not in out.stdout
        assert "did not prove the grid's key" in out.stderr, out.stderr
        assert heard() == 0  # not the request, not who asked


def _ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _job(name: str, state: str = "running") -> JobRecord:
    return JobRecord(
        name=name,
        addresses=("127.0.0.1",),
        port=5000,
        job=name,
        state=state,  # type: ignore[arg-type]
        tasks=1,
        done=0,
        failed=0,
        running=1,
        peers=1,
        user="alice",
        started=1.0,
    )


def test_cancel_finds_a_job_by_its_name_or_its_workflow_s() -> None:
    jobs = [_job("montage-1f3c2a"), _job("montage-9e9e9e", "failed"), _job("other-aaaaaa")]
    assert [j.job for j in find_job(jobs, "montage-9e9e9e")] == ["montage-9e9e9e"]
    assert [j.job for j in find_job(jobs, "montage")] == ["montage-1f3c2a"]  # the only running
    # Two records claiming one job (one is spoofed): both are asked, running ones first.
    claims = find_job([_job("montage-9e9e9e", "failed"), *jobs], "montage-9e9e9e")
    assert [j.state for j in claims] == ["failed", "failed"]
    claims = find_job([*jobs, dataclasses.replace(_job("x"), job="montage-1f3c2a")], "montage")
    assert len(claims) == 2 and {j.job for j in claims} == {"montage-1f3c2a"}
    with pytest.raises(JobNotFound, match="2 running jobs"):
        find_job([*jobs, _job("montage-bbbbbb")], "montage")
    with pytest.raises(JobNotFound, match="no job named 'nope'") as err:
        find_job(jobs, "nope")
    assert err.value.exit_code == 2


def test_a_job_advertises_its_control_key_and_a_bad_one_is_ignored() -> None:
    key = zmq.curve_keypair()[0].decode()
    record = dataclasses.replace(_job("montage-1f3c2a"), key=key)
    txt = {k.encode(): v.encode() for k, v in job_txt(record).items()}
    assert txt[b"key"] == key.encode()
    assert parse_job(record.name, record.addresses, record.port, txt) == record
    txt[b"key"] = b"not-a-curve-key"
    assert parse_job(record.name, record.addresses, record.port, txt) is None


def test_resume_of_a_killed_local_job_keeps_only_what_it_can_and_says_why(
    tmp_path: Path, grid: Grid
) -> None:
    """A --local grid's workers are new at every run: an intermediate that stayed in a dead
    local worker's cache is gone, so its maker runs again, says so, and is not reported kept."""
    count_a, count_b = tmp_path / "a.count", tmp_path / "b.count"
    wf = write_workflow(
        tmp_path / "wf",
        f"""
name: local-chain
tasks:
  a: {{command: "echo run >> {count_a}; echo A > a.txt", outputs: [a.txt]}}
  b:
    command: "n=$(cat {count_b} 2>/dev/null | wc -l); echo run >> {count_b};
      [ $n -gt 0 ] || sleep 60; cat a.txt > b.txt"
    inputs: [a.txt]
    outputs: [b.txt]
  d: {{command: "echo D > d.txt", outputs: [d.txt]}}
""",
    )
    first = start_submit(grid, wf, "--local", "1")
    journal = journal_path(load_workflow(wf))
    wait_for(
        lambda: bool(lines(count_b)) and {"a", "d"} <= set(read_journal(journal).done),
        60,
        "b to run after a and d were journaled",
    )
    local_workers = psutil.Process(first.pid).children(recursive=True)
    assert local_workers, "the --local submit started no worker"
    first.kill()  # kill -9: the local grid's caches are unreachable from now on
    first.wait()
    # The kernel tells the orphaned local workers (PR_SET_PDEATHSIG): they stop on their own.
    wait_for(
        lambda: (
            not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in local_workers)
        ),
        15,
        "the killed submit's local workers to stop",
    )
    assert (wf.parent / "d.txt").exists() and not (wf.parent / "a.txt").exists()

    code, report = finish(start_submit(grid, wf, "--local", "1", "--resume"), wf)
    said = output_of(wf)
    assert code == 0, said
    assert "1 of 3 task(s) kept" in said
    assert "a runs again: its output a.txt, which b needs, was only in the cache of local-" in said
    tasks = report["tasks"]
    assert (tasks["d"]["attempts"], tasks["d"].get("resumed")) == (0, True)
    for name in ("a", "b"):
        assert tasks[name]["attempts"] == 1 and "resumed" not in tasks[name], tasks[name]
    assert report["resumed_from"]["kept"] == 1
    assert len(lines(count_a)) == 2 and len(lines(count_b)) == 2
    assert (wf.parent / "b.txt").read_text() == "A\n"
