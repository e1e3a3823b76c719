"""The workflow keys of node semantics (priority, category + categories, retry_unless_exit,
abort_on, final, noop): what they load into, and what a user is told when one is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bonjourgrid.coordinator.journal import task_digest
from bonjourgrid.coordinator.shell import node_rules
from bonjourgrid.dag import TaskSpec, workflow_from_mapping
from bonjourgrid.dag.model import AbortOn
from bonjourgrid.dag.writer import workflow_to_mapping
from bonjourgrid.errors import DagError


def task(command: str = "true", **fields: Any) -> dict[str, Any]:
    return {"command": command, **fields}


def load(**top: Any) -> Any:
    return workflow_from_mapping({"name": "t", **top}, "/nonexistent", source="wf.yaml")


def dag_error(**top: Any) -> str:
    with pytest.raises(DagError) as caught:
        load(**top)
    return str(caught.value)


def test_the_keys_load_onto_the_tasks_and_defaults_apply() -> None:
    wf = load(
        defaults={"priority": 2, "category": "dl", "retry_unless_exit": 9},
        categories={"dl": {"max_running": 2}, "big": None},
        tasks={
            "get": task(abort_on={"exit": 3, "status": 7}),
            "big": task(category="big", priority=-1, retry_unless_exit=4),
            "gate": {"noop": True, "after": ["get", "big"]},
            "report": task(final=True, abort_on=None),
        },
    )
    get, big, gate, report = (wf.tasks[n] for n in ("get", "big", "gate", "report"))
    assert (get.priority, get.category, get.retry_unless_exit) == (2, "dl", 9)
    assert get.abort_on == AbortOn(exit=3, status=7)
    assert (big.priority, big.category, big.retry_unless_exit) == (-1, "big", 4)
    assert gate.noop and gate.command == "" and not gate.final
    assert report.final and wf.final_task == "report"
    assert wf.categories == {"big": None, "dl": 2}  # big is listed without a limit


def test_abort_on_status_defaults_to_the_exit_code_and_a_category_needs_no_listing() -> None:
    wf = load(tasks={"a": task(abort_on={"exit": 5}, category="free")})
    assert wf.tasks["a"].abort_on == AbortOn(5, 5)
    assert wf.categories == {"free": None}  # named by a task, not listed: unlimited


def test_a_workflow_without_the_keys_is_unchanged() -> None:
    wf = load(tasks={"a": task("echo hi")})
    assert wf.tasks["a"] == TaskSpec("a", "echo hi", (), ())
    assert wf.categories == {} and wf.final_task is None
    assert node_rules(wf) == ({}, {})


def test_wrong_values_are_each_named() -> None:
    message = dag_error(
        tasks={
            "a": task(priority="high", category="has space", retry_unless_exit=0),
            "b": task(abort_on=3),
            "c": task(abort_on={"exit": 1, "status": 300, "code": 1}),
            "d": task(final="yes", noop=1),
        }
    )
    for expected in (
        "task 'a': priority 'high' must be a whole number",
        "task 'a': category 'has space' is not a name",
        "task 'a': retry_unless_exit 0 is a success, never a failed attempt",
        "task 'b': abort_on must be a mapping such as {exit: 3, status: 1}",
        "task 'c': abort_on status 300 must be an exit status, 0 to 255",
        "unknown key 'code' in task 'c' abort_on",
        "task 'd': final 'yes' must be true or false",
        "task 'd': noop 1 must be true or false",
    ):
        assert expected in message


def test_categories_are_checked_and_a_listed_one_no_task_names_is_a_typo() -> None:
    message = dag_error(
        categories={"downlaod": {"max_running": 2}},
        tasks={"a": task(category="download")},
    )
    assert "categories: 'downlaod' is named by no task (did you mean 'download'?)" in message
    message = dag_error(categories={"dl": {"max_running": 0}}, tasks={"a": task(category="dl")})
    assert "categories: 'dl': max_running 0 must be a whole number >= 1" in message
    message = dag_error(categories={"dl": {"max_jobs": 2}}, tasks={"a": task(category="dl")})
    assert "unknown key 'max_jobs' in categories: 'dl'; known keys: max_running" in message
    assert "`categories` must be a mapping" in dag_error(categories=["dl"], tasks={"a": task()})


def test_a_final_task_stands_apart_and_there_is_at_most_one() -> None:
    message = dag_error(
        tasks={
            "a": task(outputs=["x"]),
            "fin": task(final=True, inputs=["x"], outputs=["y"]),
            "b": task(inputs=["y"]),
            "fin2": task(final=True, after=["a"]),
        }
    )
    assert "task 'fin2' is final, and so is 'fin'; a workflow has at most one final task" in message
    assert (
        "task 'fin' is final: it runs after every other task anyway, so it cannot depend on "
        in (message)
    )
    assert "(it reads 'x' from 'a')" in message
    assert "task 'fin' is final: it runs last, so no task can depend on it ('b' reads 'y' " in (
        message
    )
    assert "nothing is left to abort" in dag_error(
        tasks={"fin": task(final=True, abort_on={"exit": 1})}
    )


def test_a_noop_task_needs_no_command_and_writes_nothing() -> None:
    assert "a noop task runs nothing, so it cannot write outputs ('o')" in dag_error(
        tasks={"n": {"noop": True, "outputs": ["o"]}}
    )
    kept = load(tasks={"n": task("echo kept", noop=True)}).tasks["n"]
    assert kept.command == "echo kept" and kept.noop  # kept, never run


def test_noop_changes_the_task_digest_only_when_set() -> None:
    plain = load(tasks={"n": task("echo")}).tasks["n"]
    noop = load(tasks={"n": task("echo", noop=True)}).tasks["n"]
    assert task_digest(plain) != task_digest(noop)
    # a task without the key keeps the digest an earlier bgrid journaled
    assert task_digest(plain) == task_digest(TaskSpec("n", "echo", (), ()))


def test_node_rules_go_to_the_core_for_the_tasks_that_have_some(tmp_path: Path) -> None:
    wf = load(
        categories={"dl": {"max_running": 1}, "any": None},
        tasks={
            "a": task(category="dl", abort_on={"exit": 2}),
            "b": task(category="any"),
            "c": task(),
        },
    )
    rules, caps = node_rules(wf)
    assert set(rules) == {"a", "b"} and caps == {"dl": 1}
    assert (rules["a"].abort_exit, rules["a"].abort_status) == (2, 2)


def test_quorum_loads_per_task_and_from_defaults_and_1_opts_out() -> None:
    wf = load(
        defaults={"quorum": 3},
        tasks={"a": task(), "b": task(quorum=1), "c": task(quorum=2)},
    )
    assert [wf.tasks[n].quorum for n in "abc"] == [3, 1, 2]
    assert load(tasks={"a": task()}).tasks["a"].quorum is None  # not said: --quorum decides
    again = workflow_from_mapping(workflow_to_mapping(wf), "/nonexistent", source="again.yaml")
    assert [again.tasks[n].quorum for n in "abc"] == [3, 1, 2]
    for bad in (0, 10, True, "2"):
        assert f"quorum {bad!r} must be a whole number from 1" in dag_error(
            tasks={"a": task(quorum=bad)}
        )
