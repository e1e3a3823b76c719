"""The job journal: written line by line, read back whole or torn, and judged for --resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bonjourgrid.cache.store import FileRef, hash_file
from bonjourgrid.coordinator.journal import (
    DoneRecord,
    JournalWriter,
    journal_path,
    plan_resume,
    read_journal,
    task_digest,
    workflow_digest,
)
from bonjourgrid.dag import Workflow, load_workflow
from bonjourgrid.errors import ConfigError

CHAIN = """
name: chain
tasks:
  a: {command: "cat in.txt > a.txt", inputs: [in.txt], outputs: [a.txt]}
  b: {command: "cat a.txt a.txt > b.txt", inputs: [a.txt], outputs: [b.txt]}
  c: {command: "cat b.txt > c.txt", inputs: [b.txt], outputs: [c.txt]}
  side: {command: "echo side > side.txt", outputs: [side.txt]}
"""


def make(root: Path, text: str = CHAIN) -> tuple[Workflow, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "in.txt").write_text("input\n")
    path = root / "wf.yaml"
    path.write_text(text)
    return load_workflow(path), path


def run_task(wf: Workflow, name: str, content: str) -> DoneRecord:
    """Write a task's outputs into the submit directory as the coordinator would, and its record."""
    spec = wf.tasks[name]
    outputs = []
    for path in spec.outputs:
        (wf.root / path).write_text(content)
        outputs.append((path, hash_file(wf.root / path)))
    inputs = tuple((p, hash_file(wf.root / p)) for p in spec.inputs)
    return DoneRecord(name, task_digest(spec), inputs, tuple(outputs), "peer-1", 1)


def start(wf: Workflow, wf_file: Path, carried: tuple[DoneRecord, ...] = ()) -> JournalWriter:
    return JournalWriter.start(
        journal_path(wf),
        job="chain-abc123",
        workflow=wf.name,
        digest=workflow_digest(wf_file),
        started=1_700_000_000.5,
        lease_s=10.0,
        carried=carried,
    )


