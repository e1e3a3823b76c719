"""The core's rules for pre and post scripts (DAGMan SCRIPT PRE/POST, PRE_SKIP): when they
run, what their exit status decides, and how retries run them again."""

from __future__ import annotations

from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.core import SchedulerCore, TaskStatus
from bonjourgrid.coordinator.progress import notes_of
from bonjourgrid.coordinator.report import attempt_history

REF = FileRef("0" * 64, 1)
MADE = FileRef("1" * 64, 2)


def sched(
    tasks: list[tuple[str, list[str]]], retries: int = 0, **data: core.TaskData
) -> SchedulerCore:
    return SchedulerCore(((n, d, "", retries) for n, d in tasks), data=data, backoff_base_s=0.0)


def of(out: list[core.Instruction], kind: type) -> list[object]:
    return [i for i in out if isinstance(i, kind)]


def step(s: SchedulerCore, event: core.Event, now: float = 1.0) -> list[core.Instruction]:
    out = s.handle(event, now)
    s.validate_state()
    return out


def report(s: SchedulerCore, task: str, code: int) -> list[core.Instruction]:
    t = s.tasks[task]
    assert t.peer is not None
    outputs = (("f", REF),) if code == 0 else ()
    return step(s, core.TaskReported(t.peer, task, t.attempts, code, "", outputs))


def test_a_task_is_placed_only_once_its_pre_script_exited_0() -> None:
    s = sched([("a", [])], a=core.TaskData(pre=True))
    out = step(s, core.PeerJoined("p1", 1, {}))
    assert of(out, core.RunScript) == [core.RunScript("a", "pre", 1, 0, -1, -1)]
    assert not of(out, core.Dispatch)
    assert s.tasks["a"].status is TaskStatus.WAITING
    out = step(s, core.ScriptEnded("a", "pre", 1, 0))
    assert of(out, core.Dispatch) == [core.Dispatch("a", "p1", 1)]
    assert s.tasks["a"].pre_return == 0


def test_a_failing_pre_is_a_failed_attempt_and_each_retry_runs_it_again() -> None:
    s = sched([("a", []), ("b", ["a"])], retries=1, a=core.TaskData(pre=True))
    step(s, core.PeerJoined("p1", 1, {}))
    out = step(s, core.ScriptEnded("a", "pre", 1, 3))
    # the second attempt's pre, at once (no backoff), knowing one attempt failed
    assert of(out, core.RunScript) == [core.RunScript("a", "pre", 2, 1, -1, -1)]
    assert not of(out, core.Dispatch)
    out = step(s, core.ScriptEnded("a", "pre", 2, 3))
    assert of(out, core.TaskFailed) == [core.TaskFailed("a", "pre script exited 3", 2)]
    assert s.tasks["b"].status is TaskStatus.SKIPPED
    assert s.finished is not None and s.finished.status == "failed"


def test_pre_skip_makes_the_task_done_without_running_it() -> None:
    s = sched([("a", []), ("b", ["a"])], a=core.TaskData(outputs=("x",), pre=True, pre_skip=7))
    step(s, core.PeerJoined("p1", 1, {}))
    out = step(s, core.ScriptEnded("a", "pre", 1, 7, outputs=(("x", MADE),)))
    assert of(out, core.TaskDone) == [core.TaskDone("a", None, 0, (("x", MADE),))]
    assert of(out, core.Dispatch) == [core.Dispatch("b", "p1", 1)]  # its reader goes on
    assert s.files.ref("x") == MADE


def test_pre_skip_with_an_output_missing_is_a_failed_attempt() -> None:
    s = sched([("a", [])], a=core.TaskData(outputs=("x",), pre=True, pre_skip=7))
    step(s, core.PeerJoined("p1", 1, {}))
    out = step(s, core.ScriptEnded("a", "pre", 1, 7, error="declared output x is missing"))
    assert of(out, core.TaskFailed) == [core.TaskFailed("a", "declared output x is missing", 1)]


def test_the_inputs_a_pre_wrote_are_learnt_before_the_task_is_placed() -> None:
    s = sched([("a", [])], a=core.TaskData(inputs=("in",), pre=True))
    step(s, core.PeerJoined("p1", 1, {}))
    out = step(s, core.ScriptEnded("a", "pre", 1, 0, sources={"in": MADE}))
    assert s.files.ref("in") == MADE
    assert of(out, core.Dispatch) == [core.Dispatch("a", "p1", 1)]


def test_a_post_exiting_0_turns_a_failed_command_into_a_success() -> None:
    s = sched([("a", [])], a=core.TaskData(post=True))
    step(s, core.PeerJoined("p1", 1, {}))
    out = report(s, "a", 5)
    assert of(out, core.RunScript) == [core.RunScript("a", "post", 1, 0, 5, -1)]
    assert s.tasks["a"].status is TaskStatus.WAITING and not s.peers["p1"].running
    out = step(s, core.ScriptEnded("a", "post", 1, 0, outputs=()))
    assert of(out, core.TaskDone) == [core.TaskDone("a", "p1", 1, ())]
    assert s.finished is not None and s.finished.status == "succeeded"
    assert s.tasks["a"].post_return == 0 and s.tasks["a"].exit_code == 5


def test_a_post_runs_once_the_outputs_are_collected_and_its_failure_is_retried() -> None:
    s = sched([("a", [])], retries=1, a=core.TaskData(outputs=("f",), collect=False, post=True))
    step(s, core.PeerJoined("p1", 1, {}))
    out = report(s, "a", 0)
    # collected even as an intermediate: the post reads the outputs in the submit directory
    assert of(out, core.Collect) and not of(out, core.RunScript)
    out = step(s, core.OutputsCollected("a", 1))
    assert of(out, core.RunScript) == [core.RunScript("a", "post", 1, 0, 0, -1)]
    out = step(s, core.ScriptEnded("a", "post", 1, 2))
    assert of(out, core.Dispatch) == [core.Dispatch("a", "p1", 2)]
    assert s.tasks["a"].error == "post script exited 2"


