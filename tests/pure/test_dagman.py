"""DAGMan input: DAG commands and submit keys to the native mapping, and every refusal's place.

These tests check the mapping `dagman_mapping` builds (not its validation by the native
loader), so they hold whether or not the keys of the other issue-10 parts are merged.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bonjourgrid.backends.condor.template import _environment, _quote_argument
from bonjourgrid.dag.condor_submit import EXEC_COPY, parse_arguments, parse_environment
from bonjourgrid.dag.dagman import dagman_mapping
from bonjourgrid.dag.examples import examples_root
from bonjourgrid.dag.loader import load_workflow
from bonjourgrid.errors import DagError

SUB = "executable = run.sh\nqueue\n"


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "run.sh").write_text("#!/bin/sh\necho ran\n")
    return root / next(name for name in files if name.endswith(".dag"))


def tasks_of(root: Path, files: dict[str, str]) -> dict[str, Any]:
    mapping, found_root = dagman_mapping(write(root, files))
    assert found_root == root.resolve()
    tasks: dict[str, Any] = mapping["tasks"]
    return tasks


def refusal(root: Path, files: dict[str, str]) -> str:
    with pytest.raises(DagError) as caught:
        dagman_mapping(write(root, files))
    return str(caught.value)


# -- the shipped example ----------------------------------------------------------------------


def test_the_seeds_eight_job_dag_maps_to_eight_tasks_with_their_file_flow() -> None:
    workflow = load_workflow(examples_root() / "condor-j8" / "j8.dag")
    assert list(workflow.tasks) == [f"0{n}" for n in range(1, 9)]
    assert sorted(workflow.graph.predecessors("07")) == ["04", "05"]
    assert workflow.graph.edges["06", "08"]["files"] == ["j6.out"]
    assert workflow.final_outputs() == ["results/j8.out"]
    assert workflow.tasks["01"].require == "ram>=64"


def test_a_staged_executable_runs_from_a_copy_and_inputs_are_linked_by_basename(
    tmp_path: Path,
) -> None:
    """The command, run in a sandbox laid out as a worker lays it out (read-only copies)."""
    tasks = tasks_of(
        tmp_path / "dag",
        {
            "x.dag": "JOB A a.sub\n",
            "a.sub": "executable = bin/tool.sh\narguments = \"'two words' x\"\n"
            "initialdir = out\ntransfer_input_files = ../data/in.txt\n"
            "transfer_output_files = sub/result.txt\nqueue\n",
        },
    )
    task = tasks["A"]
    assert sorted(task["inputs"]) == ["bin/tool.sh", "data/in.txt"]
    assert task["outputs"] == ["out/result.txt"]
    sandbox = tmp_path / "sandbox"
    for path, text in {
        "bin/tool.sh": '#!/bin/sh\nmkdir -p sub\n{ cat in.txt; echo "$1|$2"; } > sub/result.txt\n',
        "data/in.txt": "input\n",
    }.items():
        (sandbox / path).parent.mkdir(parents=True, exist_ok=True)
        (sandbox / path).write_text(text)
        (sandbox / path).chmod(0o400)  # as a worker stages them: no exec bit
    subprocess.run(["/bin/sh", "-c", task["command"]], cwd=sandbox, check=True)
    assert (sandbox / "out/result.txt").read_text() == "input\ntwo words|x\n"
    assert stat.S_IMODE((sandbox / "bin/tool.sh").stat().st_mode) == 0o400  # never chmod-ed
    assert (sandbox / "out" / EXEC_COPY).is_file()


# -- DAG commands -----------------------------------------------------------------------------


def test_parent_child_is_many_to_many_and_keywords_take_any_case(tmp_path: Path) -> None:
    dag = "# a comment\n" + "".join(f"job {n} a.sub\n" for n in "ABCD") + "parent A B child C D\n"
    tasks = tasks_of(tmp_path, {"x.dag": dag, "a.sub": SUB})
    assert tasks["C"]["after"] == ["A", "B"] and tasks["D"]["after"] == ["A", "B"]
    assert "after" not in tasks["A"]


def test_a_trailing_backslash_continues_a_command(tmp_path: Path) -> None:
    dag = (
        "JOB A a.sub\nJOB B a.sub\nPARENT A \\\n# a comment inside\n   CHILD B\n"
        "RETRY B 1 UNLESS-EXIT 0\n"
    )
    tasks = tasks_of(tmp_path, {"x.dag": dag, "a.sub": SUB})
    assert tasks["B"]["after"] == ["A"]
    assert tasks["B"]["retries"] == 1 and "retry_unless_exit" not in tasks["B"]


def test_job_dir_is_the_submitting_directory(tmp_path: Path) -> None:
    tasks = tasks_of(
        tmp_path,
        {
            "x.dag": "JOB A a.sub DIR work\n",
            "work/a.sub": "executable = tool\ntransfer_input_files = in.txt\n"
            "output = a.out\ntransfer_output_files = r.txt\nqueue\n",
            "work/tool": "",
        },
    )
    assert tasks["A"]["inputs"] == ["work/in.txt", "work/tool"]
    assert tasks["A"]["outputs"] == ["work/r.txt"]
    assert tasks["A"]["stdout"] == "work/a.out"
    assert tasks["A"]["command"].startswith("mkdir -p -- work && cd -- work && ")


def test_noop_needs_no_submit_file_and_done_is_refused(tmp_path: Path) -> None:
    tasks = tasks_of(tmp_path, {"x.dag": "JOB A missing.sub NOOP\n"})
    assert tasks == {"A": {"noop": True}}
    assert "x.dag:2: JOB ... DONE:" in refusal(tmp_path, {"x.dag": "\nJOB A a.sub DONE\n"})


def test_vars_with_job_macro_escapes_and_all_nodes(tmp_path: Path) -> None:
    tasks = tasks_of(
        tmp_path,
        {
            "x.dag": 'JOB A a.sub\nJOB B a.sub\nVARS A word="$(JOB)-\\\\x" other="o"\n'
            'VARS ALL_NODES n="7"\n',
            "a.sub": "executable = run.sh\narguments = $(word) $(n)\n"
            "output = $(other).out\nqueue\n",
        },
    )
    assert tasks["A"]["command"].endswith("./condor_exec.exe 'A-\\x' 7")
    assert tasks["B"]["command"].endswith("./condor_exec.exe 7")
    assert tasks["A"]["stdout"] == "o.out" and tasks["B"]["stdout"] == ".out"


def test_a_vars_name_the_submit_file_does_not_read_is_refused(tmp_path: Path) -> None:
    files = {"x.dag": 'JOB A a.sub\n\nVARS A requirements="Memory > 1"\n', "a.sub": SUB}
    assert refusal(tmp_path, files).startswith("x.dag:3: VARS requirements: a.sub does not use")


def test_submit_files_see_dagmans_job_macro_but_not_per_run_ones(tmp_path: Path) -> None:
    sub = "executable = run.sh\noutput = $(JOB).out\nqueue\n"
    tasks = tasks_of(
        tmp_path, {"x.dag": "SPLICE S s.dag\n", "s.dag": "JOB A a.sub\n", "a.sub": sub}
    )
    assert tasks["S+A"]["stdout"] == "S+A.out"
    sub = "executable = run.sh\n\narguments = try-$(RETRY)\nqueue\n"
    assert refusal(tmp_path, {"x.dag": "JOB A a.sub\n", "a.sub": sub}).startswith(
        "a.sub:3: $(RETRY):"
    )


def test_vars_may_set_classad_attributes_and_the_last_value_wins(tmp_path: Path) -> None:
    dag = 'JOB A a.sub\nVARS A My.Project="\\"x\\""\nVARS A w="one"\nVARS ALL_NODES w="two"\n'
    sub = "executable = run.sh\narguments = $(w)\nqueue\n"
    tasks = tasks_of(tmp_path, {"x.dag": dag, "a.sub": sub})
    assert tasks["A"]["command"].endswith(" two")


def test_vars_prepend_lets_the_file_win_and_append_overrides_it(tmp_path: Path) -> None:
    sub = "executable = run.sh\nw = file\narguments = $(w)\nqueue\n"
    prepend = tasks_of(tmp_path, {"x.dag": 'JOB A a.sub\nVARS A w="dag"\n', "a.sub": sub})
    assert prepend["A"]["command"].endswith(" file")
    append = tasks_of(tmp_path, {"x.dag": 'JOB A a.sub\nVARS A APPEND w="dag"\n', "a.sub": sub})
    assert append["A"]["command"].endswith(" dag")


def test_retry_priority_category_maxjobs_pre_skip_abort(tmp_path: Path) -> None:
    mapping, _ = dagman_mapping(
        write(
            tmp_path,
            {
                "x.dag": "JOB A a.sub\nJOB B a.sub\nRETRY ALL_NODES 2\nRETRY B 3 UNLESS-EXIT 42\n"
                "PRIORITY A 10\nCATEGORY A heavy\nMAXJOBS heavy 1\nPRE_SKIP A 5\n"
                "ABORT-DAG-ON A 3 RETURN 9\nABORT-DAG-ON B 4\n",
                "a.sub": SUB,
            },
        )
    )
    a, b = mapping["tasks"]["A"], mapping["tasks"]["B"]
    assert (a["retries"], a["priority"], a["category"], a["pre_skip"]) == (2, 10, "heavy", 5)
    assert a["abort_on"] == {"exit": 3, "status": 9} and b["abort_on"] == {"exit": 4}
    assert (b["retries"], b["retry_unless_exit"]) == (3, 42)
    assert mapping["categories"] == {"heavy": {"max_running": 1}}


def test_maxjobs_of_a_category_no_node_is_in_loads_as_dagman_lets_it(tmp_path: Path) -> None:
    dag = write(
        tmp_path,
        {"x.dag": "JOB A a.sub\nCATEGORY A heavy\nMAXJOBS heavy 1\nMAXJOBS light 4\n",
         "a.sub": SUB},
    )  # fmt: skip
    workflow = load_workflow(dag)  # the native loader refuses a category no task is in
    assert workflow.categories == {"heavy": 1}


def test_scripts_map_dagman_macros_onto_the_bgrid_env(tmp_path: Path) -> None:
    tasks = tasks_of(
        tmp_path,
        {
            "x.dag": "JOB A a.sub DIR w\nRETRY A 2\nSCRIPT PRE A pre.sh $JOB\n"
            "SCRIPT post A post.sh $JOB.log $RETURN $RETRY $MAX_RETRIES $PRE_SCRIPT_RETURN\n",
            "w/a.sub": SUB.replace("run.sh", "../run.sh"),
        },
    )
    assert tasks["A"]["pre"] == "./pre.sh A"
    assert tasks["A"]["post"] == (
        './post.sh A.log "$BGRID_RETURN" "$BGRID_RETRY" 2 "$BGRID_PRE_RETURN"'
    )
    assert tasks["A"]["script_dir"] == "w"


def test_final_node(tmp_path: Path) -> None:
    tasks = tasks_of(
        tmp_path,
        {
            "x.dag": "JOB A a.sub\nFINAL F a.sub\nSCRIPT POST F c.sh $DAG_STATUS $FAILED_COUNT\n",
            "a.sub": SUB,
        },
    )
    assert tasks["F"]["final"] is True
    assert tasks["F"]["post"] == './c.sh "$BGRID_DAG_STATUS" "$BGRID_FAILED_COUNT"'
    files = {"x.dag": "JOB A a.sub\nFINAL F a.sub\nFINAL G a.sub\n", "a.sub": SUB}
    assert "x.dag:3: FINAL: a second FINAL node" in refusal(tmp_path, files)
    files = {"x.dag": "JOB A a.sub\nFINAL F a.sub\nPARENT A CHILD F\n", "a.sub": SUB}
    assert "x.dag:3: PARENT:" in refusal(tmp_path, files)


def test_include_reads_in_the_same_scope(tmp_path: Path) -> None:
    tasks = tasks_of(
        tmp_path,
        {
            "x.dag": "JOB A a.sub\nINCLUDE more/inc.dag\nPARENT A CHILD B\n",
            "more/inc.dag": "JOB B a.sub\n",
            "a.sub": SUB,
        },
    )
    assert tasks["B"]["after"] == ["A"]


def test_splice_nodes_are_prefixed_and_edges_reach_their_ends(tmp_path: Path) -> None:
    tasks = tasks_of(
        tmp_path,
        {
            "x.dag": "JOB A a.sub\nJOB Z a.sub\nSPLICE S s.dag\nPARENT A CHILD S\n"
            "PARENT S CHILD Z\n",
            "s.dag": "JOB P a.sub\nJOB Q a.sub\nPARENT P CHILD Q\nSPLICE T t.dag DIR t\n",
            "t/t.dag": "JOB R b.sub\n",
            "t/b.sub": "executable = tool\nqueue\n",
            "t/tool": "",
            "a.sub": SUB,
        },
    )
    assert set(tasks) == {"A", "Z", "S+P", "S+Q", "S+T+R"}
    assert tasks["S+P"]["after"] == ["A"] and tasks["S+T+R"]["after"] == ["A"]
    assert tasks["S+Q"]["after"] == ["S+P"]
    assert tasks["Z"]["after"] == ["S+Q", "S+T+R"]
    assert tasks["S+T+R"]["inputs"] == ["t/tool"]


def test_harmless_commands_are_accepted(tmp_path: Path) -> None:
    dag = "JOB A a.sub\nDOT d.dot\nNODE_STATUS_FILE s.txt\nJOBSTATE_LOG j.log\nSET_JOB_ATTR x=1\n"
    assert set(tasks_of(tmp_path, {"x.dag": dag, "a.sub": SUB})) == {"A"}


@pytest.mark.parametrize(
    ("line", "construct"),
    [
        ("CONFIG dagman.config", "CONFIG"),
        ("SUBDAG EXTERNAL B inner.dag", "SUBDAG"),
        ("SERVICE S s.sub", "SERVICE"),
        ("PROVISIONER P p.sub", "PROVISIONER"),
        ("ENV SET X=1", "ENV"),
        ("REJECT", "REJECT"),
        ("FROBNICATE A", "FROBNICATE"),
        ("DONE A", "DONE"),
        ("ABORT-DAG-ON A 1 RETURN 300", "ABORT-DAG-ON"),
        ("SCRIPT DEFER 1 10 PRE A pre.sh", "SCRIPT DEFER"),
        ("SCRIPT HOLD A h.sh", "SCRIPT HOLD"),
        ('VARS A x="$(RETRY)"', "VARS $(RETRY)"),
        ("RETRY A two", "RETRY"),
        ("RETRY Nope 2", "RETRY"),
        ("PARENT A CHILD Nope", "PARENT"),
        ("JOB A a.sub", "JOB"),
        ("RETRY F 2\nFINAL F a.sub", "RETRY"),
    ],
)
def test_each_refusal_names_file_line_and_construct(
    tmp_path: Path, line: str, construct: str
) -> None:
    message = refusal(tmp_path, {"x.dag": f"JOB A a.sub\n\n{line}\n", "a.sub": SUB})
    assert message.startswith(f"x.dag:3: {construct}:"), message


def test_an_unsupported_script_macro_is_refused(tmp_path: Path) -> None:
    files = {"x.dag": "JOB A a.sub\nSCRIPT POST A p.sh $JOBID\n", "a.sub": SUB}
    assert refusal(tmp_path, files).startswith("x.dag:2: SCRIPT $JOBID:")


# -- submit keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "argv"),
    [
        ("a b  c", ["a", "b", "c"]),
        ('say \\"hi\\"', ["say", '"hi"']),
        ("\"a 'b c' 'it''s' \"\"q\"\"\"", ["a", "b c", "it's", '"q"']),
        ('"one"', ["one"]),
        ("a\u00a0b\tc", ["a\u00a0b", "c"]),
        ("", []),
    ],
)
def test_arguments_in_both_syntaxes(value: str, argv: list[str]) -> None:
    assert parse_arguments(value) == argv


_ARGUMENT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0\n\r"), max_size=12
)


@given(st.lists(_ARGUMENT, max_size=5))
def test_arguments_read_back_what_the_condor_backend_writes(argv: list[str]) -> None:
    """The condor backend's quoting (checked there against HTCondor) read back here."""
    assert parse_arguments('"' + " ".join(_quote_argument(a) for a in argv) + '"') == argv


