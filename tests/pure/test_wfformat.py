"""WfCommons WfFormat instances: what bgrid understands of them, and what it refuses.

Small instances written by hand in each layout (1.4: files inside the tasks; 1.5/1.6:
specification and execution), and instances that wfcommons' own recipes generate. The stand-in
script runs for real in a temporary directory.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bonjourgrid import standin
from bonjourgrid.coordinator.submit import wfformat_options
from bonjourgrid.dag import Workflow, load_workflow
from bonjourgrid.dag.wfformat import INPUTS_TASK, STANDIN_PATH, STANDIN_URL, WfFormatOptions
from bonjourgrid.errors import ConfigError, DagError
from tests.wfinstances import RECIPE_TASKS, file_sizes, generate, writers_and_readers

# A diamond: split reads data.txt (in the submit directory or not) and writes a and b; left
# and right read one each; join reads both. join also names `left` as a parent.
_FILES = {"data.txt": 1000, "a": 300, "b": 200, "l.out": 50, "r.out": 60, "final.out": 7}
_TASKS: list[tuple[str, str, list[str], list[str], list[str], float]] = [
    # id, name, parents, inputs, outputs, runtime
    ("split_1", "split", [], ["data.txt"], ["a", "b"], 10.0),
    ("left_2", "left", ["split_1"], ["a"], ["l.out"], 20.0),
    ("right_3", "right", ["split_1"], ["b"], ["r.out"], 30.0),
    ("join_4", "join", ["left_2", "right_3"], ["l.out", "r.out"], ["final.out"], 40.0),
]


def instance_16(version: str = "1.6") -> dict[str, Any]:
    """The diamond in the 1.5/1.6 layout, as wfcommons 1.6 writes it."""
    children: dict[str, list[str]] = {task[0]: [] for task in _TASKS}
    for task_id, _, parents, *_ in _TASKS:
        for parent in parents:
            children[parent].append(task_id)
    return {
        "name": "Diamond: a test/instance",
        "schemaVersion": version,
        "workflow": {
            "specification": {
                "tasks": [
                    {
                        "name": name,
                        "id": task_id,
                        "parents": list(parents),
                        "children": children[task_id],
                        "inputFiles": list(inputs),
                        "outputFiles": list(outputs),
                    }
                    for task_id, name, parents, inputs, outputs, _ in _TASKS
                ],
                "files": [{"id": f, "sizeInBytes": size} for f, size in _FILES.items()],
            },
            "execution": {
                "makespanInSeconds": 100.0,
                "executedAt": "2024-01-01T00:00:00Z",
                "tasks": [
                    {
                        "id": task_id,
                        "runtimeInSeconds": runtime,
                        "coreCount": 2,
                        "command": {"program": f"/opt/bin/{name}", "arguments": ["-i", *inputs]},
                        "machines": ["node-1"],
                    }
                    for task_id, name, _, inputs, _, runtime in _TASKS
                ],
                "machines": [{"nodeName": "node-1", "cpu": {"coreCount": 8}}],
            },
        },
    }


def instance_14() -> dict[str, Any]:
    """The same diamond in the 1.4 layout: files inside the tasks, parents named by name."""
    names = {task_id: f"{name}_ID{index}" for index, (task_id, name, *_) in enumerate(_TASKS)}
    return {
        "name": "Diamond",
        "schemaVersion": "1.4",
        "workflow": {
            "makespanInSeconds": 100.0,
            "executedAt": "2024-01-01T00:00:00Z",
            "machines": [{"nodeName": "node-1"}],
            "tasks": [
                {
                    "name": names[task_id],
                    "id": task_id,
                    "category": name,
                    "type": "compute",
                    "parents": [names[parent] for parent in parents],
                    "files": [
                        *({"link": "input", "name": f, "sizeInBytes": _FILES[f]} for f in inputs),
                        *({"link": "output", "name": f, "sizeInBytes": _FILES[f]} for f in outputs),
                    ],
                    "runtimeInSeconds": runtime,
                    "cores": 2,
                    "machine": "node-1",
                    "command": {"program": f"/opt/bin/{name}", "arguments": ["-i", *inputs]},
                }
                for task_id, name, parents, inputs, outputs, runtime in _TASKS
            ],
        },
    }


def load(tmp_path: Path, instance: object, options: WfFormatOptions | None = None) -> Workflow:
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(instance))
    return load_workflow(path, wfformat=options)


def refusal(tmp_path: Path, instance: object, options: WfFormatOptions | None = None) -> str:
    with pytest.raises(DagError) as caught:
        load(tmp_path, instance, options)
    message = str(caught.value)
    assert message.startswith("wf.json")
    return message


def standin_args(command: str) -> dict[str, list[str]]:
    """The stand-in command's options, by name: {"--out": [...], ...}."""
    words = shlex.split(command)
    assert words[:2] == ["python3", STANDIN_PATH]
    found: dict[str, list[str]] = {}
    for word in words[2:]:
        key, _, value = word.partition("=")
        found.setdefault(key, []).append(value)
    return found


