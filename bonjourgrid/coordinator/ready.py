"""The scheduler's ready queue, pure: which READY task a free slot takes next.

Owned by `SchedulerCore` (core.py), which alone decides when a task enters or leaves it.

- One heap per class (tasks with the same `require` text and the same category), ordered
  by the user's `priority` (higher first), then by bottom level (`-priority`), then by when
  the task was queued: among equals the critical path goes first, and popping for a peer
  costs O(classes), never O(tasks). Whether a peer can run a class is asked once per
  (peer, class) and remembered (`can_run`).
- Category caps (`categories: {NAME: {max_running: N}}`): the core says when a task of a
  capped category is placed and when it ends, its outputs collected or its attempt over
  (`started`, `stopped`); a category at its cap is
  `full`, and its classes are passed over by `has_ready` and `pop_best` (their tasks wait
  READY, in their heap, until a run of the category ends). A capped task is placed from its
  class heap only: it is never planned ahead or gated on a broadcast (the planner asks for
  `with_capped=False`), so a free peer never holds on to work it may not start, and a full
  category costs nothing per event.
- One "affine" heap per peer: ready tasks whose input bytes (or a broadcast file they wait
  for) are on that peer; the peer pops them first.
- The peers with a free slot (`free`, in the order they joined), and among them `own_work`:
  those that may have affine tasks or READY tasks planned on them (by the data planner), so
  that only those are visited first. A busy peer is never in `own_work`: it is put back when
  a slot frees (`mark_free`) if it has such work then. With 10,000 peers, scheduling visits
  only the peers that can take something, never all of them.
- The backoff heap: retries waiting out their backoff (`defer`), placeable again once
  `due(now)` hands them back.

Entries are never removed from a heap: an entry is stale once its task was placed, planned,
skipped or queued again (`task.queued` moved on), and it is dropped when popped (`valid`).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping

from bonjourgrid.coordinator.model import Entry, Matcher, PeerSlots, TaskState, TaskStatus

# More than any bottom level: the workflow's priority ranks first, the bottom level second,
# in one int (an entry stays a 3-tuple, compared as fast as before priorities existed).
_LEVELS = 1 << 40


class ReadyQueue:
    """The class heaps, the per-peer affine heaps and the backoff heap, with lazy deletion."""

    def __init__(
        self,
        tasks: Mapping[str, TaskState],
        matches: Matcher,
        caps: Mapping[str, int] | None = None,
    ) -> None:
        self._tasks = tasks
        self._matches = matches
        self._match_cache: dict[tuple[str, str], bool] = {}
        # (require, category) -> heap; category "" for a task in none
        self.classes: dict[tuple[str, str], list[Entry]] = defaultdict(list)
        self.caps: dict[str, int] = dict(caps or {})  # category -> most runs at once
        # placed tasks of each capped category, running or collecting their outputs
        self.running_in: dict[str, int] = dict.fromkeys(self.caps, 0)
        self.full: set[str] = set()  # capped categories at their cap
        self.ready_in: dict[str, int] = dict.fromkeys(self.caps, 0)  # READY tasks of each
        self.affine: dict[str, list[Entry]] = {}  # peer -> heap of tasks whose data is there
        self.free: dict[str, None] = {}  # peers with a free slot, in the order they joined
        self.own_work: dict[str, None] = {}  # free peers with planned or affine tasks (maybe stale)
        self._seq = 0
        self._delayed: list[tuple[float, int, str]] = []  # (not_before, seq, task): backoffs
        self.backing_off = 0  # READY tasks waiting out a backoff (live entries of _delayed)

    # -- requirement classes ------------------------------------------------------------

    def can_run(self, peer: PeerSlots, require: str) -> bool:
        if not require:
            return True
        key = (peer.name, require)
        if key not in self._match_cache:
            self._match_cache[key] = self._matches(require, peer.attrs)
        return self._match_cache[key]

    def unplaceable(self, peers: Iterable[PeerSlots]) -> list[str]:
        """Queued READY tasks that none of `peers` can run."""
        held = list(peers)
        stuck: list[str] = []
        for (require, _), heap in self.classes.items():
            if not any(self.can_run(p, require) for p in held):
                stuck.extend(
                    entry[2] for entry in heap if self._tasks[entry[2]].status is TaskStatus.READY
                )
        return stuck

    # -- category caps --------------------------------------------------------------------

    def capped(self, task: TaskState) -> bool:
        """Whether `task`'s category has a cap on how many of it run at once."""
        return task.category in self.caps

    def started(self, task: TaskState) -> None:
        """A task was placed (counted against its category's cap until `stopped`)."""
        if task.category in self.caps:
            self.running_in[task.category] += 1
            if self.running_in[task.category] >= self.caps[task.category]:
                self.full.add(task.category)

    def counted_ready(self, task: TaskState, change: int) -> None:
        """A task of a capped category became READY (+1) or left READY (-1)."""
        if task.category in self.caps:
            self.ready_in[task.category] += change

    def held_back(self) -> int:
        """READY tasks that their categories' caps keep from starting now, however many
        peers come: O(capped categories)."""
        return sum(
            max(0, self.ready_in[c] - (cap - self.running_in[c])) for c, cap in self.caps.items()
        )

    def stopped(self, task: TaskState) -> None:
        """A placed task ended (or went back to wait): another of its category may start."""
        if task.category in self.caps:
            self.running_in[task.category] -= 1
            self.full.discard(task.category)

    # -- entries ------------------------------------------------------------------------

    def stamp(self, task: TaskState) -> Entry:
        """A fresh entry for `task`; its older entries are stale from now on."""
        self._seq += 1
        task.queued = self._seq
        return (-(task.user_priority * _LEVELS + task.priority), self._seq, task.name)

    def entry_of(self, task: TaskState) -> Entry:
        """The entry `task` was last queued with (stale if it was placed or planned since)."""
        return (-(task.user_priority * _LEVELS + task.priority), task.queued, task.name)

    def valid(self, entry: Entry) -> bool:
        """Whether a heap entry still stands for a task that may be placed."""
        task = self._tasks[entry[2]]
        return (
            task.queued == entry[1] and task.status is TaskStatus.READY and task.planned_on is None
        )

    def push(self, task: TaskState, entry: Entry) -> None:
        """Placeable on any peer that can run its class."""
        heapq.heappush(self.classes[(task.require, task.category)], entry)

    def favour(self, peer: str, entry: Entry) -> None:
        """Placeable first on `peer` (it holds the task's data)."""
        heapq.heappush(self.affine[peer], entry)
        if peer in self.free:
            self.own_work[peer] = None

    def has_ready(self) -> bool:
        """Whether any class heap has a placeable entry (stale ones on top are dropped: a
        heap of stale entries alone would make every caller visit its peers for nothing)."""
        full = self.full
        for (_, category), heap in self.classes.items():
            if category in full:
                continue  # its tasks wait for a run of their category to end
            self._drop_stale(heap)
            if heap:
                return True
        return False

    def _drop_stale(self, heap: list[Entry]) -> None:
        tasks = self._tasks
        while heap and (not self.valid(heap[0]) or tasks[heap[0][2]].gated):
            heapq.heappop(heap)  # stale: placed, planned, skipped, or queued again

    # -- popping --------------------------------------------------------------------------

    def pop_best(self, peer: PeerSlots, with_capped: bool = True) -> TaskState | None:
        """The best queued task of any class `peer` can run (not one gated on a broadcast,
        nor one of a full category; `with_capped=False`: of no capped category)."""
        tasks = self._tasks
        best: Entry | None = None
        best_class = ("", "")
        passed_over = self.full if with_capped else self.caps.keys()
        for key, heap in self.classes.items():
            if key[1] in passed_over:
                continue
            self._drop_stale(heap)
            if heap and (best is None or heap[0] < best) and self.can_run(peer, key[0]):
                best, best_class = heap[0], key
        if best is None:
            return None
        heapq.heappop(self.classes[best_class])
        return tasks[best[2]]

    def pop_affine(
        self,
        peer: PeerSlots,
        may_start: Callable[[PeerSlots, TaskState], bool],
        with_capped: bool = True,
    ) -> TaskState | None:
        """The best task favouring `peer` that it can run; `may_start` says whether a task
        gated on a broadcast may start there yet. A task of a full category (or, with
        `with_capped=False`, of any capped one) loses its place here: it is still in its
        class heap (never gated), only its preference for this peer is dropped."""
        heap = self.affine.get(peer.name)
        passed_over = self.full if with_capped else self.caps.keys()
        while heap:
            entry = heapq.heappop(heap)
            task = self._tasks[entry[2]]
            if task.category in passed_over:
                continue
            if self.valid(entry) and self.can_run(peer, task.require):
                if task.gated and not may_start(peer, task):
                    continue
                return task
        return None

    def has_affine(self, peer: str) -> bool:
        return bool(self.affine.get(peer))

    # -- peers ----------------------------------------------------------------------------

    def add_peer(self, peer: str) -> None:
        """A peer joined: its slots are free."""
        self.affine[peer] = []
        self.free[peer] = None

    def drop_peer(self, peer: str) -> None:
        self.affine.pop(peer, None)
        self.free.pop(peer, None)
        self.own_work.pop(peer, None)

    def drop_all_peers(self) -> None:
        self.affine.clear()
        self.free.clear()
        self.own_work.clear()

    def mark_free(self, peer: PeerSlots) -> None:
        """`peer` has a free slot (again): visited first if it has work of its own."""
        self.free[peer.name] = None
        if peer.planned_ready or self.affine.get(peer.name):
            self.own_work[peer.name] = None

    def mark_full(self, peer: str) -> None:
        """Every slot of `peer` is taken."""
        self.free.pop(peer, None)
        self.own_work.pop(peer, None)

    def note_planned(self, peer: str) -> None:
        """A READY task was planned on `peer`: it takes it first when it has a free slot."""
        if peer in self.free:
            self.own_work[peer] = None

    # -- backoffs -------------------------------------------------------------------------

    def defer(self, task: TaskState, not_before: float) -> None:
        """Keep READY `task` out of the heaps until `not_before` (a retry's backoff)."""
        self._seq += 1
        task.not_before = not_before
        task.backoff = self._seq
        self.backing_off += 1
        heapq.heappush(self._delayed, (not_before, self._seq, task.name))

    def end_backoff(self, task: TaskState) -> None:
        """`task` leaves READY: its backoff no longer matters (its entry goes stale)."""
        if task.backoff != -1:
            task.backoff = -1
            self.backing_off -= 1

    def due(self, now: float) -> Iterator[TaskState]:
        """The tasks whose backoff ended by `now`, in order; they are placeable again once
        queued (`stamp` + `push`)."""
        while self._delayed and self._delayed[0][0] <= now:
            _, seq, name = heapq.heappop(self._delayed)
            task = self._tasks[name]
            if task.backoff == seq:  # else it left READY meanwhile (end_backoff)
                task.backoff = -1
                self.backing_off -= 1
                yield task

    def next_due(self) -> float | None:
        return self._delayed[0][0] if self._delayed else None

    def validate(self, finished: bool, peers: Mapping[str, PeerSlots]) -> None:
        """Invariants; `peers`: the held peers, to check `free` and `own_work` against."""
        for name, peer in peers.items():
            assert (name in self.free) == (len(peer.running) < peer.cpus), f"{name}: free is off"
            if name in self.free and (peer.planned_ready or self.affine.get(name)):
                assert name in self.own_work, f"{name} has work of its own, unvisited"
        assert set(self.own_work) <= set(self.free), "a busy peer is in own_work"
        assert set(self.free) <= set(peers), "a peer not held is free"
        running: dict[str, int] = dict.fromkeys(self.caps, 0)
        ready: dict[str, int] = dict.fromkeys(self.caps, 0)
        for task in self._tasks.values():
            if task.status is TaskStatus.READY and task.category in ready:
                ready[task.category] += 1
            placed = task.status in (TaskStatus.RUNNING, TaskStatus.COLLECTING)
            if placed and task.category in running:
                running[task.category] += 1
            if task.category in self.caps:
                assert not task.gated, f"{task.name} is capped and gated"
                assert task.planned_on is None or finished, f"{task.name} is capped and planned"
        assert running == self.running_in, "runs per category are off"
        assert ready == self.ready_in, "ready tasks per category are off"
        for category, cap in self.caps.items():
            assert running[category] <= cap or finished, f"{category} runs over its cap"
            assert (category in self.full) == (running[category] >= cap), f"{category}: full"
        live = [name for _, seq, name in self._delayed if self._tasks[name].backoff == seq]
        assert len(live) == self.backing_off, "backoff count is off"
        for name in live:
            assert self._tasks[name].status is TaskStatus.READY or finished
