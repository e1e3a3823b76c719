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

Quorum (BOINC's replication) uses the same mechanism: a task under `quorum: N` runs on N
distinct peers at once, each run's outputs are a vote (`Vote`: their SHA-256 digests), and
the result is accepted once a strict majority of N agree (`majority`: 2 of 2, 2 of 3). While
the votes disagree, further runs start, up to `bound(N)` = 2N - 1 runs in all, enough for a
majority to form among differing results; when none can form any more, the task fails, its
report naming each peer and its digests (`Ballot.describe`). A peer outvoted
`OUTVOTED_LIMIT` times runs no further copies for the job, is placed on only when no other
peer is free, and is released once idle (a PeerJoined of it is answered with a Release).
Only the winner's outputs are collected, from a peer of the majority.

The core keeps the records (`SchedulerCore.copies`: task -> its extra runs, `ballots`: task
-> its votes); this module has no state of the job's besides the runtimes, and no clock.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from bonjourgrid.cache.store import FileRef


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


# -- quorum ------------------------------------------------------------------------------

OUTVOTED_LIMIT = 2  # a peer outvoted this many times runs no more copies for the job


def bound(quorum: int) -> int:
    """The most runs a task under `quorum` may take: enough for a majority of `quorum` to
    form even when every disagreeing run differs (2 x quorum - 1)."""
    return 2 * quorum - 1


def majority(quorum: int) -> int:
    """Agreeing votes that accept a result: a strict majority of `quorum` (2 of 2, 2 of 3)."""
    return quorum // 2 + 1


@dataclass(frozen=True, slots=True)
class Vote:
    """What one run of a task under quorum made: its outputs, compared by their SHA-256."""

    peer: str
    attempt: int
    outputs: tuple[tuple[str, FileRef], ...]

    @property
    def key(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((path, ref.digest) for path, ref in self.outputs))

    def digest(self) -> str:
        """One line for the user: the outputs' digests (short), as a report names them."""
        return ", ".join(f"{path}={digest[:12]}" for path, digest in self.key) or "(no outputs)"


@dataclass
class Ballot:
    """The votes of one task under quorum, and what they decide (`decide`)."""

    quorum: int
    votes: list[Vote] = field(default_factory=list)

    def cast(self, vote: Vote) -> bool:
        """Count `vote`, unless its peer voted already (one voice per peer)."""
        if any(v.peer == vote.peer for v in self.votes):
            return False
        self.votes.append(vote)
        return True

    def voters(self) -> set[str]:
        return {v.peer for v in self.votes}

    def winners(self) -> list[Vote]:
        """The votes of the result a majority agrees on (empty: none yet)."""
        tally = Counter(v.key for v in self.votes)
        if not tally:
            return []
        key, count = tally.most_common(1)[0]
        return [v for v in self.votes if v.key == key] if count >= majority(self.quorum) else []

    def runs_wanted(self, live: int) -> int:
        """More runs to start, with `live` runs going: until `quorum` votes are in, and while
        no majority is possible with the runs going, within the bound; -1 when no majority
        can form any more (the task fails)."""
        cast = len(self.votes)
        top = max(Counter(v.key for v in self.votes).values(), default=0)
        room = bound(self.quorum) - cast - live
        if top + live + room < majority(self.quorum):
            return -1
        return max(0, min(room, max(self.quorum - cast - live, majority(self.quorum) - top - live)))

    def describe(self) -> str:
        """Each peer and its outputs' digests, for a failure or a report."""
        return "; ".join(f"{v.peer}: {v.digest()}" for v in self.votes)

    def outvoted(self) -> list[str]:
        """The peers whose result the majority did not share."""
        won = {v.key for v in self.winners()}
        return [v.peer for v in self.votes if won and v.key not in won]
