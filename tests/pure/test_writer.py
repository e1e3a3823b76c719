"""`bgrid convert` and dag/writer.py: a workflow written back as native YAML loads back equal."""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bonjourgrid.cli import main
from bonjourgrid.dag import TaskSpec, Workflow, load_workflow, workflow_from_mapping
from bonjourgrid.dag.parse import parse_yaml
from bonjourgrid.dag.writer import workflow_to_mapping, workflow_to_yaml

EXAMPLES = Path(__file__).parents[2] / "bonjourgrid" / "examples"


def reloaded(workflow: Workflow) -> Workflow:
    """`workflow` written as YAML and read back, as `bgrid convert` then `bgrid submit` do."""
    text = workflow_to_yaml(workflow, header="a header\nof two lines")
    return workflow_from_mapping(parse_yaml(text, "out.yaml"), workflow.root, check_sources=False)


def assert_same(a: Workflow, b: Workflow) -> None:
    assert (a.name, a.root, a.grid, a.urls, a.producer) == (
        b.name,
        b.root,
        b.grid,
        b.urls,
        b.producer,
    )
    assert list(a.tasks.items()) == list(b.tasks.items())  # every field, in the same order
    assert sorted(a.graph.edges(data=True)) == sorted(b.graph.edges(data=True))


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_example_loads_back_equal(path: Path) -> None:
    workflow = load_workflow(path)
    assert_same(workflow, reloaded(workflow))


def test_defaults_are_merged_into_tasks_and_default_values_left_out() -> None:
    workflow = workflow_from_mapping(
        {
            "name": "w",
            "grid": {"workers": "..4", "rank": "cpus"},
            "defaults": {"retries": 2, "env": {"A": "1"}, "limits": {"memory": "1536MiB"}},
            "tasks": {
                "a": {"command": "echo > o", "outputs": ["o"], "keep": False, "after": []},
                "b": {
                    "command": "cat o\nwc -c o > p\n",
                    "inputs": ["o", "https://example.org/data/x.csv"],
                    "outputs": ["p"],
                    "retries": 0,
                    "limits": {"memory": None, "wall_s": 2.5},
                },
            },
        },
        "/nonexistent",
        check_sources=False,
    )
    mapping = workflow_to_mapping(workflow)
    assert mapping == {
        "name": "w",
        "grid": {"workers": "..4", "rank": "cpus"},
        "tasks": {
            "a": {
                "command": "echo > o",
                "outputs": ["o"],
                "retries": 2,
                "env": {"A": "1"},
                "limits": {"memory": "1536MiB"},  # a size: a bare number would mean MiB
            },
            "b": {
                "command": "cat o\nwc -c o > p\n",
                "inputs": ["o", {"url": "https://example.org/data/x.csv", "path": "x.csv"}],
                "outputs": ["p"],
                "env": {"A": "1"},
                "limits": {"wall_s": 3},
            },
        },
    }
    text = workflow_to_yaml(workflow)
    assert "command: |" in text  # a multi-line command stays readable
    assert list(yaml.safe_load(text)["tasks"]["b"]) == [
        "command",
        "inputs",
        "outputs",
        "env",
        "limits",
    ]
    assert_same(workflow, reloaded(workflow))


# -- any workflow: hypothesis -----------------------------------------------------------------

_names = st.text(string.ascii_letters + string.digits + "_.-", min_size=1, max_size=8).filter(
    lambda n: n not in (".", "..")
)
_text = st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=30)
_requirements = st.sampled_from([None, "ram>=1GiB", "cpus>=2 and os=='linux'", "ram>=512MiB"])


@st.composite
def workflows(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(_names, min_size=1, max_size=6, unique=True))
    tasks: dict[str, Any] = {}
    written: list[str] = []
    for index, name in enumerate(names):
        task: dict[str, Any] = {"command": draw(_text.filter(str.strip))}
        outputs = [f"out/{name}/{i}" for i in range(draw(st.integers(0, 2)))]
        inputs: list[Any] = draw(st.lists(st.sampled_from(written), unique=True)) if written else []
        inputs += draw(st.lists(st.sampled_from(["src/a", "b b", "ü.txt"]), unique=True))
        if draw(st.booleans()):
            inputs.append({"url": f"https://h.example/{name}.bin", "path": f"url/{name}"})
        for key, value in (
            ("inputs", inputs),
            ("outputs", outputs),
            ("after", draw(st.lists(st.sampled_from(names[:index]), unique=True)) if index else []),
            ("retries", draw(st.integers(0, 3))),
            ("require", draw(_requirements)),
            ("keep", draw(st.booleans())),
            ("env", draw(st.dictionaries(st.sampled_from(["A", "B_2", "_c"]), _text))),
            (
                "limits",
                draw(
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "cpu_s": st.integers(1, 10**6),
                            "wall_s": st.floats(0.1, 10**5),
                            "memory": st.integers(4 << 20, 2**40).map(lambda n: f"{n}B"),
                        },
                    )
                ),
            ),
        ):
            if draw(st.booleans()):
                task[key] = value
        tasks[name] = task
        written += outputs
    grid = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "workers": st.sampled_from([3, "2..5", "..4", "1.."]),
                "require": _requirements.filter(bool),
                "max_cost": st.floats(0, 100),
                "rank": st.sampled_from(["cost", "cpus"]),
            },
        )
    )
    return {"name": draw(st.sampled_from(["w", "a job", "x-1.2"])), "grid": grid, "tasks": tasks}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workflows())
