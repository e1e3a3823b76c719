"""`bgrid submit` end to end over loopback: real daemons, real mDNS, real CurveZMQ."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from bonjourgrid.coordinator.stage import DEFER_MIN_BYTES
from bonjourgrid.dag import load_workflow
from tests.multiproc.conftest import LOOPBACK, Grid, bgrid_cmd, submit, write_workflow
from tests.waiting import wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "dags"

FAN = """
name: fan
tasks:
  split:
    command: "for i in 1 2 3 4; do echo part-$i > p$i.txt; done"
    outputs: [p1.txt, p2.txt, p3.txt, p4.txt]
  w1: {command: "tr a-z A-Z < p1.txt > u1.txt", inputs: [p1.txt], outputs: [u1.txt]}
  w2: {command: "tr a-z A-Z < p2.txt > u2.txt", inputs: [p2.txt], outputs: [u2.txt]}
  w3: {command: "tr a-z A-Z < p3.txt > u3.txt", inputs: [p3.txt], outputs: [u3.txt]}
  w4: {command: "tr a-z A-Z < p4.txt > u4.txt", inputs: [p4.txt], outputs: [u4.txt]}
  join:
    command: "cat u1.txt u2.txt u3.txt u4.txt > all.txt"
    inputs: [u1.txt, u2.txt, u3.txt, u4.txt]
    outputs: [all.txt]