def test_a_journal_reads_back_what_was_written(tmp_path: Path) -> None:
    wf, wf_file = make(tmp_path / "sub")
    journal = start(wf, wf_file)
    a = run_task(wf, "a", "input\n")
    journal.done(a)
    journal.failed("side", "exit code 3", 2)
    journal.end("failed", "1 task(s) failed (side)")
    journal.close()
    assert journal.path == tmp_path / "sub" / ".bgrid" / "chain.journal"
    state = read_journal(journal.path)
    assert (state.job, state.workflow, state.lease_s) == ("chain-abc123", "chain", 10.0)
    assert state.workflow_digest == workflow_digest(wf_file)
    assert state.done == {"a": a}
    assert state.failed == {"side": "exit code 3"}
    assert state.end == ("failed", "1 task(s) failed (side)")
    assert state.skipped == 0
    # One JSON object per line, flushed as it happened.
    lines = journal.path.read_text().splitlines()
    assert [json.loads(line)["t"] for line in lines] == ["job", "done", "failed", "end"]


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    wf, wf_file = make(tmp_path / "sub")
    journal = start(wf, wf_file)
    journal.done(run_task(wf, "a", "input\n"))
    journal.close()
    b = run_task(wf, "b", "input\ninput\n")
    whole = json.dumps({"t": "done", "task": "b", "spec": b.spec, "inputs": [], "outputs": []})
    with open(journal.path, "a") as f:
        f.write(whole[: len(whole) // 2])  # kill -9 in the middle of a write
    state = read_journal(journal.path)
    assert set(state.done) == {"a"} and state.skipped == 1


def test_damaged_lines_are_skipped_and_a_file_without_a_job_line_is_refused(
    tmp_path: Path,
) -> None:
    wf, wf_file = make(tmp_path / "sub")
    journal = start(wf, wf_file)
    journal.close()
    with open(journal.path, "a") as f:
        f.write('{"t": "done", "task": "a", "spec": "x", "inputs": [["a", "nothex", 1]]}\n')
        f.write("not json at all\n")
        f.write('{"t": "mystery"}\n')
    state = read_journal(journal.path)
    assert state.done == {} and state.skipped == 3
    journal.path.write_text('{"t": "done", "task": "a"}\n')
    with pytest.raises(ConfigError, match="not a bgrid journal"):
        read_journal(journal.path)


def test_a_new_journal_keeps_the_previous_one_aside(tmp_path: Path) -> None:
    wf, wf_file = make(tmp_path / "sub")
    first = start(wf, wf_file)
    first.done(run_task(wf, "side", "side\n"))
    first.close()
    start(wf, wf_file).close()
    previous = journal_path(wf).with_name("chain.journal.1")
    assert set(read_journal(previous).done) == {"side"}
    assert read_journal(journal_path(wf)).done == {}


def test_resume_keeps_intact_tasks_and_everything_after_a_changed_one_runs(
    tmp_path: Path,
) -> None:
    wf, wf_file = make(tmp_path / "sub")
    journal = start(wf, wf_file)
    for name, content in (("a", "input\n"), ("b", "input\ninput\n"), ("side", "side\n")):
        journal.done(run_task(wf, name, content))
    journal.close()
    plan = plan_resume(wf, wf_file)
    assert set(plan.kept) == {"a", "b", "side"} and plan.rerun == {}
    assert not plan.workflow_changed
    assert plan.source_refs == {"in.txt": hash_file(wf.root / "in.txt")}

    (wf.root / "a.txt").write_text("corrupted\n")  # same name, other bytes
    plan = plan_resume(wf, wf_file)
    assert set(plan.kept) == {"side"}
    assert plan.rerun == {
        "a": "its output a.txt changed since it ran (digest)",
        "b": "it comes after a, which runs again",
    }


def test_resume_reruns_a_task_whose_output_is_gone_or_whose_input_changed(
    tmp_path: Path,
) -> None:
    wf, wf_file = make(tmp_path / "sub")
    journal = start(wf, wf_file)
    journal.done(run_task(wf, "a", "input\n"))
    journal.done(run_task(wf, "side", "side\n"))
    journal.close()
    (wf.root / "side.txt").unlink()
    (wf.root / "in.txt").write_text("new input\n")
    plan = plan_resume(wf, wf_file)
    assert plan.kept == {}
    assert plan.rerun == {
        "a": "its input in.txt changed since it ran",
        "side": "its output side.txt is missing",
    }


def test_an_edited_workflow_reruns_only_the_edited_task_and_what_follows(
    tmp_path: Path,
) -> None:
    wf, wf_file = make(tmp_path / "sub")
    journal = start(wf, wf_file)
    for name, content in (("a", "input\n"), ("b", "input\ninput\n"), ("side", "side\n")):
        journal.done(run_task(wf, name, content))
    journal.close()
    wf_file.write_text(CHAIN.replace("cat a.txt a.txt > b.txt", "cat a.txt > b.txt"))
    wf = load_workflow(wf_file)
    plan = plan_resume(wf, wf_file)
    assert plan.workflow_changed
    assert set(plan.kept) == {"a", "side"}
    assert plan.rerun == {"b": "its command, files or environment changed since it ran"}


def test_resume_without_a_journal_says_to_run_without_it(tmp_path: Path) -> None:
    wf, wf_file = make(tmp_path / "sub")
    with pytest.raises(ConfigError, match="without --resume") as err:
        plan_resume(wf, wf_file)
    assert err.value.exit_code == 2


def test_a_resumed_journal_carries_the_kept_tasks(tmp_path: Path) -> None:
    wf, wf_file = make(tmp_path / "sub")
    a = run_task(wf, "a", "input\n")
    start(wf, wf_file, carried=(a,)).close()
    assert read_journal(journal_path(wf)).done == {"a": a}


def test_task_digests_see_command_files_and_environment_only(tmp_path: Path) -> None:
    wf, _ = make(tmp_path / "one")
    other, _ = make(
        tmp_path / "two",
        CHAIN.replace("outputs: [a.txt]}", "outputs: [a.txt], retries: 3}"),
    )
    assert task_digest(wf.tasks["a"]) == task_digest(other.tasks["a"])  # retries: no matter
    env, _ = make(
        tmp_path / "three", CHAIN.replace("outputs: [a.txt]}", "outputs: [a.txt], env: {X: y}}")
    )
    assert task_digest(wf.tasks["a"]) != task_digest(env.tasks["a"])


def test_resume_keeps_a_task_whose_intermediate_outputs_stayed_on_peers(tmp_path: Path) -> None:
    wf, wf_file = make(tmp_path / "sub")
    journal = start(wf, wf_file)
    for name, content in (("a", "input\n"), ("b", "input\ninput\n"), ("c", "input\ninput\n")):
        journal.done(run_task(wf, name, content))
    journal.close()
    # a.txt and b.txt are read by b and c: they never reach the submit directory.
    (wf.root / "a.txt").unlink()
    (wf.root / "b.txt").unlink()
    plan = plan_resume(wf, wf_file)
    assert set(plan.kept) == {"a", "b", "c"} and plan.rerun == {}
    assert plan.source_refs == {"in.txt": hash_file(wf.root / "in.txt")}


def test_resume_reruns_a_task_whose_intermediate_is_there_but_other_bytes(
    tmp_path: Path,
) -> None:
    wf, wf_file = make(tmp_path / "sub")
    journal = start(wf, wf_file)
    for name, content in (("a", "input\n"), ("b", "input\ninput\n"), ("c", "input\ninput\n")):
        journal.done(run_task(wf, name, content))
    journal.close()
    (wf.root / "a.txt").unlink()  # on a peer: fine
    (wf.root / "b.txt").write_text("someone edited it\n")  # here, and not what b made
    plan = plan_resume(wf, wf_file)
    assert set(plan.kept) == {"a"}
    assert plan.rerun == {
        "b": "its output b.txt changed since it ran (digest)",
        "c": "it comes after b, which runs again",
    }


def test_resume_reruns_a_task_whose_final_output_is_missing(tmp_path: Path) -> None:
    wf, wf_file = make(tmp_path / "sub")
    journal = start(wf, wf_file)
    for name, content in (("a", "input\n"), ("b", "input\ninput\n"), ("c", "input\ninput\n")):
        journal.done(run_task(wf, name, content))
    journal.close()
    for intermediate in ("a.txt", "b.txt"):
        (wf.root / intermediate).unlink()
    (wf.root / "c.txt").unlink()  # read by no task: it had to be here
    plan = plan_resume(wf, wf_file)
    assert set(plan.kept) == {"a", "b"}
    assert plan.rerun == {"c": "its output c.txt is missing"}


URL_FLOW = """
name: fetch
tasks:
  u: {command: "wc -c ref.fa > u.txt", inputs: ["https://example.org/data/ref.fa"],
      outputs: [u.txt]}
  v: {command: "cat u.txt > v.txt", inputs: [u.txt], outputs: [v.txt]}
"""


def ref_of(data: bytes) -> FileRef:
    return FileRef(hashlib.sha256(data).hexdigest(), len(data))


def url_journal(tmp_path: Path, staged: bytes) -> tuple[Workflow, Path]:
    """A fetch workflow whose u read `staged` from its URL and whose v ran after it."""
    wf, wf_file = make(tmp_path / "sub", URL_FLOW)
    assert wf.urls == {"ref.fa": "https://example.org/data/ref.fa"}
    # A file of that name in the submit directory is not the URL's content, even when it
    # holds the bytes u read.
    (wf.root / "ref.fa").write_bytes(staged)
    u = run_task(wf, "u", "5 ref.fa\n")
    assert u.inputs == (("ref.fa", ref_of(staged)),)
    journal = start(wf, wf_file)
    journal.done(u)
    journal.done(run_task(wf, "v", "5 ref.fa\n"))
    journal.close()
    return wf, wf_file


def test_resume_without_url_refs_reruns_a_task_reading_a_url(tmp_path: Path) -> None:
    wf, wf_file = url_journal(tmp_path, b"ACGT\n")
    plan = plan_resume(wf, wf_file)
    assert plan.kept == {}
    assert plan.rerun == {
        "u": "its input ref.fa changed since it ran",
        "v": "it comes after u, which runs again",
    }
    plan = plan_resume(wf, wf_file, url_refs={"other.fa": ref_of(b"ACGT\n")})
    assert set(plan.rerun) == {"u", "v"}


def test_resume_keeps_a_url_task_whose_staged_content_is_the_recorded_one(
    tmp_path: Path,
) -> None:
    wf, wf_file = url_journal(tmp_path, b"ACGT\n")
    plan = plan_resume(wf, wf_file, url_refs={"ref.fa": ref_of(b"ACGT\n")})
    assert set(plan.kept) == {"u", "v"} and plan.rerun == {}
    assert plan.source_refs == {"ref.fa": ref_of(b"ACGT\n")}


def test_resume_reruns_a_url_task_whose_content_changed_even_if_the_local_file_did_not(
    tmp_path: Path,
) -> None:
    wf, wf_file = url_journal(tmp_path, b"ACGT\n")
    plan = plan_resume(wf, wf_file, url_refs={"ref.fa": ref_of(b"ACGTT\n")})
    assert plan.kept == {}
    assert plan.rerun == {
        "u": "its input ref.fa changed since it ran",
        "v": "it comes after u, which runs again",
    }


LOCAL = """
name: local
tasks:
  a: {command: "echo a > mid", outputs: [mid]}
  b: {command: "cat mid > b.txt", inputs: [mid], outputs: [b.txt]}
  c: {command: "cat b.txt > c.txt", inputs: [b.txt], outputs: [c.txt]}
  p: {command: "echo p > pmid", outputs: [pmid]}
  q: {command: "cat pmid > q.txt", inputs: [pmid], outputs: [q.txt]}
"""


def intermediate(wf: Workflow, name: str, content: str, peer: str) -> DoneRecord:
    """A task whose outputs stayed in the cache of `peer` (nothing in the submit directory)."""
    outputs = tuple(
        (p, FileRef(hashlib.sha256(content.encode()).hexdigest(), len(content)))
        for p in wf.tasks[name].outputs
    )
    return DoneRecord(name, task_digest(wf.tasks[name]), (), outputs, peer, 1)


@pytest.mark.parametrize("earlier_local", [True, False])
def test_a_local_grid_keeps_no_intermediate_that_a_task_running_again_needs(
    tmp_path: Path, earlier_local: bool
) -> None:
    wf, wf_file = make(tmp_path / "sub", LOCAL)
    journal = JournalWriter.start(
        journal_path(wf),
        job="local-abc123",
        workflow=wf.name,
        digest=workflow_digest(wf_file),
        started=1_700_000_000.5,
        lease_s=10.0,
        local=earlier_local,
    )
    journal.done(intermediate(wf, "a", "a\n", "local-ab12-1"))  # b, its reader, never ran
    p = intermediate(wf, "p", "p\n", "local-ab12-2")
    journal.done(p)
    (wf.root / "q.txt").write_text("p\n")  # q ran: pmid is needed by nobody any more
    q_out = (("q.txt", hash_file(wf.root / "q.txt")),)
    journal.done(DoneRecord("q", task_digest(wf.tasks["q"]), p.outputs, q_out, "local-ab12-2"))
    journal.close()
    assert read_journal(journal.path).local is earlier_local
    # On the same grid, the peers' caches may still hold mid: a is kept (the core makes it
    # again if none does). On a new local grid they cannot.
    assert set(plan_resume(wf, wf_file).kept) == ({"p", "q"} if earlier_local else {"a", "p", "q"})
    plan = plan_resume(wf, wf_file, local=True)
    assert set(plan.kept) == {"p", "q"}  # pmid is gone too, but no task that runs needs it
    gone = (
        "a worker of the earlier run's local grid, gone with it"
        if earlier_local
        else "which this run's local grid does not include"
    )
    assert plan.rerun == {
        "a": f"its output mid, which b needs, was only in the cache of local-ab12-1, {gone}"
    }