def test_any_workflow_loads_back_equal(data: dict[str, Any]) -> None:
    workflow = workflow_from_mapping(data, "/nonexistent", check_sources=False)
    assert_same(workflow, reloaded(workflow))


# -- bgrid convert ---------------------------------------------------------------------------


def test_convert_writes_the_yaml_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "wf.json"
    source.write_text('{"tasks": {"t": {"command": "echo hi > o", "outputs": ["o"]}}}')
    out = tmp_path / "wf.yaml"
    assert main(["convert", str(source), "-o", str(out)]) == 0
    assert f"wrote {out}: 1 task(s)" in capsys.readouterr().out
    assert_same(load_workflow(out), load_workflow(source))
    assert yaml.safe_load(out.read_text()) == {
        "name": "wf",
        "tasks": {"t": {"command": "echo hi > o", "outputs": ["o"]}},
    }

    out.write_text("mine")
    assert main(["convert", str(source), "-o", str(out)]) == 2
    assert f"{out} exists; pass --force to replace it" in capsys.readouterr().err
    assert out.read_text() == "mine"
    assert main(["convert", str(source), "-o", str(out), "--force"]) == 0
    assert out.read_text().startswith(
        "# bgrid convert wf.json: the workflow as bgrid understood it"
    )


def test_convert_to_stdout_prints_only_the_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["convert", str(EXAMPLES / "hello.yaml"), "-o", "-"]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    converted = workflow_from_mapping(yaml.safe_load(printed.out), EXAMPLES, source="hello.yaml")
    assert_same(converted, load_workflow(EXAMPLES / "hello.yaml"))


def test_convert_says_where_the_inputs_are_read_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hello.yaml"
    assert main(["convert", str(EXAMPLES / "hello.yaml"), "-o", str(out)]) == 0
    assert f"reads its inputs from {tmp_path}, not {EXAMPLES}" in capsys.readouterr().err


def test_convert_of_a_wrong_workflow_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "wf.yaml"
    source.write_text("tasks:\n  t: {command: x, input: [a]}\n")
    assert main(["convert", str(source), "-o", str(tmp_path / "out.yaml")]) == 2
    assert "unknown key 'input'" in capsys.readouterr().err
    assert not (tmp_path / "out.yaml").exists()


# -- the keys other parts of issue 10 add to TaskSpec ------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _TaskWithIssue10Keys(TaskSpec):
    """A TaskSpec as it will be once the contract's keys are merged (their defaults here)."""

    priority: int = 0
    category: str | None = None
    retry_unless_exit: int | None = None
    abort_on: Mapping[str, int] | None = None
    final: bool = False
    noop: bool = False
    pre: str | None = None
    post: str | None = None
    script_dir: Path = Path(".")
    pre_skip: int | None = None
    stdout: str | None = None
    stderr: str | None = None


def test_the_contract_s_keys_are_written_when_a_task_has_them_and_not_at_their_default() -> None:
    plain = _TaskWithIssue10Keys("plain", "true", (), ())
    full = _TaskWithIssue10Keys(
        "full", "", ("i",), (), after=("plain",), retries=2, retry_unless_exit=7,
        priority=5, category="io", abort_on=MappingProxyType({"exit": 3, "status": 1}),
        noop=True, pre="sh pre.sh", pre_skip=9, post="sh post.sh $RETURN",
        script_dir=Path("scripts"), stdout="logs/full.out", stderr="logs/full.err",
    )  # fmt: skip
    last = _TaskWithIssue10Keys("last", "echo $BGRID_DAG_STATUS", (), (), final=True)
    workflow = workflow_from_mapping(
        {"tasks": {"plain": {"command": "true"}}}, "/nonexistent", source="w.yaml"
    )
    workflow.tasks = {"plain": plain, "full": full, "last": last}
    tasks = workflow_to_mapping(workflow)["tasks"]
    assert tasks["plain"] == {"command": "true"}
    assert list(tasks["full"].items()) == [
        ("noop", True),  # no command: a noop needs none
        ("inputs", ["i"]),
        ("after", ["plain"]),
        ("retries", 2),
        ("retry_unless_exit", 7),
        ("priority", 5),
        ("category", "io"),
        ("pre", "sh pre.sh"),
        ("pre_skip", 9),
        ("post", "sh post.sh $RETURN"),
        ("script_dir", "scripts"),
        ("stdout", "logs/full.out"),
        ("stderr", "logs/full.err"),
        ("abort_on", {"exit": 3, "status": 1}),
    ]
    assert tasks["last"] == {"command": "echo $BGRID_DAG_STATUS", "final": True}
    yaml.safe_load(workflow_to_yaml(workflow))  # plain YAML: no Python object left in it