def shape(wf: Workflow) -> tuple[object, ...]:
    """What must not depend on the layout: tasks, their files, the edges, the info kept."""
    return (
        {name: (t.inputs, t.outputs, t.after, dict(t.env)) for name, t in wf.tasks.items()},
        sorted(wf.graph.edges),
        wf.final_outputs(),
    )


# --- the mapping -------------------------------------------------------------------------------


def test_a_1_6_instance_runs_a_stand_in_per_task_with_the_recorded_flow(tmp_path: Path) -> None:
    wf = load(tmp_path, instance_16())
    assert wf.name == "Diamond- a test-instance"
    # data.txt is named only, so a task of bgrid's own writes it first
    assert list(wf.tasks) == ["split_1", "left_2", "right_3", "join_4", INPUTS_TASK]
    assert sorted(wf.graph.edges) == [
        (INPUTS_TASK, "split_1"),
        ("left_2", "join_4"),
        ("right_3", "join_4"),
        ("split_1", "left_2"),
        ("split_1", "right_3"),
    ]
    assert wf.graph.edges["split_1", "left_2"]["files"] == ["a"]
    assert wf.final_outputs() == ["final.out"]
    assert wf.source_inputs() == [STANDIN_PATH]
    assert wf.urls == {STANDIN_PATH: STANDIN_URL}
    join = wf.tasks["join_4"]
    assert join.inputs == ("l.out", "r.out", STANDIN_PATH)
    assert join.outputs == ("final.out",)
    args = standin_args(join.command)
    assert args == {
        "--task": ["join_4"],
        "--program": ["/opt/bin/join"],
        "--cpu-seconds": ["0.04"],  # 40 recorded seconds, times the default 0.001
        "--in": ["l.out", "r.out"],
        "--out": ["final.out=7"],
    }
    assert dict(join.env) == {
        "WFFORMAT_ID": "join_4",
        "WFFORMAT_NAME": "join",
        "WFFORMAT_RUNTIME_S": "40",
        "WFFORMAT_CORES": "2",
        "WFFORMAT_MACHINES": "node-1",
    }
    made = standin_args(wf.tasks[INPUTS_TASK].command)
    assert made["--out"] == ["data.txt=1000"]
    assert made["--cpu-seconds"] == ["0"]