@given(st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True), _ARGUMENT))
def test_environment_reads_back_what_the_condor_backend_writes(env: dict[str, str]) -> None:
    assert parse_environment(_environment(env)) == env


def test_environment_in_both_syntaxes() -> None:
    assert parse_environment("A=1;B=x y") == {"A": "1", "B": "x y"}
    assert parse_environment("\"A=1 B='x y' C=''\"") == {"A": "1", "B": "x y", "C": ""}
    with pytest.raises(ValueError):
        parse_environment('"A"')


def test_submit_keys_to_task_keys(tmp_path: Path) -> None:
    sub = (
        "universe = Vanilla\nExecutable = /bin/echo\ntransfer_executable = false\n"
        'arguments = "\'hello world\' x"\nenvironment = "GREETING=hi"\ninput = in.txt\n'
        "output = o.txt\nerror = e.txt\nlog = l.log\nrequest_cpus = 2\nrequest_memory = 1G\n"
        "request_disk = 2097152\nshould_transfer_files = IF_NEEDED\nnotification = never\n"
        '+ProjectName = "x"\nmy.Other = 1\nwhen_to_transfer_output = ON_EXIT\nqueue\n'
    )
    task = tasks_of(tmp_path, {"x.dag": "JOB A a.sub\n", "a.sub": sub})["A"]
    assert task == {
        "command": "/bin/echo 'hello world' x < in.txt",
        "inputs": ["in.txt"],
        "env": {"GREETING": "hi"},
        "require": "cpus>=2 and ram>=1024 and disk>=2048",
        "stdout": "o.txt",
        "stderr": "e.txt",
    }