"""


def copy_examples(destination: Path, source: Path = EXAMPLES) -> None:
    """The examples as the repository holds them: not what an earlier run left in them (the
    README's first command leaves hello.txt and a journal in examples/dags)."""
    made = {
        (path.parent / output).resolve()
        for path in source.rglob("*.yaml")
        for task in load_workflow(path).tasks.values()
        for output in task.outputs
    }

    def left_by_a_run(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if n == ".bgrid" or (Path(directory) / n).resolve() in made}

    shutil.copytree(source, destination, ignore=left_by_a_run)


def test_the_examples_are_copied_without_what_a_run_left_in_them(tmp_path: Path) -> None:
    run_before = tmp_path / "examples"
    shutil.copytree(EXAMPLES, run_before)
    (run_before / "hello.txt").write_text("an earlier run\n")  # the README's first command
    (run_before / ".bgrid").mkdir(exist_ok=True)  # the README command may have left one
    copy_examples(tmp_path / "copy", source=run_before)
    assert (tmp_path / "copy" / "hello.yaml").exists()
    assert not (tmp_path / "copy" / "hello.txt").exists()
    assert not (tmp_path / "copy" / ".bgrid").exists()


def test_hello_runs_on_the_embedded_local_grid(tmp_path: Path, grid: Grid) -> None:
    work = tmp_path / "hello"
    copy_examples(work)
    out = grid.run("submit", str(work / "hello.yaml"), "--local", "3", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["status"] == "succeeded"
    assert set(report["tasks"]) == {"greet", "shout", "sign"}
    assert all(t["exit_code"] == 0 and t["attempts"] == 1 for t in report["tasks"].values())
    assert (work / "hello.txt").read_text() == "HELLO, WORLD!\n-- sent by BonjourGrid\n"
    assert report["bytes"]["to_submitter"] > 0


@pytest.mark.parametrize(
    "example", ["wordcount/wordcount.yaml", "diamond.yaml", "montage/montage.yaml"]
)
def test_every_example_runs_on_the_local_grid(tmp_path: Path, grid: Grid, example: str) -> None:
    work = tmp_path / "examples"
    copy_examples(work)
    out = grid.run("submit", str(work / example), "--local", "2", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert all(t["status"] == "done" for t in report["tasks"].values())
    workflow = load_workflow(work / example)
    for path in workflow.final_outputs():
        assert (workflow.root / path).stat().st_size > 0, path


def test_a_job_runs_on_daemons_which_are_all_idle_again_and_keep_running(
    tmp_path: Path, grid: Grid
) -> None:
    names = [grid.start_worker("a", "--cpus", "2"), grid.start_worker("b", "--cpus", "1")]
    grid.wait_all_idle()
    code, report, output = submit(grid, write_workflow(tmp_path / "wf", FAN), "--workers", "2..2")
    assert code == 0, output
    assert (tmp_path / "wf" / "all.txt").read_text() == "PART-1\nPART-2\nPART-3\nPART-4\n"
    assert {t["peer"] for t in report["tasks"].values()} <= set(names)
    assert sorted(p["name"] for p in report["peers"]) == sorted(names)
    grid.wait_all_idle(timeout=1.0 + 1.0)  # the contract is 1 s; one listing takes 0.7 s
    assert all(p.poll() is None for p in grid.procs.values()), "a worker daemon exited"
    # The same daemons take the next job.
    code, report, output = submit(grid, write_workflow(tmp_path / "again", FAN))
    assert code == 0, output


def test_a_peer_runs_at_most_cpus_tasks_at_once(tmp_path: Path, grid: Grid) -> None:
    grid.start_worker("solo", "--cpus", "2")
    grid.wait_all_idle()
    tasks = "\n".join(
        f"  t{i}: {{command: 'date +%s.%N > s{i}; sleep 0.3; date +%s.%N > e{i}', "
        f"outputs: [s{i}, e{i}]}}"
        for i in range(5)
    )
    code, _, output = submit(grid, write_workflow(tmp_path / "wf", "tasks:\n" + tasks + "\n"))
    assert code == 0, output
    spans = [
        (
            float((tmp_path / "wf" / f"s{i}").read_text()),
            float((tmp_path / "wf" / f"e{i}").read_text()),
        )
        for i in range(5)
    ]
    for start, _ in spans:
        assert sum(1 for s, e in spans if s <= start < e) <= 2


def test_a_failing_task_is_retried_then_fails_the_job_with_its_stderr(
    tmp_path: Path, grid: Grid
) -> None:
    grid.start_worker("w", "--cpus", "2")
    grid.wait_all_idle()
    wf = write_workflow(
        tmp_path / "wf",
        """
tasks:
  broken: {command: "echo 'disk on fire' >&2; exit 7", outputs: [x.txt], retries: 1}
  after: {command: "cp x.txt y.txt", inputs: [x.txt], outputs: [y.txt]}
  fine: {command: "echo ok > ok.txt", outputs: [ok.txt]}
""",
    )
    code, report, output = submit(grid, wf)
    assert code == 1
    assert report["status"] == "failed"
    broken = report["tasks"]["broken"]
    assert broken["attempts"] == 2 and broken["exit_code"] == 7
    assert "disk on fire" in broken["stderr_tail"]
    assert "disk on fire" in output  # the summary shows it too
    assert report["tasks"]["after"]["status"] == "skipped"
    assert (tmp_path / "wf" / "ok.txt").read_text() == "ok\n"  # the other branch is kept
    grid.wait_all_idle()


def test_a_bad_workflow_is_refused_before_any_peer_is_touched(tmp_path: Path, grid: Grid) -> None:
    wf = write_workflow(
        tmp_path / "wf",
        """
tasks:
  a: {command: "cat b.txt > a.txt", inputs: [b.txt], outputs: [a.txt]}
  b: {command: "cat a.txt > b.txt", inputs: [a.txt], outputs: [b.txt]}
""",
    )
    out = grid.run("submit", str(wf), "--interface", LOOPBACK, timeout=30)  # no peer waited for
    assert out.returncode == 2
    assert "cycle" in out.stderr and "a" in out.stderr


def test_two_coordinators_at_once_never_share_a_peer(tmp_path: Path, grid: Grid) -> None:
    names = {grid.start_worker("r1"), grid.start_worker("r2")}
    grid.wait_all_idle()
    slow = "tasks:\n" + "\n".join(
        f"  t{i}: {{command: 'sleep 0.4; echo $BGRID_JOB > o{i}', outputs: [o{i}]}}"
        for i in range(3)
    )
    jobs = []
    for n in (1, 2):
        wf = write_workflow(tmp_path / f"wf{n}", slow + "\n")
        jobs.append(
            subprocess.Popen(
                bgrid_cmd(
                    "submit", str(wf), "--interface", LOOPBACK, "--workers", "1..1", "--json"
                ),
                env=grid.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    reports = []
    for job in jobs:
        stdout, stderr = job.communicate(timeout=90)
        assert job.returncode == 0, stdout + stderr
        reports.append(json.loads(stdout))
    used = [{t["peer"] for t in r["tasks"].values()} for r in reports]
    assert used[0] | used[1] == names and not used[0] & used[1]
    grid.wait_all_idle()


def test_ctrl_c_releases_every_peer(tmp_path: Path, grid: Grid) -> None:
    grid.start_worker("c1")
    grid.wait_all_idle()
    wf = write_workflow(tmp_path / "wf", "tasks:\n  long: {command: 'sleep 60', outputs: [x]}\n")
    job = subprocess.Popen(
        bgrid_cmd("submit", str(wf), "--interface", LOOPBACK),
        env=grid.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    grid.wait_peers(lambda ps: any(p["state"] == "reserved" for p in ps.values()), timeout=15)
    job.send_signal(signal.SIGINT)
    stdout, _ = job.communicate(timeout=30)
    assert job.returncode == 130  # 128 + SIGINT, as a shell reports it
    assert "cancelled by the user" in stdout
    grid.wait_all_idle(timeout=3)


def test_a_coordinator_of_another_grid_recruits_nobody(tmp_path: Path, grid: Grid) -> None:
    grid.start_worker("mine")
    grid.wait_all_idle()
    stranger = Grid(tmp_path / "stranger")
    stranger.root.mkdir()
    stranger.init_key()
    wf = write_workflow(tmp_path / "wf", "tasks:\n  a: {command: 'echo hi > a', outputs: [a]}\n")
    out = stranger.run("submit", str(wf), "--interface", LOOPBACK)
    assert out.returncode == 3
    assert "another grid" in out.stderr
    assert not (tmp_path / "wf" / "a").exists()
    grid.wait_all_idle()


def test_a_worker_without_a_grid_key_refuses_to_start(tmp_path: Path) -> None:
    bare = Grid(tmp_path / "bare")
    bare.root.mkdir()
    out = bare.run("worker", "--interface", LOOPBACK, timeout=30)
    assert out.returncode == 2
    assert "bgrid keys init" in out.stderr and "--insecure" in out.stderr


def test_bgrid_status_lists_a_running_job_with_its_progress(tmp_path: Path, grid: Grid) -> None:
    grid.start_worker("s1", "--cpus", "1")
    grid.wait_all_idle()
    wf = write_workflow(
        tmp_path / "wf",
        """
name: progress-demo
tasks:
  quick: {command: "echo done > q", outputs: [q]}
  slow: {command: "sleep 30; cat q > s", inputs: [q], outputs: [s]}
""",
    )
    job = subprocess.Popen(
        bgrid_cmd("submit", str(wf), "--interface", LOOPBACK),
        env=grid.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        mine: list[dict[str, object]] = []

        def listed() -> bool:
            nonlocal mine
            out = grid.run("status", "--json", "--interface", LOOPBACK, "--wait", "0.7", check=True)
            mine = [
                j
                for j in json.loads(out.stdout)
                if str(j["job"]).startswith("progress-demo-") and j["done"] == 1
            ]
            return bool(mine)

        wait_until(listed, 20, "the running job shown by `bgrid status` with 1 task done")
        assert mine[0]["tasks"] == 2 and mine[0]["state"] == "running"
        assert mine[0]["verified"] is True  # its coordinator proved the grid's key
        table = grid.run("status", "--interface", LOOPBACK, "--wait", "0.7").stdout
        assert "progress-demo-" in table and "1/2" in table
    finally:
        job.send_signal(signal.SIGINT)
        job.communicate(timeout=30)
    grid.wait_all_idle()


def test_keys_init_refuses_to_overwrite_and_show_says_what_to_copy(grid: Grid) -> None:
    again = grid.run("keys", "init")
    assert again.returncode == 2 and "--force" in again.stderr
    shown = grid.run("keys", "show", check=True).stdout
    assert "grid fingerprint:" in shown and "grid.key_secret" in shown and "grid.key" in shown


def test_a_peer_killed_mid_task_is_replaced_and_the_job_succeeds(
    tmp_path: Path, grid: Grid
) -> None:
    victim, spare = (
        grid.start_worker("victim", "--cost", "0"),
        grid.start_worker("spare", "--cost", "1"),
    )
    grid.wait_all_idle()
    wf = write_workflow(
        tmp_path / "wf", "tasks:\n  t: {command: 'sleep 3; echo ok > t.txt', outputs: [t.txt]}\n"
    )
    job = subprocess.Popen(
        bgrid_cmd("submit", str(wf), "--interface", LOOPBACK, "--workers", "1..1", "--json"),
        env=grid.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    grid.wait_peers(lambda ps: ps.get(victim, {}).get("state") == "reserved", timeout=15)
    grid.procs[victim].kill()  # kill -9: no goodbye, no release
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["tasks"]["t"]["peer"] == spare
    assert (tmp_path / "wf" / "t.txt").read_text() == "ok\n"
    del grid.procs[victim]
    grid.wait_all_idle()


def test_a_rerun_does_not_bring_back_outputs_the_submit_dir_already_holds(
    tmp_path: Path, grid: Grid
) -> None:
    grid.start_worker("rr", "--cpus", "2")
    grid.wait_all_idle()
    wf = write_workflow(tmp_path / "wf", FAN)
    code, first, output = submit(grid, wf)
    assert code == 0, output
    assert first["bytes"]["to_submitter"] > 0
    code, second, output = submit(grid, wf)
    assert code == 0, output
    assert second["bytes"]["to_submitter"] == 0
    assert (tmp_path / "wf" / "all.txt").read_text() == "PART-1\nPART-2\nPART-3\nPART-4\n"


def test_a_copy_like_task_succeeds_in_a_fresh_submit_directory(tmp_path: Path, grid: Grid) -> None:
    """Its output has the bytes of a staged input: they are copied here, not fetched, into a
    `.bgrid/partial/` that nothing has made yet."""
    grid.start_worker("w")
    grid.wait_all_idle()
    wf = write_workflow(
        tmp_path / "copy",
        "tasks:\n  c: {command: 'cp in.txt out.txt', inputs: [in.txt], outputs: [out.txt]}\n",
        **{"in.txt": "same bytes\n"},
    )
    code, report, out = submit(grid, wf)
    assert code == 0, out
    assert report["tasks"]["c"]["attempts"] == 1
    assert (wf.parent / "out.txt").read_text() == "same bytes\n"


def test_a_big_new_input_is_hashed_while_the_tasks_that_do_not_read_it_run(
    tmp_path: Path, grid: Grid
) -> None:
    work = tmp_path / "wf"
    wf = write_workflow(
        work,
        """
name: deferred
tasks:
  quick: {command: "echo quick > q.txt", outputs: [q.txt]}
  digest: {command: "sha256sum big.bin > sum.txt", inputs: [big.bin], outputs: [sum.txt]}
""",
    )
    data = os.urandom(1024) * (DEFER_MIN_BYTES // 1024)
    (work / "big.bin").write_bytes(data)
    args = ("submit", str(wf), "--local", "2", "--interface", LOOPBACK, "--json", "-v")
    first = grid.run(*args, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "hashing 1 big input(s) while the job runs" in first.stderr
    report = json.loads(first.stdout)
    assert report["status"] == "succeeded"
    assert (work / "sum.txt").read_text().split()[0] == hashlib.sha256(data).hexdigest()
    assert (work / "q.txt").read_text() == "quick\n"