def test_a_source_input_in_the_submit_directory_is_read_from_there(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("real data\n")
    wf = load(tmp_path, instance_16())
    assert INPUTS_TASK not in wf.tasks
    assert wf.source_inputs() == [STANDIN_PATH, "data.txt"]


def test_the_1_5_and_1_4_layouts_give_the_same_workflow_as_1_6(tmp_path: Path) -> None:
    expected = shape(load(tmp_path, instance_16()))
    assert shape(load(tmp_path, instance_16("1.5"))) == expected
    assert shape(load(tmp_path, instance_14())) == expected


def test_the_scales_and_the_interpreter_are_in_each_command(tmp_path: Path) -> None:
    options = WfFormatOptions(runtime_scale=0.5, size_scale=0.1, python="/usr/bin/python3.11")
    wf = load(tmp_path, instance_16(), options)
    words = shlex.split(wf.tasks["split_1"].command)
    assert words[:2] == ["/usr/bin/python3.11", STANDIN_PATH]
    assert "--cpu-seconds=5" in words
    assert words[-2:] == ["--out=a=30", "--out=b=20"]


def test_recorded_programs_run_themselves_and_need_their_inputs(tmp_path: Path) -> None:
    recorded = WfFormatOptions(programs="recorded")
    message = refusal(tmp_path, instance_16(), recorded)
    assert "input 'data.txt' is not written by any task" in message
    (tmp_path / "data.txt").write_text("x")
    wf = load(tmp_path, instance_16(), recorded)
    assert wf.tasks["left_2"].command == "/opt/bin/left -i a"
    fragments = instance_16()
    fragments["workflow"]["execution"]["tasks"][1]["command"] = {
        "program": "cpu hog",
        "arguments": ["left_2", "--percent-cpu 0.6", "--out '{\"l.out\": 50}'"],
    }
    wf = load(tmp_path, fragments, recorded)
    assert shlex.split(wf.tasks["left_2"].command) == [
        "cpu hog", "left_2", "--percent-cpu", "0.6", "--out", '{"l.out": 50}'
    ]  # fmt: skip
    assert wf.tasks["left_2"].inputs == ("a",)
    assert not wf.urls
    no_command = instance_16()
    del no_command["workflow"]["execution"]["tasks"][2]["command"]
    message = refusal(tmp_path, no_command, recorded)
    where = "workflow.specification.tasks[2]"
    assert f"{where}: task 'right_3' has no recorded command.program" in message


def test_ids_a_task_name_cannot_hold_are_mended_and_the_id_kept(tmp_path: Path) -> None:
    instance = instance_16()
    spec = instance["workflow"]["specification"]["tasks"]
    spec[0]["id"] = "split#1"
    spec[1]["parents"] = spec[2]["parents"] = ["split#1"]
    instance["workflow"]["execution"]["tasks"][0]["id"] = "split#1"
    del spec[0]["children"]  # optional: parents say it all
    wf = load(tmp_path, instance)
    assert wf.tasks["split_1"].env["WFFORMAT_ID"] == "split#1"
    assert ("split_1", "left_2") in wf.graph.edges


def test_absolute_file_ids_of_a_trace_become_paths_in_the_sandbox(tmp_path: Path) -> None:
    instance = instance_16()
    spec = instance["workflow"]["specification"]
    spec["tasks"][1]["outputFiles"] = spec["tasks"][3]["inputFiles"][:1] = ["/b6/e95c/l.out"]
    spec["files"].append({"id": "/b6/e95c/l.out", "sizeInBytes": 50})
    wf = load(tmp_path, instance)
    assert wf.tasks["left_2"].outputs == ("b6/e95c/l.out",)
    assert wf.graph.edges["left_2", "join_4"]["files"] == ["b6/e95c/l.out"]
    assert "--out=b6/e95c/l.out=50" in shlex.split(wf.tasks["left_2"].command)


def test_an_instance_without_execution_runs_stand_ins_that_burn_nothing(tmp_path: Path) -> None:
    instance = instance_16()
    del instance["workflow"]["execution"]
    wf = load(tmp_path, instance)
    assert standin_args(wf.tasks["join_4"].command)["--cpu-seconds"] == ["0"]
    assert wf.tasks["join_4"].env == {"WFFORMAT_ID": "join_4", "WFFORMAT_NAME": "join"}


def test_a_native_json_workflow_is_still_read_as_one(tmp_path: Path) -> None:
    wf = load(tmp_path, {"name": "n", "tasks": {"t": {"command": "true", "outputs": ["o"]}}})
    assert list(wf.tasks) == ["t"]


def test_a_task_reading_too_many_files_to_name_counts_them(tmp_path: Path) -> None:
    """Thousands of inputs (a big Montage's mAdd) do not fit in one command: the stand-in is
    told their number; bgrid's own inputs tasks split so each command fits."""
    files = [f"part-{index:05d}-of-a-long-file-name.fits" for index in range(3000)]
    instance = {
        "name": "fan-in",
        "schemaVersion": "1.6",
        "workflow": {
            "specification": {
                "tasks": [
                    {"id": "add", "name": "mAdd", "parents": [], "inputFiles": files,
                     "outputFiles": ["mosaic.fits"]},
                ],
                "files": [{"id": f, "sizeInBytes": 10} for f in [*files, "mosaic.fits"]],
            }
        },
    }  # fmt: skip
    wf = load(tmp_path, instance)
    add = wf.tasks["add"]
    assert len(add.inputs) == 3001
    assert standin_args(add.command)["--in-count"] == ["3000"]
    assert "--in" not in standin_args(add.command)
    makers = [name for name in wf.tasks if name.startswith(INPUTS_TASK)]
    assert makers[:2] == [INPUTS_TASK, f"{INPUTS_TASK}-2"]
    made = [path for name in makers for path in wf.tasks[name].outputs]
    assert made == files


# --- refusals: each names the JSON path ----------------------------------------------------


def _broken(change: str) -> dict[str, Any]:
    instance = instance_16()
    spec = instance["workflow"]["specification"]
    execution = instance["workflow"]["execution"]
    if change == "parent":
        spec["tasks"][3]["parents"][1] = "nobody"
    elif change == "child":
        spec["tasks"][0]["children"] = ["left_2", 7]
    elif change == "inputs":
        spec["tasks"][1]["inputFiles"] = "a"
    elif change == "size":
        spec["files"][2]["sizeInBytes"] = -1
    elif change == "no size":
        del spec["files"][5]
    elif change == "execution id":
        execution["tasks"][1]["id"] = "left_9"
    elif change == "runtime":
        execution["tasks"][0]["runtimeInSeconds"] = "long"
    elif change == "escapes":
        spec["tasks"][3]["outputFiles"] = ["../final.out"]
    elif change == "twin paths":
        spec["tasks"][3]["outputFiles"] = ["/l.out"]
    elif change == "twin ids":
        spec["tasks"][2]["id"] = "left_2"
        del instance["workflow"]["execution"]
    elif change == "twin names":
        spec["tasks"][1]["id"] = "left#2"
        spec["tasks"][2]["id"] = "left_2"
        del instance["workflow"]["execution"]
    elif change == "stand-in path":
        spec["tasks"][3]["outputFiles"] = [STANDIN_PATH]
    elif change == "no tasks":
        spec["tasks"] = []
    return instance


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("parent", "workflow.specification.tasks[3].parents[1]: parent 'nobody' is not the id"),
        ("child", "workflow.specification.tasks[0].children[1]: must be a non-empty string"),
        ("inputs", "workflow.specification.tasks[1].inputFiles: must be a list, not str"),
        ("size", "workflow.specification.files[2].sizeInBytes: must be a whole number of bytes"),
        ("no size", "workflow.specification.tasks[3].outputFiles[0]: file 'final.out' has no"),
        ("execution id", "workflow.execution.tasks[1].id: 'left_9' is not a task"),
        ("runtime", "workflow.execution.tasks[0].runtimeInSeconds: must be a number"),
        ("escapes", "workflow.specification.tasks[3].outputFiles[0]: file '../final.out' escapes"),
        ("twin paths", "outputFiles[0]: files 'l.out' and '/l.out' would both be 'l.out'"),
        ("twin ids", "workflow.specification.tasks[2].id: 'left_2' is the id of"),
        ("twin names", "workflow.specification.tasks[2].id: 'left_2' becomes task name 'left_2'"),
        ("stand-in path", "where bgrid puts the stand-in script"),
        ("no tasks", "workflow.specification.tasks: must be a non-empty list"),
    ],
)
def test_a_broken_instance_is_refused_at_its_json_path(
    tmp_path: Path, change: str, expected: str
) -> None:
    assert expected in refusal(tmp_path, _broken(change))