def test_a_url_input_stays_a_url(tmp_path: Path) -> None:
    sub = "executable = run.sh\ntransfer_input_files = https://example.org/d/data.csv\nqueue\n"
    task = tasks_of(tmp_path, {"x.dag": "JOB A a.sub\n", "a.sub": sub})["A"]
    assert {"url": "https://example.org/d/data.csv", "path": "data.csv"} in task["inputs"]


@pytest.mark.parametrize(
    ("lines", "line", "construct"),
    [
        ("requirements = Memory > 1\n", 2, "requirements"),
        ("getenv = true\n", 2, "getenv"),
        ("universe = docker\n", 2, "universe"),
        ("should_transfer_files = NO\n", 2, "should_transfer_files"),
        ("when_to_transfer_output = ON_EXIT_OR_EVICT\n", 2, "when_to_transfer_output"),
        ("request_memory = ifThenElse(1, 2, 3)\n", 2, "request_memory"),
        ('arguments = a "b\n', 2, "arguments"),
        ("transfer_input_files = data/\n", 2, "transfer_input_files"),
        ("transfer_input_files = ../../outside.txt\n", 2, "transfer_input_files"),
        ("include : other.sub\n", 2, "include"),
        ("initialdir = /elsewhere\n", 2, "initialdir"),
    ],
)
def test_each_submit_refusal_names_file_line_and_key(
    tmp_path: Path, lines: str, line: int, construct: str
) -> None:
    files = {"d/x.dag": "JOB A a.sub\n", "d/a.sub": f"executable = run.sh\n{lines}queue\n"}
    (tmp_path / "d").mkdir()
    (tmp_path / "d/run.sh").write_text("")
    assert refusal(tmp_path, files).startswith(f"a.sub:{line}: {construct}:")


