"""`bonjourgrid.run` end to end: README's example, failures, reports, resume, a LAN-style grid."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

from bonjourgrid import ConfigError, JobFailed, Workflow, run
from bonjourgrid.coordinator.journal import journal_path
from tests.multiproc.conftest import LOOPBACK, Grid
from tests.waiting import wait_until

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    """The first Python block of README's "Python API" section."""
    section = README.read_text(encoding="utf-8").split("\n## Python API\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README's Python API section has no ```python block"
    return match.group(1)


def test_readme_s_example_runs_and_prints_only_what_it_prints(tmp_path: Path) -> None:
    code = readme_example()
    assert "local=2" in code  # the brief's promise: it runs as it stands, on two local workers
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}  # no grid key of ours
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # run() printed nothing: no progress, no notice
    lines = out.stdout.splitlines()
    assert lines[0].startswith("succeeded [('words', 'local-")
    assert lines[1] == "9 words, 3 lines"
    assert (tmp_path / "upper.txt").read_text() == "THE QUICK BROWN FOX\nJUMPS OVER\nTHE LAZY DOG\n"


def fan(root: Path, *, fail: bool = False) -> Workflow:
    """A networkx fan: split -> 3 workers -> join; with `fail`, one worker exits 3."""
    graph = nx.DiGraph(name="fan")
    graph.add_node("split", command="for i in 1 2 3; do echo $i > p$i; done",
                   outputs=["p1", "p2", "p3"])  # fmt: skip
    for i in (1, 2, 3):
        command = "exit 3" if fail and i == 2 else f"expr $(cat p{i}) \\* 10 > q{i}"
        graph.add_node(f"times{i}", command=command, inputs=[f"p{i}"], outputs=[f"q{i}"])
    graph.add_node("join", command="cat q1 q2 q3 > all", inputs=["q1", "q2", "q3"],
                   outputs=["all"])  # fmt: skip
    return Workflow.from_graph(graph, root=root)


def test_a_graph_runs_and_its_report_is_typed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    report = run(fan(tmp_path), local=2, report=tmp_path / "report.json")
    assert capfd.readouterr() == ("", "")  # nothing printed, by us or the local workers
    assert (tmp_path / "all").read_text() == "10\n20\n30\n"
    assert report.succeeded and report.workflow == "fan"
    assert set(report.tasks) == {"split", "times1", "times2", "times3", "join"}
    join = report.tasks["join"]
    assert join.status == "done" and join.exit_code == 0 and join.attempts == 1
    assert join.peer in {peer.name for peer in report.peers}
    times1_end = report.tasks["times1"].end
    assert join.start is not None and times1_end is not None and join.start >= times1_end
    assert ("split", "times1") in report.edges
    assert report.bytes.to_submitter == len("10\n20\n30\n")
    assert json.loads((tmp_path / "report.json").read_text()) == report.as_dict()


def test_a_graph_is_run_as_it_is_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    graph = nx.DiGraph(name="pair")
    graph.add_node("a", command="echo A > a.txt", outputs=["a.txt"])
    graph.add_node("b", command="tr A B < a.txt > b.txt", inputs=["a.txt"], outputs=["b.txt"])
    report = run(graph, local=1)
    assert report.succeeded and report.workflow == "pair"
    assert (tmp_path / "b.txt").read_text() == "B\n"


def test_a_failed_job_raises_job_failed_unless_check_is_false(tmp_path: Path) -> None:
    with pytest.raises(JobFailed) as failed:
        run(fan(tmp_path, fail=True), local=1)
    report = failed.value.report
    assert str(failed.value) == f"job {report.job} failed: {report.reason}"
    assert report.failed_tasks == ("times2",) and report.tasks["times2"].exit_code == 3
    assert report.tasks["join"].status != "done"
    unchecked = run(fan(tmp_path, fail=True), local=1, check=False)
    assert not unchecked.succeeded and unchecked.failed_tasks == ("times2",)


def test_a_workflow_built_in_memory_resumes_from_its_journal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # fetch_all: a local grid's intermediate files go with its workers, unless brought back
    first = run(fan(tmp_path, fail=True), local=1, check=False, fetch_all=True)
    assert journal_path(fan(tmp_path).validated()).exists()
    caplog.set_level(logging.INFO, logger="bonjourgrid")
    second = run(fan(tmp_path), local=1, resume=True, fetch_all=True)  # times2 now succeeds
    assert second.succeeded and (tmp_path / "all").read_text() == "10\n20\n30\n"
    kept = {name for name, task in second.tasks.items() if task.resumed}
    assert kept == {"split", "times1", "times3"}
    assert first.job != second.job
    # the notice `bgrid submit` prints on stderr goes to the log
    assert f"resuming job {first.job} from .bgrid/fan.journal: 3 of 5 task(s) kept" in [
        record.getMessage() for record in caplog.records if record.name == "bonjourgrid"
    ]
    with pytest.raises(ConfigError, match=r"nothing to resume; run it without resume=True"):
        run(Workflow("never-ran", root=tmp_path).task("t", "true"), local=1, resume=True)


def test_a_workflow_file_runs_on_the_grid_of_the_key_store(
    tmp_path: Path, grid: Grid, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As `bgrid submit` on a LAN: the grid key in $XDG_CONFIG_HOME, peers found over mDNS.
    grid.start_worker("api1")
    grid.start_worker("api2")
    grid.wait_all_idle()
    monkeypatch.setenv("XDG_CONFIG_HOME", grid.env["XDG_CONFIG_HOME"])
    path = tmp_path / "wf.yaml"
    path.write_text(
        "name: onfile\ntasks:\n"
        "  a: {command: 'echo a > a', outputs: [a]}\n"
        "  b: {command: 'cat a a > b', inputs: [a], outputs: [b]}\n"
    )
    report = run(str(path), workers="1..2", interface=LOOPBACK)
    assert report.succeeded and (tmp_path / "b").read_text() == "a\na\n"
    assert {peer.name for peer in report.peers} <= set(grid.procs)
    grid.wait_all_idle()  # every peer handed back


def test_a_signal_while_tasks_run_raises_interrupted_with_the_cancelled_job_s_report(
    tmp_path: Path,
) -> None:
    started = tmp_path / "started"
    script = f"""
import sys
from bonjourgrid import Interrupted, Workflow, run
wf = Workflow("long", root={str(tmp_path)!r}).task("t", "touch {started}; sleep 60", outputs=["o"])
try:
    run(wf, local=1)
except Interrupted as stopped:
    print(stopped.exit_code, stopped.report.signal, stopped.report.reason, sep="|")
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: started.exists() or proc.poll() is not None, 30, "the task started")
        assert started.exists(), proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (out, err) == ("130|SIGINT|cancelled by the user (SIGINT)\n", "")


async def test_run_from_a_thread_of_an_event_loop_as_its_refusal_says(tmp_path: Path) -> None:
    report = await asyncio.to_thread(run, fan(tmp_path), local=1)
    assert report.succeeded and (tmp_path / "all").read_text() == "10\n20\n30\n"
