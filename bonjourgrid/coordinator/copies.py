"""Speculative copies of stalled tasks, pure: the policy's settings, the runtimes it compares
with, and the record of one extra live run.

Theory. On borrowed desktops a task may run far longer than its siblings (a slow or loaded
machine, an owner's swap storm). When peers sit idle with nothing ready, the scheduler core
runs a second copy of such a straggler on another peer, as MapReduce's backup tasks and
Condor's vacate-and-requeue do in spirit. The first copy to exit 0 wins: only its outputs
are collected (never two writes of the submit directory), the others are stopped
(`StopRun`), and the cache of their peers keeps whatever they fetched. A copy that fails or
whose peer is lost only ends that copy: the task fails an attempt when its last live copy
does.

A task is a straggler when it has run longer than `max(min_runtime_s, factor x median)`,
the median being that of its finished siblings: the tasks of its class (same `require` and
category, the ready queue's classes), once at least `min_siblings` of them have finished.
At most one copy per task (two live runs).

The core keeps the records (`SchedulerCore.copies`: task -> its extra runs); this module has
no state of the job's besides the runtimes, and no clock.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SpeculationSettings:
    """`[schedule]` in bgrid.toml: when a running task gets a speculative copy."""

    factor: float = 0.0  # a straggler ran this many times its siblings' median; 0: never
    min_runtime_s: float = 60.0  # and at least this long (short tasks are not worth a copy)
    min_siblings: int = 3  # finished siblings needed before a median means anything

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def threshold(self, median: float) -> float:
        """How long a task of a class with this median runs before it gets a copy."""
        return max(self.min_runtime_s, self.factor * median)


@dataclass(slots=True)
class Copy:
    """One live run of a task besides the one the task's record holds (its `peer` and
    `attempts`). When a copy wins or outlives the others, its fields become the task's."""

    peer: str
    attempt: int
    start: float
    why: str  # why the copy was made (the report says it)
    acked: bool = False
    unlisted: int = 0


@dataclass
class Runtimes:
    """Run times of the tasks that exited 0, per class, sorted (for the median)."""

    by_class: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, key: tuple[str, str], seconds: float) -> None:
        bisect.insort(self.by_class.setdefault(key, []), seconds)

    def median(self, key: tuple[str, str], at_least: int) -> float | None:
        """The median of the class, or None with fewer than `at_least` samples."""
        samples = self.by_class.get(key, [])
        if not samples or len(samples) < at_least:
            return None
        middle = len(samples) // 2
        if len(samples) % 2:
            return samples[middle]
        return (samples[middle - 1] + samples[middle]) / 2
