"""The Python API without a grid: the workflow builder, the typed report, run()'s refusals."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import pytest

from bonjourgrid import ConfigError, DagError, JobFailed, Report, Workflow, run
from bonjourgrid.dag import load_workflow
from bonjourgrid.errors import BonjourGridError

EXAMPLES = Path(__file__).parents[2] / "bonjourgrid" / "examples"


def test_tasks_built_in_code_are_the_tasks_of_the_same_file(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "wf.yaml").write_text(
        "name: same\n"
        "grid: {workers: 2}\n"
        "tasks:\n"
        "  a: {command: 'cp in.txt a', inputs: [in.txt], outputs: [a], retries: 2}\n"
        "  b: {command: 'cp a b', inputs: [a], outputs: [b], env: {X: '1'}, keep: true}\n"
        "  c: {command: 'true', after: [b], limits: {wall_s: 5}, require: 'ram>=1GiB'}\n"
    )
    built = (
        Workflow("same", root=tmp_path, grid={"workers": 2})
        .task("a", "cp in.txt a", inputs=["in.txt"], outputs=["a"], retries=2)
        .task("b", "cp a b", inputs="a", outputs="b", env={"X": "1"}, keep=True)
        .task("c", "true", after=["b"], limits={"wall_s": 5}, require="ram>=1GiB")
    )
    from_code, from_file = built.validated(), load_workflow(tmp_path / "wf.yaml")
    assert (from_code.name, from_code.root, from_code.grid) == ("same", tmp_path, from_file.grid)
    assert from_code.tasks == from_file.tasks
    assert (
        sorted(from_code.graph.edges) == sorted(from_file.graph.edges) == [("a", "b"), ("b", "c")]
    )


def test_a_graph_s_nodes_are_tasks_and_its_edges_are_after() -> None:
    graph = nx.DiGraph(name="from-graph")
    graph.add_node("make", command="echo 1 > n", outputs=["n"])
    graph.add_node("use", command="cat n", inputs=["n"])
    graph.add_node("last", command="true", retries=3, after=["make"])
    graph.add_node("labelled", command="true", name="a label")  # a key a task does not have
    graph.add_edge("use", "last")
    with pytest.raises(DagError, match="unknown key 'name' in task 'labelled'"):
        Workflow.from_graph(graph, root="/nonexistent").validated()
    graph.remove_node("labelled")
    workflow = Workflow.from_graph(graph, root="/nonexistent").validated()
    assert workflow.name == "from-graph"
    assert list(workflow.tasks) == ["make", "use", "last"]
    assert workflow.tasks["last"].after == ("use", "make")  # edges first, then its own `after`
    assert workflow.tasks["last"].retries == 3
    assert sorted(workflow.graph.edges) == [("make", "last"), ("make", "use"), ("use", "last")]


def test_a_graph_with_a_cycle_or_a_number_for_a_name_is_refused() -> None:
    numbered = nx.DiGraph([(1, 2)])
    with pytest.raises(DagError, match=r"graph node 1 is not a task name.*relabel_nodes"):
        Workflow.from_graph(numbered)
    looped = nx.DiGraph([("a", "b"), ("b", "a")])
    nx.set_node_attributes(looped, "true", "command")
    with pytest.raises(DagError, match=r"2 tasks form a cycle: (a -> b -> a|b -> a -> b)"):
        Workflow.from_graph(looped, name="loop").validated()


def test_what_is_wrong_is_said_as_for_a_file_all_at_once() -> None:
    wf = Workflow("bad", root="/nonexistent")
    wf.task("a", "true", input=["x"])  # a typo of inputs: an unknown key
    wf.task("b", outputs=["o"], retries=-1)
    with pytest.raises(DagError) as err:
        wf.validated()
    text = str(err.value)
    assert text.startswith("workflow 'bad' has 3 problems")
    assert "unknown key 'input' in task 'a'; did you mean 'inputs'?" in text
    assert "task 'b' has no command" in text
    assert "retries -1 must be a whole number >= 0" in text
    with pytest.raises(DagError, match="task 'a' is defined twice"):
        wf.task("a", "true")


@pytest.mark.parametrize("name", ["hello.yaml", "wordcount/wordcount.yaml", "diamond.yaml"])
def test_a_loaded_file_validates_to_the_same_workflow(name: str) -> None:
    loaded = Workflow.load(EXAMPLES / name)
    assert loaded.root == (EXAMPLES / name).parent
    again, original = loaded.validated(), load_workflow(EXAMPLES / name)
    assert (again.name, again.grid, again.tasks) == (original.name, original.grid, original.tasks)


def test_the_digest_follows_the_content_not_the_object() -> None:
    def build(command: str) -> Workflow:
        return Workflow("d").task("t", command, outputs=["o"])

    assert build("echo 1 > o").digest() == build("echo 1 > o").digest()
    assert build("echo 1 > o").digest() != build("echo 2 > o").digest()


REPORT = {
    "job": "w-1a2b3c",
    "workflow": "w",
    "status": "failed",
    "reason": "1 task(s) failed (b)",
    "started_at": 1700000000.5,
    "makespan_s": 1.25,
    "tasks": {
        "a": {
            "status": "done",
            "peer": "p1",
            "start": 0.1,
            "end": 0.5,
            "attempts": 1,
            "exit_code": 0,
            "fetch_s": 0.0,
            "run_s": 0.4,
            "bytes_fetched": 10,
        },
        "b": {
            "status": "failed",
            "peer": "p2",
            "start": 0.5,
            "end": 1.25,
            "attempts": 2,
            "exit_code": 3,
            "fetch_s": 0.01,
            "run_s": 0.2,
            "bytes_fetched": 0,
            "error": "exit code 3",
            "stderr_tail": "boom\n",
            "history": [{"t": 0.9}],
        },
    },
    "edges": [["a", "b"]],
    "peers": [{"name": "p1", "cpus": 2, "ram": 2048, "cost": 0.0}],
    "bytes": {"from_coordinator": 10, "peer_to_peer": 0, "cache_hits": 0, "to_submitter": 4},
    "time": {"data_wait_s": 0.01, "compute_s": 0.6},
    "prefetch": "lookahead",
    "journal": "/tmp/x/.bgrid/w.journal",
}


def test_the_report_types_the_json_report_and_keeps_all_of_it(tmp_path: Path) -> None:
    report = Report.from_dict(REPORT)
    assert (report.succeeded, report.failed_tasks, report.makespan_s) == (False, ("b",), 1.25)
    b = report.tasks["b"]
    assert (b.peer, b.attempts, b.exit_code, b.error, b.stderr_tail) == (
        "p2", 2, 3, "exit code 3", "boom\n"
    )  # fmt: skip
    assert report.peers[0].ram == 2048 and report.bytes.to_submitter == 4
    assert report.edges == (("a", "b"),) and report.journal == Path("/tmp/x/.bgrid/w.journal")
    assert report.as_dict() == REPORT  # keys the types do not know ("time", "history") too
    report.as_dict()["tasks"].clear()
    assert report.as_dict() == REPORT  # a copy each time: the report stays as it was
    (tmp_path / "r.json").write_text(json.dumps(REPORT))
    assert Report.load(tmp_path / "r.json") == report


def test_a_file_that_is_no_report_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a bgrid report"):
        Report.from_dict({"job": "x"})
    (tmp_path / "r.json").write_text("[1]")
    with pytest.raises(ConfigError, match="is not a bgrid report"):
        Report.load(tmp_path / "r.json")


def test_job_failed_is_a_bonjourgrid_error_carrying_the_report() -> None:
    failed = JobFailed(Report.from_dict(REPORT))
    assert isinstance(failed, BonjourGridError) and failed.exit_code == 1
    assert str(failed) == "job w-1a2b3c failed: 1 task(s) failed (b)"
    assert failed.report.tasks["b"].exit_code == 3


def test_an_aborted_job_s_report_carries_the_abort_and_its_exit_status() -> None:
    aborted = {
        **REPORT,
        "status": "aborted",
        "exit_status": 7,
        "aborted": {"task": "b", "exit_code": 3, "exit_status": 7},
    }
    report = Report.from_dict(aborted)
    assert (report.succeeded, report.exit_status) == (False, 7)
    assert report.aborted == {"task": "b", "exit_code": 3, "exit_status": 7}
    assert JobFailed(report).exit_code == 7  # as `bgrid submit` exits
    assert Report.from_dict(REPORT).exit_status == 1  # a report without one: by its status


async def test_run_inside_an_event_loop_is_refused_with_what_to_do_instead() -> None:
    with pytest.raises(ConfigError, match=r"inside a running event loop.*asyncio.to_thread"):
        run(Workflow("w").task("t", "true"), local=1)


def test_run_says_what_it_takes_when_given_something_else() -> None:
    with pytest.raises(DagError, match=r"takes a Workflow, a networkx.DiGraph or .* not 'int'"):
        run(42, local=1)  # type: ignore[arg-type]
