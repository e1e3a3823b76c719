"""Workflow loading and validation: what a user writes, what they are told when it is wrong."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bonjourgrid.dag import (
    GridSpec,
    TaskSpec,
    load_workflow,
    normalize_path,
    parse,
    parse_worker_range,
    workflow_from_mapping,
)
from bonjourgrid.errors import DagError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "dags"


def task(command: str = "true", **fields: Any) -> dict[str, Any]:
    return {"command": command, **fields}


def flow(**tasks: object) -> dict[str, Any]:
    return {"name": "t", "tasks": tasks}


def dag_error(data: object, root: Path | str = "/nonexistent", **kwargs: Any) -> str:
    with pytest.raises(DagError) as caught:
        workflow_from_mapping(data, root, source="wf.yaml", **kwargs)
    return str(caught.value)


# ---------------------------------------------------------------------------------------------
# What a valid workflow turns into


def test_file_flow_makes_the_graph(tmp_path: Path) -> None:
    (tmp_path / "raw.txt").write_text("x")
    wf = workflow_from_mapping(
        {
            "name": "demo",
            "tasks": {
                "b": task("cp a.txt b.txt", inputs=["a.txt"], outputs=["b.txt"]),
                "a": task("cp raw.txt a.txt", inputs="raw.txt", outputs="a.txt"),
                "c": task("cat a.txt b.txt > c.txt", inputs=["a.txt", "b.txt"], outputs=["c.txt"]),
                "d": task("date > d.txt", outputs=["d.txt"], after=["a"]),
            },
        },
        tmp_path,
    )
    assert wf.name == "demo"
    assert wf.root == tmp_path
    assert set(wf.graph.edges) == {("a", "b"), ("a", "c"), ("b", "c"), ("a", "d")}
    assert wf.graph.edges["a", "c"]["files"] == ["a.txt"]
    assert wf.graph.edges["a", "d"]["files"] == []
    assert wf.producer == {"b.txt": "b", "a.txt": "a", "c.txt": "c", "d.txt": "d"}
    assert wf.source_inputs() == ["raw.txt"]
    assert wf.final_outputs() == ["c.txt", "d.txt"]
    assert wf.topological_order() == ["a", "b", "c", "d"]
    assert wf.tasks["a"].inputs == ("raw.txt",)  # a single string is a one-item list
    assert wf.grid == GridSpec()


def test_topological_order_keeps_file_order_between_independent_tasks() -> None:
    names = ["zeta", "alpha", "mid", "beta"]
    wf = workflow_from_mapping(flow(**{n: task(outputs=[n]) for n in names}), "/x")
    assert wf.topological_order() == names


def test_paths_are_normalized() -> None:
    wf = workflow_from_mapping(
        flow(
            a=task(outputs=["./out//x.txt", "dir/../y.txt", "z/", "out/x.txt"]),
            b=task(inputs=["out/./x.txt"], outputs=["w"]),
        ),
        "/x",
    )
    assert wf.tasks["a"].outputs == ("out/x.txt", "y.txt", "z")  # duplicates collapse
    assert wf.tasks["b"].inputs == ("out/x.txt",)
    assert list(wf.graph.edges) == [("a", "b")]


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("../x", "escapes the task directory"),
        ("a/../../x", "escapes the task directory"),
        ("..", "escapes the task directory"),
        ("/etc/passwd", "is absolute"),
        ("~/x", "home directory"),
        ("~", "home directory"),
        ("", "empty path"),
        (".", "task directory itself"),
        ("a/..", "task directory itself"),
        ("a\0b", "NUL"),
        (3, "not a path"),
    ],
)
def test_paths_may_not_escape(path: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        normalize_path(path)
    message = dag_error(flow(a=task(outputs=[path])))
    assert "task 'a': outputs[0]" in message
    assert problem in message


def test_defaults_apply_and_tasks_override() -> None:
    wf = workflow_from_mapping(
        {
            "defaults": {"retries": 2, "require": "ram>=512MiB", "env": {"A": "1", "B": 2}},
            "tasks": {
                "plain": task(outputs=["p"]),
                "own": task(outputs=["o"], retries=0, require="cpus>=4", env={"B": "x"}, keep=True),
            },
        },
        "/x",
    )
    plain, own = wf.tasks["plain"], wf.tasks["own"]
    assert (plain.retries, plain.require, dict(plain.env), plain.keep) == (
        2,
        "ram>=512MiB",
        {"A": "1", "B": "2"},
        False,
    )
    assert (own.retries, own.require, dict(own.env), own.keep) == (
        0,
        "cpus>=4",
        {"A": "1", "B": "x"},
        True,
    )


def test_task_spec_is_an_immutable_record() -> None:
    env = {"A": "1"}
    spec = TaskSpec("a", "true", (), ("x",), env=env)
    env["A"] = "changed"
    assert spec.env == {"A": "1"}
    with pytest.raises(TypeError):
        spec.env["A"] = "2"  # type: ignore[index]
    assert hash(spec) == hash(TaskSpec("a", "true", (), ("x",), env={"A": "other"}))
    assert TaskSpec("a", "true", (), ()).env == {}


def test_grid_section() -> None:
    wf = workflow_from_mapping(
        {
            "grid": {
                "workers": {"min": 1, "max": 8},
                "require": "ram>=2GiB and cpus>=2",
                "max_cost": 1.5,
                "rank": "cpus",
            },
            "tasks": {"a": task(outputs=["x"])},
        },
        "/x",
        source="montage.yaml",
    )
    assert wf.grid == GridSpec(1, 8, "ram>=2GiB and cpus>=2", 1.5, "cpus")
    assert wf.name == "montage"  # no name: the file's stem


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (4, (None, 4)),
        ("4", (None, 4)),
        ("2..8", (2, 8)),
        (" 2 .. 8 ", (2, 8)),
        ("2..", (2, None)),
        ("..8", (None, 8)),
        ({"min": 1, "max": 8}, (1, 8)),
        ({"max": 3}, (None, 3)),
        ({}, (None, None)),
    ],
)
def test_worker_ranges(value: object, expected: tuple[int | None, int | None]) -> None:
    assert parse_worker_range(value) == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("8..2", "min 8 is larger than max 2"),
        (0, "at least 1"),
        ("..", "not a count or range"),
        ("a..b", "not a count or range"),
        (1.5, "not a count or range"),
        (True, "not a count or range"),
        ({"min": -1}, "whole number"),
        ({"least": 1}, "unknown keys"),
    ],
)
def test_bad_worker_ranges(value: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_worker_range(value)
    assert problem in dag_error({"grid": {"workers": value}, "tasks": {"a": task()}})


# ---------------------------------------------------------------------------------------------
# What the user is told


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, ["the workflow is empty"]),
        ([1, 2], ["top level is a list, not a mapping"]),
        ({"name": "x"}, ["`tasks` is missing or empty"]),
        ({"tasks": {}}, ["`tasks` is missing or empty"]),
        ({"tasks": ["a", "b"]}, ["`tasks` is a list"]),
        (flow(a="echo hi"), ["task 'a' must be a mapping"]),
        (flow(a={"outputs": ["x"]}), ["task 'a' has no command", "one string"]),
        (flow(a={"command": ["ls", "-l"]}), ["task 'a' command ['ls', '-l'] is not a string"]),
        (flow(a={"command": "  "}), ["task 'a'", "is not a string"]),
        (flow(a=task(retries=-1)), ["task 'a': retries -1 must be a whole number >= 0"]),
        (flow(a=task(retries="2")), ["task 'a': retries '2'"]),
        (flow(a=task(retries=True)), ["task 'a': retries True"]),
        (flow(a=task(retries=1.0)), ["task 'a': retries 1.0"]),
        (flow(a=task(keep="yes")), ["task 'a': keep 'yes' must be true or false"]),
        (flow(a=task(inputs={"x": 1})), ["task 'a': inputs must be a list of paths, not dict"]),
        (flow(a=task(after=[1])), ["task 'a': after: 1 is not a task name"]),
        (flow(a=task(env=["A=1"])), ["task 'a': env must be a mapping"]),
        (flow(a=task(env={"A-B": "1"})), ["env name 'A-B' is not a variable name"]),
        (flow(a=task(env={"A": None})), ["env A = None must be a string"]),
        (flow(a=task(env={"A": True})), ["env A = True must be a string"]),
        (flow(**{"a b": task()}), ["task name 'a b' is not valid"]),
        (flow(**{"..": task()}), ["task name '..' is not valid"]),
        (flow(**{"": task()}), ["task name '' is not valid"]),
        (flow(**{"x" * 300: task()}), ["longer than 200 characters"]),
        ({"tasks": {1: task()}}, ["task name 1 is not valid", "quote numbers"]),
        (flow(a=task(require="ram>=")), ["task 'a': cannot read requirement 'ram>='"]),
        (flow(a=task(require=4)), ["task 'a': require must be a string"]),
        (
            flow(a=task(inputs=["x"], outputs=["./x"])),
            ["task 'a': 'x' is both an input and an output", "new path"],
        ),
        (
            flow(a=task(outputs=["x"]), b=task(outputs=["x"])),
            ["task 'b': output 'x' is also written by task 'a'", "one writer"],
        ),
        (
            flow(a=task(outputs=["x"]), build=task(after=["biuld"])),
            ["task 'build': after names unknown task 'biuld' (did you mean 'build'?)"],
        ),
        ({"name": "a/b", "tasks": {"a": task()}}, ["name 'a/b' is not a job name"]),
        ({"name": "x" * 64, "tasks": {"a": task()}}, ["at most 63 bytes"]),
        ({"grid": "big", "tasks": {"a": task()}}, ["`grid` must be a mapping"]),
        ({"grid": {"max_cost": -1}, "tasks": {"a": task()}}, ["max_cost -1 must be a number >= 0"]),
        ({"grid": {"max_cost": "1"}, "tasks": {"a": task()}}, ["max_cost '1'"]),
        ({"grid": {"rank": "speed"}, "tasks": {"a": task()}}, ["rank 'speed' is not one of cost"]),
        ({"grid": {"require": "ram>>1"}, "tasks": {"a": task()}}, ["grid: cannot read"]),
        ({"defaults": [], "tasks": {"a": task()}}, ["`defaults` must be a mapping"]),
        ({"defaults": {"retries": -2}, "tasks": {"a": task()}}, ["defaults: retries -2"]),
        ({"defaults": {"require": "(x"}, "tasks": {"a": task()}}, ["defaults: cannot read"]),
        (flow(a=task(limits=[60])), ["task 'a': limits must be a mapping", "cpu_s: 600"]),
        (flow(a=task(limits={"cpu_s": -1})), ["task 'a': limits: cpu_s -1 must be a number"]),
        (flow(a=task(limits={"cpu_s": 0})), ["task 'a': limits: cpu_s 0 must be"]),
        (flow(a=task(limits={"cpu_s": "10"})), ["task 'a': limits: cpu_s '10' must be"]),
        (flow(a=task(limits={"cpu_s": True})), ["task 'a': limits: cpu_s True must be"]),
        (flow(a=task(limits={"cpu_s": float("inf")})), ["limits: cpu_s inf must be"]),
        (flow(a=task(limits={"cpu_s": 1e12})), ["cpu_s 1000000000000.0 is over"]),
        (flow(a=task(limits={"memory": "lots"})), ["limits: memory 'lots' is not a size"]),
        (flow(a=task(limits={"memory": "-5MiB"})), ["limits: memory '-5MiB' is not a size"]),
        (flow(a=task(limits={"memory": -5})), ["limits: memory -5 must be between 4.0 MiB"]),
        (flow(a=task(limits={"memory": "1KiB"})), ["limits: memory '1KiB' must be between"]),
        (flow(a=task(limits={"memory": [1]})), ["limits: memory [1] must be a size"]),
        (
            {"defaults": {"limits": {"cpu_s": "x"}}, "tasks": {"a": task()}},
            ["defaults: limits: cpu_s 'x'"],
        ),
        (flow(a=task(limits={"wall_s": 0})), ["task 'a': limits: wall_s 0 must be"]),
        (flow(a=task(limits={"wall_s": "1h"})), ["limits: wall_s '1h' must be a number"]),
        (flow(a=task(limits={"wall_s": 1e12})), ["wall_s 1000000000000.0 is over"]),
        # What a worker would refuse at its boundary is refused here, before any peer is used.
        (flow(a=task("echo a\0b")), ["task 'a': command contains a NUL", "remove it"]),
        (
            flow(a=task(env={"GREETING": "hi\0there"})),
            ["task 'a': env GREETING contains a NUL", "remove it"],
        ),
        (flow(a=task(env={"A\0B": "x"})), ["task 'a': env name 'A\\x00B' is not a variable"]),
        (
            flow(a=task("echo " + "x" * (64 * 1024))),
            ["task 'a': command is 65541 bytes, over the 64 KiB a worker takes", "input file"],
        ),
        (
            flow(a=task("echo " + "é" * (32 * 1024))),  # characters fit, UTF-8 bytes do not
            ["task 'a': command is 65541 bytes, over the 64 KiB"],
        ),
        (
            {"defaults": {"env": {"BIG": "x" * (64 * 1024 + 1)}}, "tasks": {"a": task()}},
            ["defaults: env BIG is 65537 bytes, over the 64 KiB a worker takes", "input file"],
        ),
    ],
)
def test_problems_name_the_task_and_what_to_do(data: object, expected: list[str]) -> None:
    message = dag_error(data)
    assert message.startswith("wf.yaml")
    for part in expected:
        assert part in message


def test_limits_come_from_defaults_and_tasks_override_them_key_by_key() -> None:
    gib, mib = 1024**3, 1024**2
    wf = workflow_from_mapping(
        {
            "defaults": {"limits": {"cpu_s": 60, "memory": "1GiB"}},
            "tasks": {
                "plain": task(outputs=["p"]),
                "own": task(outputs=["o"], limits={"memory": 512, "cpu_s": 2.5}),
                "free": task(outputs=["f"], limits={"cpu_s": None}),  # null lifts a default
            },
        },
        "/x",
    )
    assert dict(wf.tasks["plain"].limits) == {"cpu_s": 60, "memory": gib}
    assert dict(wf.tasks["own"].limits) == {"cpu_s": 3, "memory": 512 * mib}  # 2.5 s -> 3
    assert dict(wf.tasks["free"].limits) == {"memory": gib}
    unlimited = workflow_from_mapping(flow(a=task(outputs=["a"])), "/x")
    assert dict(unlimited.tasks["a"].limits) == {}
    with pytest.raises(TypeError):
        wf.tasks["plain"].limits["cpu_s"] = 1  # type: ignore[index]


def test_a_command_and_env_values_up_to_the_wire_limit_are_taken() -> None:
    command = "echo " + "x" * (64 * 1024 - 5)  # exactly 64 KiB
    wf = workflow_from_mapping(flow(a=task(command, env={"V": "y" * 64 * 1024})), "/x")
    assert wf.tasks["a"].command == command and len(wf.tasks["a"].env["V"]) == 64 * 1024


def test_a_wall_clock_limit_is_whole_seconds_rounded_up() -> None:
    wf = workflow_from_mapping(
        {
            "defaults": {"limits": {"wall_s": 600}},
            "tasks": {"a": task(outputs=["a"]), "b": task(outputs=["b"], limits={"wall_s": 1.5})},
        },
        "/x",
    )
    assert dict(wf.tasks["a"].limits) == {"wall_s": 600}
    assert dict(wf.tasks["b"].limits) == {"wall_s": 2}


def test_an_unknown_limit_is_an_error_with_a_suggestion() -> None:
    message = dag_error(flow(a=task(limits={"cpu": 10, "memory": "64MiB"})))
    assert "unknown key 'cpu' in task 'a' limits; did you mean 'cpu_s'?" in message


def test_defaults_problems_are_reported_once_not_per_task() -> None:
    tasks = {f"t{i}": task(outputs=[f"o{i}"]) for i in range(50)}
    message = dag_error({"defaults": {"retries": "x"}, "tasks": tasks})
    assert message == "wf.yaml: defaults: retries 'x' must be a whole number >= 0"


def test_missing_input_says_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "here.txt").write_text("x")
    wf = workflow_from_mapping(flow(a=task(inputs=["here.txt"], outputs=["o"])), tmp_path)
    assert wf.source_inputs() == ["here.txt"]

    message = dag_error(flow(a=task(inputs=["nothere.txt"], outputs=["o"])), tmp_path)
    assert "task 'a': input 'nothere.txt' is not written by any task" in message
    assert str(tmp_path) in message
    assert "add the file there" in message

    message = dag_error(flow(a=task(outputs=["out.txt"]), b=task(inputs=["otu.txt"])), tmp_path)
    assert "(did you mean 'out.txt'?)" in message

    message = dag_error(flow(a=task(inputs=["data"])), tmp_path)
    assert "input 'data' is a directory" in message


def test_unchecked_sources_are_trusted() -> None:
    wf = workflow_from_mapping(flow(a=task(inputs=["big.dat"])), "/nowhere", check_sources=False)
    assert wf.source_inputs() == ["big.dat"]


@pytest.mark.parametrize(
    ("tasks", "loop"),
    [
        ({"a": task(inputs=["b"], outputs=["a"]), "b": task(inputs=["a"], outputs=["b"])},
         ["a -> b -> a", "b -> a -> b"]),
        ({"a": task(after=["a"])}, ["a -> a"]),
        ({"a": task(after=["c"]), "b": task(after=["a"]), "c": task(after=["b"])},
         ["a -> b -> c -> a", "b -> c -> a -> b", "c -> a -> b -> c"]),
    ],
)  # fmt: skip
def test_cycles_are_named(tasks: dict[str, Any], loop: list[str]) -> None:
    message = dag_error({"tasks": tasks})
    assert any(text in message for text in loop), message
    assert "remove one of these dependencies" in message


def test_cycle_message_says_which_file_or_after() -> None:
    message = dag_error(
        {
            "tasks": {
                "a": task(inputs=["b.txt"], outputs=["a.txt"]),
                "b": task(after=["a"], outputs=["b.txt"]),
            }
        }
    )
    assert "a reads 'b.txt' from b" in message
    assert "b runs after a" in message


def test_all_problems_of_a_pass_come_together() -> None:
    message = dag_error(flow(a=task(retries=-1), b={"outputs": ["x"]}, c=task(outputs=["/abs"])))
    assert message.startswith("wf.yaml has 3 problems:")
    assert "task 'a'" in message and "task 'b'" in message and "task 'c'" in message


def test_a_flood_of_problems_is_cut_short() -> None:
    message = dag_error({"tasks": {f"t{i}": task(retries=-1) for i in range(1000)}})
    assert "has 1000 problems" in message
    assert "... and 980 more" in message
    assert len(message) < 5000


def test_unknown_keys_are_errors_once_each_with_a_suggestion() -> None:
    data = {
        "tasks": {f"t{i}": {"command": "true", "input": ["x"], "outputs": ["y"]} for i in range(3)},
        "defaults": {"retry": 2},
        "grid": {"workers": 2, "colour": "blue"},
        "extra": 1,
    }
    with pytest.raises(DagError) as err:
        workflow_from_mapping(data, "/x", source="wf.yaml")
    message = str(err.value)
    assert message.startswith("wf.yaml has 4 problems"), message
    assert "unknown key 'input' in task 't0' and 2 more; did you mean 'inputs'?" in message
    assert "unknown key 'retry' in defaults; did you mean 'retries'?" in message
    assert "'colour' in grid" in message and "known keys: workers" in message
    assert "unknown key 'extra' in the top level" in message


# ---------------------------------------------------------------------------------------------
# Files


def test_load_yaml_and_json_files(tmp_path: Path) -> None:
    data = {"name": "files", "tasks": {"a": task("echo hi > x", outputs=["x"])}}
    (tmp_path / "wf.json").write_text(json.dumps(data))
    (tmp_path / "wf.yml").write_text(
        "name: files\ntasks:\n  a: {command: echo hi > x, outputs: x}\n"
    )
    for name in ("wf.json", "wf.yml"):
        wf = load_workflow(tmp_path / name)
        assert wf.name == "files"
        assert wf.root == tmp_path.resolve()
        assert wf.tasks["a"].outputs == ("x",)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.yaml", "tasks:\n  a: {command: true\n", "bad.yaml: line 3, column 1"),
        ("bad.yaml", "tasks:\n  a:\n    command: x\n   outputs: y\n", "line 4"),
        ("bad.yaml", "", "the workflow is empty"),
        ("bad.yaml", "- a\n- b\n", "top level is a list"),
        ("bad.json", '{"tasks": {"a": }}', "bad.json: line 1, column 17"),
        ("bad.json", '{"tasks": {"a": {"command": "x"},\n "a": {}}}', "key 'a' appears twice"),
        ("dup.yaml", "tasks:\n  a: {command: x}\n  b: {command: y}\n  a: {command: z}\n",
         "line 4, column 3: key 'a' appears twice (first on line 2)"),
        ("wf.txt", "tasks: {}", "unknown workflow file type '.txt'"),
        ("bin.yaml", b"\xff\xfe".decode("latin-1"), "not UTF-8"),
    ],
)  # fmt: skip
def test_file_problems_give_line_and_column(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1" if name == "bin.yaml" else "utf-8"))
    with pytest.raises(DagError) as caught:
        load_workflow(path)
    assert expected in str(caught.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DagError, match="no such workflow file"):
        load_workflow(tmp_path / "nope.yaml")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(DagError, match="is a directory"):
        load_workflow(tmp_path / "dir.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tasks:\n  a: {command: x, since: 2001-02-30}\n",
         "line 2, column 26: cannot read '2001-02-30' as a YAML timestamp"),
        ("tasks:\n  a: {command: x, retries: " + "9" * 5000 + "}\n",
         "line 2, column 28: cannot read '999"),
        ("tasks:\n  a: {command: *nowhere}\n", "line 2, column 16: found undefined alias"),
        ("tasks: {}\n---\ntasks: {}\n", "line 2, column 1: but found another document"),
        ("tasks:\n  a: {command: !!python/name:os.system x}\n",
         "line 2, column 16: could not determine a constructor"),
        ("tasks:\n  ? [a, b]\n  : {command: x}\n", "found unhashable key"),
    ],
)  # fmt: skip
def test_yaml_problems_give_line_and_column(text: str, expected: str) -> None:
    for fast in (True, False):
        with pytest.raises(DagError) as caught:
            parse.parse_yaml(text, "wf.yaml", fast=fast)
        assert str(caught.value).startswith("wf.yaml: ")
        assert expected in str(caught.value)


def test_yaml_values_are_those_of_the_safe_loader() -> None:
    text = (
        "a: &shared [x, 'y', 010, 0o17, 0x1F, 1_000, 1:20, 1e3, .inf, yes, No, ~, '', 2001-12-14]\n"
        "b: *shared\n"
        "c: !!str 12\n"
        "d: ! 12\n"
        "e: {<<: {m: 1}, n: 2}\n"
        "f: !!binary aGVsbG8=\n"
        "1: one\n"
        "'1': quoted one\n"
        "g:\n"
    )
    value = parse.parse_yaml(text, "wf.yaml")
    assert value == yaml.safe_load(text)
    assert isinstance(value, dict) and value["a"] is value["b"]  # an alias is the same object


def test_the_fast_path_takes_workflows_as_users_write_them() -> None:
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        text = path.read_text()
        assert parse._load_fast(text) == yaml.safe_load(text), path  # no fallback raised


# Fragments of flow YAML that exercise every branch of the fast path and its fallbacks:
# implicit types, quoting, explicit tags, merge keys, anchors (duplicate ones too), aliases
# (undefined, forward, or into their own collection) and syntax errors.
_LEAVES = st.sampled_from(
    ["x", "task_1", "yes", "No", "~", "null", "", "0o17", "010", "0x1F", "1_000", "1:20",
     "2001-12-14", "2001-12-14t21:59:43.10-05:00", "2001-02-30", ".inf", "-.Inf", ".NaN", "=",
     "<<", "1e3", "+12", "-0", "3.", "'q'", '"d\\n"', "!!str 12", "!!int '7'", "! 12",
     "!!binary aGVsbG8=", "!local x", "*a0", "*a1", "&a0 v", "&a1 7", "[", "a: b", "? k"]
)  # fmt: skip


def _flow(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    anchor = st.sampled_from(["", "", "&a0 ", "&a1 "])
    items = st.lists(children, max_size=4)
    pairs = st.lists(st.tuples(children, children), max_size=4)
    as_list = st.builds(lambda a, xs: a + "[" + ", ".join(xs) + "]", anchor, items)
    as_map = st.builds(
        lambda a, kv: a + "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}", anchor, pairs
    )
    return as_list | as_map


def _outcome(text: str, fast: bool) -> tuple[str, str]:
    try:
        return "value", repr(parse.parse_yaml(text, "wf.yaml", fast=fast))
    except DagError as err:
        return "error", str(err)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(_LEAVES, _flow, max_leaves=12), st.booleans())
def test_the_fast_yaml_path_agrees_with_the_complete_loader(body: str, two_docs: bool) -> None:
    text = f"tasks: {body}\n" + ("---\nx: 1\n" if two_docs else "")
    assert _outcome(text, fast=True) == _outcome(text, fast=False)


_DATA = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=100, deadline=None)
@given(_DATA, st.booleans())
def test_any_data_dumped_as_yaml_loads_back_the_same(data: object, share: bool) -> None:
    document = {"a": data, "b": data} if share else {"a": data}  # shared: anchors and aliases
    text = yaml.safe_dump(document, default_flow_style=False, allow_unicode=True)
    # Against PyYAML's complete loader, not `document`: PyYAML itself does not round-trip
    # some characters (a NEL in a quoted key comes back as a space).
    assert parse.parse_yaml(text, "wf.yaml") == yaml.safe_load(text)


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    (tmp_path / "wf.yaml").write_text(
        "x-base: &base {command: x, retries: 3}\n"  # x-: the user's own top-level keys
        "tasks:\n  a: {<<: *base, outputs: a}\n  b: {<<: *base, command: y, outputs: b}\n"
    )
    wf = load_workflow(tmp_path / "wf.yaml")
    assert (wf.tasks["a"].command, wf.tasks["b"].command, wf.tasks["b"].retries) == ("x", "y", 3)


# ---------------------------------------------------------------------------------------------
# The shipped examples


@pytest.mark.parametrize(
    ("path", "tasks", "edges", "sources", "finals"),
    [
        ("hello.yaml", 3, 2, ["name.txt"], ["hello.txt"]),
        ("diamond.yaml", 8, 12, [], ["diamond.txt"]),
        ("wordcount/wordcount.yaml", 6, 5, [f"text/part-{i}.txt" for i in range(1, 5)],
         ["wordcount.txt"]),
    ],
)  # fmt: skip
def test_examples_load(
    path: str, tasks: int, edges: int, sources: list[str], finals: list[str]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an example with an unknown key is a broken example
        wf = load_workflow(EXAMPLES / path)
    assert len(wf.tasks) == wf.graph.number_of_nodes() == tasks
    assert wf.graph.number_of_edges() == edges
    assert wf.source_inputs() == sources
    assert wf.final_outputs() == finals


# ---------------------------------------------------------------------------------------------
# Scale: validation is linear


N = 100_000


def test_a_100k_task_chain_loads_quickly() -> None:
    tasks = {
        f"t{i}": task("cp a b", inputs=[f"f{i - 1}.txt"] if i else [], outputs=[f"f{i}.txt"])
        for i in range(N)
    }
    start = time.perf_counter()
    wf = workflow_from_mapping({"tasks": tasks}, "/nonexistent")
    elapsed = time.perf_counter() - start
    assert wf.graph.number_of_nodes() == N
    assert wf.graph.number_of_edges() == N - 1
    assert wf.final_outputs() == [f"f{N - 1}.txt"]
    print(f"\nvalidated {N} tasks in {elapsed:.2f} s")

    tasks["t0"] = task("cp a b", after=[f"t{N - 1}"], outputs=["f0.txt"])
    start = time.perf_counter()
    message = dag_error({"tasks": tasks})
    assert time.perf_counter() - start < 20
    assert f"{N} tasks form a cycle" in message
    assert len(message) < 2000


def test_a_100k_task_yaml_file_loads_in_seconds(tmp_path: Path) -> None:
    lines = ["name: big", "defaults: {retries: 1, limits: {cpu_s: 600}}", "tasks:"]
    for i in range(N):
        lines += [
            f"  t{i}:",
            f'    command: "cp f{i - 1}.txt f{i}.txt"',
            f"    inputs: [f{i - 1}.txt]" if i else "    inputs: []",
            f"    outputs: [f{i}.txt]",
        ]
    path = tmp_path / "big.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    wf = load_workflow(path)
    elapsed = time.perf_counter() - start
    print(f"\n{N} tasks of YAML ({path.stat().st_size >> 20} MiB) loaded in {elapsed:.2f} s")
    assert len(wf.tasks) == N and wf.tasks[f"t{N - 1}"].retries == 1
    assert dict(wf.tasks["t7"].limits) == {"cpu_s": 600}


def test_a_100k_wide_fan_out_and_in_loads_quickly(tmp_path: Path) -> None:
    (tmp_path / "seed").write_text("x")
    tasks = {
        "split": task(inputs=["seed"], outputs=["s"]),
        **{f"m{i}": task(inputs=["s"], outputs=[f"parts/{i}"]) for i in range(N)},
        "join": task(inputs=[f"parts/{i}" for i in range(N)], outputs=["all"]),
    }
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({"tasks": tasks}))
    start = time.perf_counter()
    wf = load_workflow(path)
    elapsed = time.perf_counter() - start
    assert wf.graph.number_of_nodes() == N + 2
    assert wf.graph.number_of_edges() == 2 * N
    assert wf.graph.in_degree("join") == N
    assert wf.source_inputs() == ["seed"]
    assert wf.final_outputs() == ["all"]
    print(f"\nloaded {N} tasks in {elapsed:.2f} s")