def test_every_problem_of_a_reading_is_told_at_once(tmp_path: Path) -> None:
    instance = _broken("runtime")
    instance["workflow"]["specification"]["files"][2]["sizeInBytes"] = 1.5
    message = refusal(tmp_path, instance)
    assert "has 2 problems" in message
    assert "tasks[0].runtimeInSeconds" in message and "files[2].sizeInBytes" in message


@pytest.mark.parametrize("version", ["1.3", "2.0", 1.6])
def test_a_schema_version_not_read_here_is_refused(tmp_path: Path, version: object) -> None:
    instance = {**instance_16(), "schemaVersion": version}
    message = refusal(tmp_path, instance)
    assert f"schemaVersion: WfFormat {version!r} is not read here" in message
    assert "wfcommons-migrate-instance.py" in message


def test_a_1_4_file_without_a_link_is_refused_at_its_path(tmp_path: Path) -> None:
    instance = instance_14()
    instance["workflow"]["tasks"][1]["files"][0]["link"] = "in"
    message = refusal(tmp_path, instance)
    assert 'workflow.tasks[1].files[0].link: must be "input" or "output"' in message


def test_the_loader_s_own_checks_still_apply(tmp_path: Path) -> None:
    instance = instance_16()
    instance["workflow"]["specification"]["tasks"][2]["outputFiles"] = ["l.out"]  # two writers
    assert "is also written by task" in refusal(tmp_path, instance)


