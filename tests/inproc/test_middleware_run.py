"""What the shell hands a middleware that holds the DAG's edges, and what it makes of a
finished run: the plan leaves kept tasks out, outputs are hashed in the submit directory,
and a declared output that is not there fails the attempt with a clear reason."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from bonjourgrid.backends.base import NOT_MADE_YET
from bonjourgrid.cache.store import FileRef, hash_file
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.middleware_run import job_plan, with_outputs
from bonjourgrid.dag import load_workflow

SRC = FileRef("2" * 64, 4)


def test_the_plan_leaves_kept_tasks_and_their_edges_out(tmp_path: Path) -> None:
    tasks = {
        "a": {"command": "cp in.txt a.txt", "inputs": ["in.txt"], "outputs": ["a.txt"]},
        "b": {"command": "cp a.txt b.txt", "inputs": ["a.txt"], "outputs": ["b.txt"]},
        "c": {"command": "cat a.txt b.txt > c", "inputs": ["a.txt", "b.txt"], "outputs": ["c"],
              "retries": 2},
    }  # fmt: skip
    (tmp_path / "in.txt").write_text("in\n")
    (tmp_path / "wf.json").write_text(json.dumps({"name": "p", "tasks": tasks}))
    workflow = load_workflow(tmp_path / "wf.json")
    a_ref = FileRef("3" * 64, 5)
    known = {"in.txt": SRC, "a.txt": a_ref}
    plan = job_plan(workflow, "p-1", (), {"a"}, known.get, "10.0.0.1")
    assert [r.task for r in plan.runs] == ["b", "c"]
    b, c = plan.runs
    assert (b.parents, c.parents) == ((), ("b",))  # a is kept: no edge to it
    assert (b.peer, b.attempt, c.retries) == (None, 1, 2)
    assert [(i.path, i.ref) for i in c.inputs] == [("a.txt", a_ref), ("b.txt", NOT_MADE_YET)]
    assert plan.root == tmp_path and plan.coordinator == "10.0.0.1"


def test_a_finished_run_gets_its_outputs_hashed_or_fails_without_them(tmp_path: Path) -> None:
    (tmp_path / "out.txt").write_text("made\n")
    report = core.TaskReported("p1", "t", 1, 0, "", ())
    done = asyncio.run(with_outputs(report, tmp_path, ("out.txt",)))
    assert done.outputs == (("out.txt", hash_file(tmp_path / "out.txt")),) and not done.error
    missing = asyncio.run(with_outputs(report, tmp_path, ("out.txt", "never.txt")))
    assert missing.exit_code == 0 and missing.outputs == ()
    assert "declared output never.txt is not in the submit directory" in missing.error
    failed = core.TaskReported("p1", "t", 1, 2, "exited 2", ())
    assert asyncio.run(with_outputs(failed, tmp_path, ("never.txt",))) is failed
