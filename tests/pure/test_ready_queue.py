"""The ready queue on its own: class heaps, affine heaps, backoffs, lazy deletion."""

from __future__ import annotations

from collections.abc import Mapping

from bonjourgrid.coordinator.model import PeerSlots, TaskState, TaskStatus
from bonjourgrid.coordinator.ready import ReadyQueue


def ready_tasks(*specs: tuple[str, str, int]) -> dict[str, TaskState]:
    """(name, require, priority) of READY tasks."""
    return {
        name: TaskState(name, require, 0, priority, 0, status=TaskStatus.READY)
        for name, require, priority in specs
    }


def gpu_only(require: str, attrs: Mapping[str, str]) -> bool:
    return attrs.get("gpu") == "yes"


def queued(queue: ReadyQueue, *tasks: TaskState) -> None:
    for task in tasks:
        queue.push(task, queue.stamp(task))


def test_the_longest_chain_goes_first_then_the_oldest() -> None:
    tasks = ready_tasks(("a", "", 1), ("b", "", 3), ("c", "", 3))
    queue = ReadyQueue(tasks, gpu_only)
    queued(queue, tasks["a"], tasks["b"], tasks["c"])
    peer = PeerSlots("p", 1, {})
    assert [queue.pop_best(peer).name for _ in range(3)] == ["b", "c", "a"]  # type: ignore[union-attr]
    assert queue.pop_best(peer) is None


def test_a_peer_only_gets_classes_it_can_run_and_is_asked_once_per_class() -> None:
    asked: list[str] = []

    def matches(require: str, attrs: Mapping[str, str]) -> bool:
        asked.append(require)
        return gpu_only(require, attrs)

    tasks = ready_tasks(("g1", "gpu", 5), ("g2", "gpu", 5), ("plain", "", 1))
    queue = ReadyQueue(tasks, matches)
    queued(queue, *tasks.values())
    cpu = PeerSlots("cpu", 1, {})
    assert queue.pop_best(cpu) is tasks["plain"]
    assert queue.pop_best(cpu) is None
    assert queue.unplaceable([cpu]) == ["g1", "g2"]
    assert asked == ["gpu"]  # remembered per (peer, class)
    assert queue.pop_best(PeerSlots("gpu", 1, {"gpu": "yes"})) is tasks["g1"]


def test_stale_entries_are_dropped_when_popped() -> None:
    tasks = ready_tasks(("a", "", 2), ("b", "", 1))
    queue = ReadyQueue(tasks, gpu_only)
    queued(queue, tasks["a"], tasks["b"])
    queued(queue, tasks["a"])  # queued again: its first entry is stale
    tasks["b"].status = TaskStatus.SKIPPED
    peer = PeerSlots("p", 1, {})
    assert queue.pop_best(peer) is tasks["a"]
    assert queue.pop_best(peer) is None  # a's old entry and skipped b: both dropped


def test_affine_tasks_wait_for_their_peer_and_gated_ones_for_their_file() -> None:
    tasks = ready_tasks(("near", "", 1), ("gated", "", 9))
    queue = ReadyQueue(tasks, gpu_only)
    queue.add_peer("p")
    tasks["gated"].gated = True
    for task in tasks.values():
        queue.favour("p", queue.stamp(task))
    assert "p" in queue.own_work
    peer = PeerSlots("p", 1, {})
    assert queue.pop_affine(peer, lambda p, t: False) is tasks["near"]
    assert not queue.has_affine("p")  # the gated one could not start there yet: dropped
    queue.drop_peer("p")
    assert "p" not in queue.own_work and queue.pop_affine(peer, lambda p, t: True) is None


def test_backoffs_end_in_order_and_a_task_that_left_ready_is_not_handed_back() -> None:
    tasks = ready_tasks(("late", "", 0), ("soon", "", 0), ("gone", "", 0))
    queue = ReadyQueue(tasks, gpu_only)
    queue.defer(tasks["late"], 5.0)
    queue.defer(tasks["soon"], 1.0)
    queue.defer(tasks["gone"], 2.0)
    queue.end_backoff(tasks["gone"])  # it left READY meanwhile
    assert queue.backing_off == 2 and queue.next_due() == 1.0
    assert [t.name for t in queue.due(3.0)] == ["soon"]
    assert [t.name for t in queue.due(10.0)] == ["late"]
    assert queue.backing_off == 0 and queue.next_due() is None
    queue.validate(finished=False, peers={})