# --- settings ------------------------------------------------------------------------------


def test_the_settings_come_from_bgrid_toml_then_the_user_s(tmp_path: Path) -> None:
    user = tmp_path / "config.toml"
    user.write_text('[wfformat]\nruntime_scale = 1\npython = "python3.12"\n')
    (tmp_path / "bgrid.toml").write_text('[wfformat]\nprograms = "recorded"\nsize_scale = 0.5\n')
    assert wfformat_options(tmp_path, user_config=user) == WfFormatOptions(
        programs="recorded", runtime_scale=1, size_scale=0.5, python="python3.12"
    )
    assert wfformat_options(tmp_path / "none", user_config=tmp_path / "no") == WfFormatOptions()


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ('programs = "real"', "programs = 'real': choose stand-in or recorded"),
        ("runtime_scale = -1", "runtime_scale = -1: give a number, 0 or more"),
        ('size_scale = "big"', "[wfformat] size_scale = 'big': expected a number, 0 or more"),
        ("scale = 1", "unknown key 'scale' in [wfformat]"),
    ],
)
def test_a_wrong_setting_is_refused_naming_its_file(
    tmp_path: Path, setting: str, expected: str
) -> None:
    (tmp_path / "bgrid.toml").write_text(f"[wfformat]\n{setting}\n")
    with pytest.raises(ConfigError) as caught:
        wfformat_options(tmp_path, user_config=tmp_path / "none.toml")
    assert str(caught.value).startswith(str(tmp_path / "bgrid.toml"))
    assert expected in str(caught.value)


# --- the stand-in itself -------------------------------------------------------------------