def test_an_executable_outside_needs_transfer_executable_false(tmp_path: Path) -> None:
    files = {"x.dag": "JOB A a.sub\n", "a.sub": "executable = /bin/echo\nqueue\n"}
    assert "transfer_executable = false" in refusal(tmp_path, files)


def test_nothing_may_follow_the_queue_statement(tmp_path: Path) -> None:
    files = {"x.dag": "JOB A a.sub\n", "a.sub": SUB + "arguments = late\n"}
    assert refusal(tmp_path, files).startswith("a.sub:3: arguments:")
    files = {"x.dag": "JOB A a.sub\n", "a.sub": SUB + "queue\n"}
    assert refusal(tmp_path, files).startswith("a.sub:3: queue:")


# -- queue forms ------------------------------------------------------------------------------


def _procs(tmp_path: Path, queue: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    sub = f"executable = run.sh\narguments = $(Process) $(x)\n{queue}\n"
    dag = "JOB A a.sub\nJOB B b.sub\nJOB C b.sub\nPARENT B CHILD A\nPARENT A CHILD C\n"
    files = {"x.dag": dag, "a.sub": sub, "b.sub": SUB, **(extra or {})}
    return tasks_of(tmp_path, files)


def _argv(task: dict[str, Any]) -> str:
    return str(task["command"]).rsplit("condor_exec.exe", 1)[1].strip()


def test_queue_n_makes_n_tasks_with_the_nodes_edges(tmp_path: Path) -> None:
    tasks = _procs(tmp_path, "queue 3")
    assert [_argv(tasks[f"A.{n}"]) for n in range(3)] == ["0", "1", "2"]
    assert all(tasks[f"A.{n}"]["after"] == ["B"] for n in range(3))
    assert tasks["C"]["after"] == ["A.0", "A.1", "A.2"]


def test_queue_in_list_with_count(tmp_path: Path) -> None:
    tasks = _procs(tmp_path, "queue 2 x in (p, q)")
    assert [_argv(tasks[f"A.{n}"]) for n in range(4)] == ["0 p", "1 p", "2 q", "3 q"]
    tasks = _procs(tmp_path, "queue x in (from, matching)")
    assert [_argv(tasks[f"A.{n}"]) for n in range(2)] == ["0 from", "1 matching"]


def test_queue_from_a_file_and_from_inline_items(tmp_path: Path) -> None:
    tasks = _procs(tmp_path, "queue x from items.txt", {"items.txt": "u\nv\n"})
    assert [_argv(tasks[f"A.{n}"]) for n in range(2)] == ["0 u", "1 v"]
    tasks = _procs(tmp_path, "queue x from (\n  w\n  z\n)")
    assert [_argv(tasks[f"A.{n}"]) for n in range(2)] == ["0 w", "1 z"]


def test_queue_matching_gives_names_relative_to_the_submitting_directory(tmp_path: Path) -> None:
    tasks = _procs(tmp_path, "queue x matching *.dat", {"one.dat": "", "two.dat": ""})
    assert sorted(_argv(tasks[f"A.{n}"]) for n in range(2)) == ["0 one.dat", "1 two.dat"]


def test_queue_from_a_command_is_refused_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    files = {
        "x.dag": "JOB A a.sub\n",
        "a.sub": f"executable = run.sh\nqueue x from touch {marker} |\n",
    }
    assert refusal(tmp_path, files).startswith("a.sub:2: queue ... from command |:")
    assert not marker.exists()


def test_scripts_on_a_cluster_of_procs_are_refused(tmp_path: Path) -> None:
    files = {
        "x.dag": "JOB A a.sub\nSCRIPT POST A p.sh\n",
        "a.sub": "executable = run.sh\nqueue 2\n",
    }
    assert "x.dag:1: JOB A: its submit file queues 2 procs" in refusal(tmp_path, files)


def test_load_workflow_validates_a_dag(tmp_path: Path) -> None:
    files = {
        "x.dag": "JOB A a.sub\nJOB B b.sub\nPARENT A CHILD B\n",
        "a.sub": "executable = run.sh\ntransfer_output_files = mid.txt\nqueue\n",
        "b.sub": "executable = run.sh\ntransfer_input_files = mid.txt\n"
        "transfer_output_files = end.txt\nqueue\n",
    }
    workflow = load_workflow(write(tmp_path, files))
    assert workflow.name == "x" and workflow.final_outputs() == ["end.txt"]
    assert workflow.graph.edges["A", "B"]["files"] == ["mid.txt"]
    os.remove(tmp_path / "a.sub")
    with pytest.raises(DagError, match="cannot read the submit file"):
        load_workflow(tmp_path / "x.dag")
