"""The workflow keys of pre/post scripts (`pre`, `post`, `script_dir`, `pre_skip`) and of
stdout/stderr copies (`stdout`, `stderr`): what they turn into, what a user is told."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bonjourgrid.dag import workflow_from_mapping
from bonjourgrid.errors import DagError


def task(command: str = "true", **fields: Any) -> dict[str, Any]:
    return {"command": command, **fields}


def dag_error(tasks: dict[str, Any], root: Path | str = "/nonexistent") -> str:
    with pytest.raises(DagError) as caught:
        workflow_from_mapping({"tasks": tasks}, root, source="wf.yaml")
    return str(caught.value)


def test_script_keys_are_carried_on_the_task(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    wf = workflow_from_mapping(
        {
            "tasks": {
                "a": task(
                    pre="./prep.sh",
                    post="./check.sh $BGRID_RETURN",
                    script_dir="bin/./",
                    pre_skip=3,
                    stdout="out/./a.txt",
                    stderr="a.err",
                )
            }
        },
        tmp_path,
    )
    a = wf.tasks["a"]
    assert (a.pre, a.post, a.script_dir, a.pre_skip) == (
        "./prep.sh",
        "./check.sh $BGRID_RETURN",
        "bin",
        3,
    )
    assert (a.stdout, a.stderr) == ("out/a.txt", "a.err")


def test_a_task_without_them_is_unchanged(tmp_path: Path) -> None:
    a = workflow_from_mapping({"tasks": {"a": task()}}, tmp_path).tasks["a"]
    assert (a.pre, a.post, a.script_dir, a.pre_skip, a.stdout, a.stderr) == (
        None,
        None,
        ".",
        None,
        None,
        None,
    )


def test_an_input_no_task_makes_may_be_made_by_the_pre(tmp_path: Path) -> None:
    wf = workflow_from_mapping(
        {"tasks": {"a": task(inputs=["made.txt"], pre="echo x > made.txt")}}, tmp_path
    )
    assert wf.pre_made == {"made.txt"}
    assert wf.source_inputs() == []  # not staged before the job: the pre makes it
    # ... but not for a reader without a pre of its own
    problem = dag_error(
        {
            "a": task(inputs=["made.txt"], pre="echo x > made.txt"),
            "b": task(inputs=["made.txt"]),
        },
        tmp_path,
    )
    assert "task 'b': input 'made.txt' is not written by any task" in problem


def test_an_input_present_at_load_is_staged_as_usual(tmp_path: Path) -> None:
    (tmp_path / "there.txt").write_text("x")
    wf = workflow_from_mapping({"tasks": {"a": task(inputs=["there.txt"], pre="true")}}, tmp_path)
    assert wf.pre_made == frozenset() and wf.source_inputs() == ["there.txt"]


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"pre": ""}, "task 'a': pre '' must be a shell command, as one string"),
        ({"post": ["a", "b"]}, "task 'a': post ['a', 'b'] must be a shell command"),
        ({"pre_skip": 2}, "task 'a': pre_skip needs a pre script (`pre:`)"),
        ({"pre": "x", "pre_skip": 0}, "pre_skip 0 must be an exit code from 1 to 255"),
        ({"pre": "x", "pre_skip": True}, "pre_skip True must be an exit code from 1 to 255"),
        ({"pre": "x", "script_dir": "../up"}, "task 'a': script_dir: '../up' escapes"),
        ({"stdout": "/abs"}, "task 'a': stdout: '/abs' is absolute"),
        ({"pre": "x", "script_dir": "nowhere"}, "script_dir 'nowhere' is not a directory"),
        ({"prescript": "x"}, "unknown key 'prescript' in task 'a'; did you mean 'pre_skip'?"),
    ],
)
def test_bad_script_keys_say_what_to_do(
    tmp_path: Path, fields: dict[str, Any], problem: str
) -> None:
    assert problem in dag_error({"a": task(**fields)}, tmp_path)


def test_a_copy_overwrites_no_file_of_the_job(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("x")
    problem = dag_error(
        {
            "a": task(outputs=["o.txt"], stdout="o.txt", inputs=["in.txt"]),
            "b": task(stdout="in.txt"),
            "c": task(stdout="log.txt", stderr="log.txt"),
            "d": task(stderr="log.txt"),
        },
        tmp_path,
    )
    assert "task 'a': stdout 'o.txt' is also an output of task 'a'" in problem
    assert "task 'b': stdout 'in.txt' is an input of the workflow" in problem
    assert "task 'c': stderr 'log.txt' is also the stdout of task 'c'" in problem
    assert "task 'd': stderr 'log.txt' is also the stdout of task 'c'" in problem