def run_standin(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = cwd / STANDIN_PATH
    script.write_bytes(Path(standin.__file__).read_bytes())
    return subprocess.run(
        [sys.executable, STANDIN_PATH, *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_the_stand_in_checks_its_inputs_and_writes_outputs_of_their_size(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("x")
    done = run_standin(
        tmp_path,
        "--task=t1",
        "--program=mAdd",
        "--cpu-seconds=0.05",
        "--in=in.txt",
        "--out=big.fits=3000000",
        "--out=sub/dir/small=a=100",
        "--out=empty=0",
    )
    assert done.returncode == 0, done.stderr
    assert "stand-in for mAdd t1: read 1 input(s)" in done.stdout
    assert (tmp_path / "big.fits").stat().st_size == 3_000_000
    assert (tmp_path / "sub/dir/small=a").stat().st_size == 100
    assert (tmp_path / "empty").stat().st_size == 0
    # each output names itself: two outputs of one size never share a digest by accident
    assert (tmp_path / "sub/dir/small=a").read_bytes().startswith(b"bgrid stand-in output sub/")


def test_the_stand_in_counts_inputs_too_many_to_name(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("a", "b", "sub/c"):
        (tmp_path / name).write_text(name)
    assert run_standin(tmp_path, "--task=t3", "--in-count=3", "--out=o=5").returncode == 0
    (tmp_path / "sub/c").unlink()
    (tmp_path / "o").unlink()
    done = run_standin(tmp_path, "--task=t3", "--in-count=3", "--out=o=5")
    assert done.returncode == 1
    assert "3 inputs expected, 2 found" in done.stderr


def test_the_stand_in_fails_on_a_missing_input(tmp_path: Path) -> None:
    done = run_standin(tmp_path, "--task=t2", "--in=gone.dat", "--out=o=1")
    assert done.returncode == 1
    assert "missing input(s): gone.dat" in done.stderr
    assert not (tmp_path / "o").exists()


# --- instances wfcommons generates ---------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(RECIPE_TASKS))
def test_a_wfcommons_instance_keeps_every_file_and_dependency(tmp_path: Path, recipe: str) -> None:
    instance = generate(recipe, tmp_path / "wf.json")
    assert instance["schemaVersion"] == "1.6"
    wf = load_workflow(tmp_path / "wf.json")
    spec = instance["workflow"]["specification"]["tasks"]
    assert set(wf.tasks) == {task["id"] for task in spec} | {INPUTS_TASK}
    for task in spec:
        for parent in task["parents"]:
            assert wf.graph.has_edge(parent, task["id"])
    writer, readers = writers_and_readers(instance)
    for file_id, made_by in writer.items():
        assert wf.producer[file_id] == made_by
        for reader in readers.get(file_id, []):
            assert file_id in wf.graph.edges[made_by, reader]["files"]
    sizes = file_sizes(instance)
    runtimes = {t["id"]: t["runtimeInSeconds"] for t in instance["workflow"]["execution"]["tasks"]}
    for name, spec_task in wf.tasks.items():
        args = standin_args(spec_task.command)
        written = dict(out.rsplit("=", 1) for out in args["--out"]) if "--out" in args else {}
        assert {path: int(size) for path, size in written.items()} == {
            path: sizes[path] for path in spec_task.outputs
        }
        if name != INPUTS_TASK:
            assert float(args["--cpu-seconds"][0]) == pytest.approx(runtimes[name] * 0.001, 1e-4)
    # every file no task writes is made by bgrid's own first task, at its recorded size
    sources = set(readers) - set(writer)
    assert set(wf.tasks[INPUTS_TASK].outputs) == sources



# --- any DAG: the graph is the parents plus the file flow, in both layouts -------------------


@st.composite
def random_instances(draw: st.DrawFn) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Tasks in topological order: each reads files of earlier tasks (or source files) and
    names some earlier tasks as parents; every file has a size."""
    count = draw(st.integers(1, 12))
    tasks: list[dict[str, Any]] = []
    sizes: dict[str, int] = {}
    for index in range(count):
        earlier_files = [f for t in tasks for f in t["outputFiles"]]
        reads = draw(st.lists(st.sampled_from(earlier_files), unique=True)) if earlier_files else []
        sources = [f"src{n}" for n in draw(st.sets(st.integers(0, 3), max_size=2))]
        outputs = [f"t{index}/out{n}" for n in range(draw(st.integers(0, 3)))]
        parents = draw(st.sets(st.sampled_from([t["id"] for t in tasks]))) if tasks else set()
        for name in [*sources, *outputs]:
            sizes[name] = draw(st.integers(0, 10**9))
        tasks.append(
            {"id": f"task_{index}", "name": f"kind{index % 3}", "parents": sorted(parents),
             "inputFiles": [*reads, *sources], "outputFiles": outputs}
        )  # fmt: skip
    return tasks, sizes


_ONE_TMP_PATH = [HealthCheck.function_scoped_fixture]  # each example rewrites wf.json there


@settings(max_examples=60, deadline=None, suppress_health_check=_ONE_TMP_PATH)
@given(random_instances())
def test_any_instance_keeps_its_parents_and_file_flow_in_both_layouts(
    tmp_path: Path, drawn: tuple[list[dict[str, Any]], dict[str, int]]
) -> None:
    tasks, sizes = drawn
    new = {
        "name": "random",
        "schemaVersion": "1.6",
        "workflow": {
            "specification": {
                "tasks": tasks,
                "files": [{"id": f, "sizeInBytes": size} for f, size in sizes.items()],
            }
        },
    }
    old = {
        "name": "random",
        "schemaVersion": "1.4",
        "workflow": {
            "makespanInSeconds": 0,
            "executedAt": "2024-01-01T00:00:00Z",
            "tasks": [
                {"name": t["id"], "category": t["name"], "type": "compute", "parents": t["parents"],
                 "files": [*({"link": "input", "name": f, "sizeInBytes": sizes[f]}
                             for f in t["inputFiles"]),
                           *({"link": "output", "name": f, "sizeInBytes": sizes[f]}
                             for f in t["outputFiles"])]}
                for t in tasks
            ],
        },
    }  # fmt: skip
    writer = {f: t["id"] for t in tasks for f in t["outputFiles"]}
    expected = {(p, t["id"]) for t in tasks for p in t["parents"]}
    expected |= {(writer[f], t["id"]) for t in tasks for f in t["inputFiles"] if f in writer}
    sources = {f for t in tasks for f in t["inputFiles"]} - writer.keys()
    expected |= {(INPUTS_TASK, t["id"]) for t in tasks if set(t["inputFiles"]) & sources}
    loaded = [load(tmp_path, new), load(tmp_path, old)]
    assert shape(loaded[0]) == shape(loaded[1])
    wf = loaded[0]
    assert set(wf.graph.edges) == expected
    for t in tasks:
        outs = standin_args(wf.tasks[t["id"]].command).get("--out", [])
        assert outs == [f"{f}={sizes[f]}" for f in t["outputFiles"]]
    assert set(wf.final_outputs()) == set(writer) - {f for t in tasks for f in t["inputFiles"]}