def test_a_post_decides_an_attempt_that_never_ran_with_return_minus_1() -> None:
    s = sched([("a", [])], a=core.TaskData(pre=True, post=True))
    step(s, core.PeerJoined("p1", 1, {}))
    step(s, core.ScriptEnded("a", "pre", 1, 0))
    out = step(s, core.AttemptFailed("p1", "a", 1, "refused: busy"))
    assert of(out, core.RunScript) == [core.RunScript("a", "post", 1, 0, -1, 0)]
    out = step(s, core.ScriptEnded("a", "post", 1, 1))
    assert of(out, core.TaskFailed) == [
        core.TaskFailed("a", "post script exited 1; the command: refused: busy", 1)
    ]


def test_a_retry_after_a_failing_post_runs_the_pre_again() -> None:
    s = sched([("a", [])], retries=1, a=core.TaskData(pre=True, post=True))
    step(s, core.PeerJoined("p1", 1, {}))
    step(s, core.ScriptEnded("a", "pre", 1, 0))
    report(s, "a", 1)
    out = step(s, core.ScriptEnded("a", "post", 1, 1))
    assert of(out, core.RunScript) == [core.RunScript("a", "pre", 2, 1, -1, -1)]
    assert not of(out, core.Dispatch)


def test_news_of_a_script_that_is_not_running_is_ignored() -> None:
    s = sched([("a", [])], a=core.TaskData(pre=True))
    step(s, core.PeerJoined("p1", 1, {}))
    assert step(s, core.ScriptEnded("a", "pre", 2, 0)) == []  # not the attempt it runs for
    assert step(s, core.ScriptEnded("a", "post", 1, 0)) == []  # no post runs
    assert s.tasks["a"].script == "pre"


def test_a_job_cancelled_while_a_script_runs_ends() -> None:
    s = sched([("a", [])], a=core.TaskData(pre=True))
    step(s, core.PeerJoined("p1", 1, {}))
    out = step(s, core.CancelRequested("cancelled by the user"))
    assert of(out, core.Finished) == [core.Finished("failed", "cancelled by the user")]
    assert step(s, core.ScriptEnded("a", "pre", 1, 0)) == []


def test_a_lost_peer_runs_the_pre_again_before_the_next_placement() -> None:
    s = sched([("a", [])], a=core.TaskData(pre=True))
    step(s, core.PeerJoined("p1", 1, {}))
    step(s, core.ScriptEnded("a", "pre", 1, 0))
    out = step(s, core.PeerLost("p1", "silent"))
    assert of(out, core.RunScript) == [core.RunScript("a", "pre", 2, 0, -1, -1)]
    assert s.tasks["a"].failures == 0  # a lost peer uses no retry


def test_the_progress_lines_say_a_script_failed_an_attempt_and_not_before_the_post() -> None:
    s = sched([("a", [])], retries=1, a=core.TaskData(pre=True, post=True))
    step(s, core.PeerJoined("p1", 1, {}))
    event = core.ScriptEnded("a", "pre", 1, 3)
    assert [n.text() for n in notes_of(event, step(s, event), s.tasks)] == [
        "task a retry: pre script exited 3"
    ]
    step(s, core.ScriptEnded("a", "pre", 2, 0))
    event = core.TaskReported("p1", "a", 2, 1, "", ())
    assert notes_of(event, step(s, event), s.tasks) == []  # its post decides
    event = core.ScriptEnded("a", "post", 2, 0)
    assert [n.text() for n in notes_of(event, step(s, event), s.tasks)] == [
        "task a done on p1",
        "peer p1 released",
    ]


def test_the_report_s_history_holds_the_post_s_verdicts_not_the_commands_it_overruled() -> None:
    s = sched([("a", [])], retries=1, a=core.TaskData(pre=True, post=True))
    step(s, core.PeerJoined("p1", 1, {}))
    step(s, core.ScriptEnded("a", "pre", 1, 0))
    report(s, "a", 3)
    step(s, core.ScriptEnded("a", "post", 1, 4))  # attempt 1 failed: the post said so
    step(s, core.ScriptEnded("a", "pre", 2, 0))
    report(s, "a", 3)
    step(s, core.ScriptEnded("a", "post", 2, 0))  # attempt 2: the post overruled exit 3
    (entry,) = attempt_history(s.story("a"))
    assert entry["attempt"] == 1 and entry["what"].startswith("post script exited 4")
    assert s.tasks["a"].status is TaskStatus.DONE


def test_a_post_after_a_good_run_is_not_told_an_earlier_attempt_s_failure() -> None:
    s = sched([("a", [])], retries=1, a=core.TaskData(post=True))
    step(s, core.PeerJoined("p1", 1, {}))
    report(s, "a", 3)
    step(s, core.ScriptEnded("a", "post", 1, 1))
    step(s, core.Tick(), now=5.0)  # the backoff is over: attempt 2
    report(s, "a", 0)
    step(s, core.OutputsCollected("a", 2))
    step(s, core.ScriptEnded("a", "post", 2, 0, outputs=(("f", REF),)))
    assert s.tasks["a"].status is TaskStatus.DONE and s.tasks["a"].error == ""
    assert s.story("a")[-1][1] == "waiting -> done: post script exited 0"
