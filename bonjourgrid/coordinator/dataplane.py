"""The scheduler's data planner, pure: where files are, what moves ahead, what is remade.

A part the scheduler core (`core.py`) builds and holds: `DataPlanner` is handed what it
reads (tasks, held peers, the DAG's edges, each task's files, the `FileTable`, the
`ReadyQueue`) and asks the core for every move of a task through `TaskMoves` (the core
alone changes a task's status, with its bookkeeping). It owns the transfers in flight, the
broadcasts and the count of planned tasks, and never touches a socket or a clock.

- Placement follows the bytes: a task that becomes ready is pushed on the "affine" heap of
  the peer holding most of its input bytes (`data_peer`), which that peer pops first.
- Prefetching plans tasks on busy peers ahead of time (`plan`; depth and max_bytes from
  the policy) and orders their missing inputs moved there (`Prefetch`); `eager` and
  `critical-path` also move the inputs of waiting tasks as soon as they exist
  (`prefetch_for_waiting`). An idle slot takes over a planned task (`_steal`, in core.py).
- A file read by many tasks is broadcast in a doubling tree (`broadcast`): the coordinator
  sends the first copy, every holder then sends one copy at a time; while it spreads, its
  readers are "gated": placeable only on peers that hold it.
- A lost intermediate that an unfinished task needs is made again at once, when its peer
  is lost (`remake`); a reader running elsewhere meanwhile is stopped and placed again
  once the file exists again, unless it finished first (`restart_stalled_readers`).

Scale. Nothing here visits every peer per event: the peers with room for one more planned
task (`_roomy`) and those with READY tasks planned on them, by how many (`_by_load`: an
idle slot steals from the most loaded first, `victims`) are indexes kept as plans change,
and whether a peer still serves a file is answered by counts the file table keeps
(`still_serving`). `validate` checks each index against a recomputation. What still visits
every peer: a broadcast round (per broadcast file), `peer_lost` (rare), and a retry's
search for a fresh peer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Protocol

from bonjourgrid.coordinator.files import COORDINATOR, FileTable
from bonjourgrid.coordinator.model import (
    Instruction,
    Notice,
    PeerSlots,
    Prefetch,
    StopRun,
    TaskData,
    TaskState,
    TaskStatus,
)
from bonjourgrid.coordinator.prefetch import PrefetchSettings
from bonjourgrid.coordinator.ready import ReadyQueue

_MAX_AFFINITY_HOLDERS = 16  # holders of one file considered when placing its readers


class TaskMoves(Protocol):
    """What the data planner asks of the scheduler core: the moves of tasks, which the core
    alone makes (each with its bookkeeping), and two questions about the DAG's progress."""

    def move(self, task: TaskState, to: TaskStatus, now: float, why: str) -> None: ...

    def make_ready(self, task: TaskState, now: float, why: str) -> None: ...

    def enqueue(self, task: TaskState) -> None: ...

    def detach(self, task: TaskState) -> None: ...

    def note(self, task: str, now: float, why: str) -> None: ...

    def top_waiting_level(self) -> int: ...

    def undone_preds(self, name: str) -> int: ...


class DataPlanner:
    """Data-aware placement, prefetch planning, broadcast and remaking.

    Handed at construction what it reads (the tasks and held peers, the DAG's edges, each
    task's files, the file table, the ready queue, the data policy) and what it asks the core
    to do (`moves`). It owns the broadcast and transfer bookkeeping and the count of planned
    tasks."""

    def __init__(
        self,
        *,
        tasks: Mapping[str, TaskState],
        peers: Mapping[str, PeerSlots],
        preds: Mapping[str, list[str]],
        successors: Mapping[str, list[str]],
        data: Mapping[str, TaskData],
        files: FileTable,
        ready: ReadyQueue,
        settings: PrefetchSettings,
        moves: TaskMoves,
    ) -> None:
        self.tasks = tasks
        self.peers = peers
        self.preds = preds
        self.successors = successors
        self.data = data
        self.files = files
        self.ready = ready
        self.settings = settings
        self.moves = moves
        self.producer = {p: name for name, d in data.items() for p in d.outputs}
        self.readers: dict[str, list[str]] = defaultdict(list)  # path -> tasks reading it
        for name, d in data.items():
            for path in d.inputs:
                self.readers[path].append(name)
        wide = settings.broadcast_min_consumers
        self.broadcast_paths = (
            {p for p, r in self.readers.items() if len(r) >= wide} if wide > 0 else set()
        )
        self._bc_active: set[str] = set()  # broadcast digests still spreading (readers gated)
        self._bc_started: set[str] = set()  # broadcast digests whose first copy went out
        self._bc_failed: dict[str, set[str]] = defaultdict(set)  # digest -> peers it failed on
        self._incoming: dict[str, dict[str, str]] = defaultdict(dict)  # peer -> digest -> via
        self.planned = 0  # READY tasks planned on peers, not yet placed
        # Peers with READY tasks planned on them, by how many (their `planned_ready`).
        self._by_load: dict[int, dict[str, None]] = defaultdict(dict)
        self._roomy: dict[str, None] = {}  # peers that may take one more planned task
        self._depth = len(tasks) if settings.policy == "eager" else settings.depth

    # -- peers and their plans ----------------------------------------------------------

    def add_peer(self, peer: PeerSlots) -> None:
        self._update_room(peer)

    def drop_peer(self, name: str) -> None:
        for load in [n for n, bucket in self._by_load.items() if name in bucket]:
            del self._by_load[load][name]  # a handful of loads: lookahead plans 2 per peer
            if not self._by_load[load]:
                del self._by_load[load]
        self._roomy.pop(name, None)

    def drop_all_peers(self) -> None:
        self._by_load.clear()
        self._roomy.clear()

    def _update_room(self, peer: PeerSlots) -> None:
        if len(peer.planned) < self._depth and peer.planned_bytes < self.settings.max_bytes:
            self._roomy[peer.name] = None
        else:
            self._roomy.pop(peer.name, None)

    def count_ready_plan(self, peer: PeerSlots, change: int) -> None:
        """A task planned on `peer` became READY (+1), or is no longer READY and planned (-1)."""
        self.planned += change
        before = peer.planned_ready
        peer.planned_ready += change
        if before:
            self._by_load[before].pop(peer.name, None)
            if not self._by_load[before]:
                del self._by_load[before]
        if peer.planned_ready:
            self._by_load[peer.planned_ready][peer.name] = None
            if change > 0:
                self.ready.note_planned(peer.name)

    def victims(self, thief: str) -> Iterator[PeerSlots]:
        """The peers other than `thief` with READY tasks planned on them, the most loaded
        first (an idle slot steals from them): O(loads), not O(peers), to the first one."""
        for load in sorted(self._by_load, reverse=True):
            for name in self._by_load[load]:
                if name != thief:
                    yield self.peers[name]

    def data_peer(self, task: TaskState) -> PeerSlots | None:
        """The peer holding the most of `task`'s input bytes (None: no peer holds any)."""
        candidates: dict[str, None] = {}
        for path in self.data[task.name].inputs:
            ref = self.files.ref(path)
            holders = self.files.holders.get(ref.digest, {}) if ref is not None else {}
            # A file (nearly) every peer holds says nothing about where to go, and looking
            # at all its holders for each of its readers would cost O(tasks x peers).
            if len(holders) <= _MAX_AFFINITY_HOLDERS:
                candidates.update(holders)
        best, best_bytes = None, 0
        for name in candidates:
            peer = self.peers.get(name)
            if peer is None or not self.ready.can_run(peer, task.require):
                continue
            held = self.files.held_bytes(name, self.data[task.name].inputs)
            if held > best_bytes:
                best, best_bytes = peer, held
        return best

    def peer_joined(self, peer: PeerSlots, cached: frozenset[str]) -> None:
        """`peer` joined holding `cached` contents: ready tasks whose bytes it holds favour it
        (their readers, found by path)."""
        for digest in cached:
            self.files.hold(peer.name, digest)
        for digest in cached:
            for path in self.files.paths.get(digest, ()):
                for name in self.readers.get(path, ()):
                    task = self.tasks[name]
                    entry = self.ready.entry_of(task)
                    if self.ready.valid(entry) and self.data_peer(task) is peer:
                        self.ready.favour(peer.name, entry)

    def peer_lost(self, name: str, now: float, out: list[Instruction]) -> None:
        """Peer `name` is gone with its files (its tasks are back in the queue by now)."""
        for digest, via in self._incoming.pop(name, {}).items():
            self.release_server(via, digest)
        for incoming in self._incoming.values():  # copies it was sending fall back
            for digest, via in list(incoming.items()):
                if via == name:
                    incoming[digest] = ""
        self.files.drop_peer(name)
        if self.files.refs:
            # Its files may have been the last copies, and the tasks it ran go back to the
            # queue needing files that are gone (an O(tasks) scan: peers are lost rarely).
            self.remake(f"peer {name}", now, out)
        for digest in list(self._bc_active):
            self.check_broadcast(digest, now)

    def prefetch_failed(self, peer: str, digest: str, now: float) -> None:
        via = self._incoming[peer].pop(digest, None)
        if via:
            self.release_server(via, digest)
        self._bc_failed[digest].add(peer)
        self.check_broadcast(digest, now)

    def plan(self, now: float, out: list[Instruction]) -> None:
        """Plan ready tasks on busy peers ahead of time and order their inputs moved."""
        settings = self.settings
        if not settings.plans_ahead or not self.peers:
            return
        depth = self._depth
        progress = True
        while progress and self.ready.has_ready():
            progress = False  # one task per peer per round: plans stay balanced
            for name in list(self._roomy):
                if not self._bc_active and not self.ready.has_ready():
                    break  # only a broadcast's gated readers wait in affine heaps alone
                peer = self.peers[name]
                if len(peer.planned) >= depth or peer.planned_bytes >= settings.max_bytes:
                    continue
                # a capped task waits for its category, not for a peer: never planned
                task = self.ready.pop_affine(peer, self.holds_broadcast_inputs, with_capped=False)
                task = task or self.ready.pop_best(peer, with_capped=False)
                if task is None:
                    continue
                missing = sum(
                    r.size for r in self.files.missing(peer.name, self.data[task.name].inputs)
                )
                if peer.planned and peer.planned_bytes + missing > settings.max_bytes:
                    self.moves.enqueue(task)  # does not fit in what may move here ahead
                    peer.planned_bytes = settings.max_bytes
                    self._update_room(peer)
                    continue
                self.plan_on(task, peer)
                peer.planned_bytes += missing
                self._update_room(peer)
                self.moves.note(task.name, now, f"planned on {peer.name}")
                self._prefetch_to(
                    peer.name, self.data[task.name].inputs, f"{task.name} planned", out
                )
                progress = True

    def plan_on(self, task: TaskState, peer: PeerSlots) -> None:
        task.planned_on = peer.name
        peer.planned.append(task.name)
        if task.status is TaskStatus.READY:
            self.count_ready_plan(peer, 1)
        self._update_room(peer)

    def unplan(self, task: TaskState, requeue: bool = True) -> None:
        peer = self.peers.get(task.planned_on or "")
        if task.planned_on is not None and task.status is TaskStatus.READY:
            if peer is not None:
                self.count_ready_plan(peer, -1)
            else:
                self.planned -= 1  # planned on a peer that is gone
        task.planned_on = None
        if peer is not None and task.name in peer.planned:
            peer.planned.remove(task.name)
            if not peer.planned:
                peer.planned_bytes = 0
            self._update_room(peer)
        if requeue and task.status is TaskStatus.READY:
            self.moves.enqueue(task)

    def _prefetch_to(
        self, peer: str, paths: Iterable[str], why: str, out: list[Instruction]
    ) -> int:
        """Order the contents of `paths` that `peer` lacks; the bytes ordered."""
        files = []
        total = 0
        for ref in self.files.missing(peer, paths):
            if ref.digest in self._incoming[peer] or not self.files.available(ref.digest):
                continue
            if ref.digest in self._bc_active:
                continue  # the broadcast brings it
            self._incoming[peer][ref.digest] = ""
            files.append((ref, tuple(self.files.sources(ref.digest, peer))))
            total += ref.size
        if files:
            out.append(Prefetch(peer, tuple(files), why))
        return total

    def prefetch_for_waiting(self, producer: TaskState, out: list[Instruction]) -> None:
        """eager / critical-path: move a just-made file to where its waiting reader will run."""
        policy = self.settings.policy
        if policy not in ("eager", "critical-path"):
            return
        top_level = self.moves.top_waiting_level()
        for name in self.successors.get(producer.name, ()):
            task = self.tasks[name]
            if task.status is not TaskStatus.WAITING or self.ready.capped(task):
                continue  # (a capped task is never planned: it waits for its category)
            if policy == "critical-path" and task.priority < top_level:
                continue  # not on a longest remaining path
            peer = self.peers.get(task.planned_on or "")
            if peer is None:
                # critical-path: where the chain goes on (its longest unfinished producer);
                # eager: where most of its bytes already are.
                peer = self._chain_peer(task) if policy == "critical-path" else None
                peer = peer or self.data_peer(task)
                if peer is None:
                    continue
                self.plan_on(task, peer)
            self._prefetch_to(peer.name, self.data[name].inputs, f"{name} waits on it", out)

    def _chain_peer(self, task: TaskState) -> PeerSlots | None:
        running = [
            self.tasks[d]
            for d in self.preds[task.name]
            if self.tasks[d].status is TaskStatus.RUNNING
        ]
        if not running:
            return None
        return self.peers.get(max(running, key=lambda t: t.priority).peer or "")

    def broadcast(self, out: list[Instruction]) -> None:
        """Spread each broadcast file: the coordinator sends the first copy, then every
        holder sends one copy at a time to a peer that lacks it (a doubling tree)."""
        if not self.broadcast_paths or not self.peers:
            return
        for path in sorted(self.broadcast_paths):
            ref = self.files.ref(path)
            if ref is None or not self.files.available(ref.digest):
                continue
            digest = ref.digest
            if digest not in self._bc_started:
                self._bc_started.add(digest)
                self._bc_active.add(digest)
                for name in self.readers[path]:  # gate its ready readers from now on
                    task = self.tasks[name]
                    if task.status is TaskStatus.READY and task.planned_on is None:
                        self.moves.enqueue(task)
            lacking = [
                name
                for name in self.peers
                if not self.files.holds(name, digest)
                and digest not in self._incoming[name]
                and name not in self._bc_failed[digest]
            ]
            for target in lacking:
                servers = [
                    self.peers[h]
                    for h in self.files.holders.get(digest, {})
                    if h in self.peers and self.peers[h].serving == 0
                ]
                if servers:
                    via = servers[0].name
                    servers[0].serving += 1
                elif not self.files.holders.get(digest) and not any(
                    digest in incoming for incoming in self._incoming.values()
                ):
                    via = COORDINATOR  # the first copy
                else:
                    break  # every holder is busy sending: the next round goes on arrival
                self._incoming[target][digest] = via
                sources = self.files.sources(digest, target, first=via)
                out.append(Prefetch(target, ((ref, tuple(sources)),), f"broadcast of {path}"))
            self.check_broadcast(digest, 0.0)

    def arrived(self, peer: str, digest: str) -> None:
        via = self._incoming[peer].pop(digest, None)
        if via:
            self.release_server(via, digest)
        if peer not in self.peers:
            return
        self.files.hold(peer, digest)
        if digest in self._bc_active:
            # Readers waiting for the broadcast may now run here.
            for path in self._paths_of(digest):
                for name in self.readers.get(path, ()):
                    task = self.tasks[name]
                    entry = self.ready.entry_of(task)
                    if task.gated and self.ready.valid(entry):
                        self.ready.favour(peer, entry)
            self.check_broadcast(digest, 0.0)

    def check_broadcast(self, digest: str, now: float) -> None:
        """End a broadcast once every peer holds the file or failed to get it."""
        if digest not in self._bc_active:
            return
        if any(
            not self.files.holds(name, digest) and name not in self._bc_failed[digest]
            for name in self.peers
        ):
            return
        self._bc_active.discard(digest)
        for path in self._paths_of(digest):
            for name in self.readers.get(path, ()):
                task = self.tasks[name]
                if task.status is not TaskStatus.READY or not task.gated:
                    continue
                if task.planned_on is None:
                    self.moves.enqueue(task)  # placeable anywhere now (or gated by another file)
                else:
                    task.gated = bool(self.spreading_inputs(task))

    def release_server(self, via: str, digest: str) -> None:
        if via in self.peers and via != COORDINATOR:
            self.peers[via].serving = max(0, self.peers[via].serving - 1)

    def _paths_of(self, digest: str) -> list[str]:
        return [p for p in self.files.paths.get(digest, ()) if p in self.broadcast_paths]

    def spreading_inputs(self, task: TaskState) -> list[str]:
        """The digests of the task's inputs that are still being broadcast (none for a task
        of a capped category: it is never gated, its run fetches what it lacks)."""
        if not self._bc_active or self.ready.capped(task):
            return []
        return [
            ref.digest
            for p in self.data[task.name].inputs
            if (ref := self.files.ref(p)) is not None and ref.digest in self._bc_active
        ]

    def holds_broadcast_inputs(self, peer: PeerSlots, task: TaskState) -> bool:
        return all(self.files.holds(peer.name, d) for d in self.spreading_inputs(task))

    def remake(
        self, cause: str, now: float, out: list[Instruction], also: TaskState | None = None
    ) -> None:
        """Run again, at once, the producers of lost intermediates that unfinished tasks
        still need; their readers wait for them (no retry used).

        A reader RUNNING elsewhere may have fetched the file before it went, or may be stuck
        fetching it from the lost peer: it goes on, and is stopped and placed again only
        once the file exists again (`_restart_stalled_readers`), unless it reports first.
        Waiting for its fetch to fail before remaking would add the fetcher's timeout."""
        unfinished = (TaskStatus.WAITING, TaskStatus.READY)

        def gone(path: str) -> bool:
            ref = self.files.ref(path)
            return ref is not None and not self.files.available(ref.digest)

        stack = []
        stalled = []
        for t in self.tasks.values():
            lost = [p for p in self.data[t.name].inputs if gone(p)]
            if not lost:
                continue
            if t.status in unfinished:
                stack.append(t)
            elif t.status is TaskStatus.RUNNING and t is not also and not t.lost_input:
                t.lost_input = lost[0]
                stalled.append(t)
        if also is not None:
            stack.append(also)
        needy = {t.name for t in stack}
        stack.extend(stalled)
        remade: dict[str, str] = {}  # producer -> the lost output that someone needs
        while stack:
            task = stack.pop()
            for path in self.data[task.name].inputs:
                producer = self.producer.get(path)
                if producer is None or producer in remade or not gone(path):
                    continue
                if self.tasks[producer].status is TaskStatus.DONE:
                    remade[producer] = path
                    stack.append(self.tasks[producer])
        for name, path in sorted(remade.items()):
            task = self.tasks[name]
            task.deps_left = 0
            task.rerun = f"its output {path} was lost with {cause}"
            self.moves.move(task, TaskStatus.WAITING, now, task.rerun)
            out.append(Notice(f"{cause} lost: remaking {name} (its output {path} was only there)"))
        for name in sorted(remade.keys() | needy):
            task = self.tasks[name]
            task.deps_left = self.moves.undone_preds(name)
            if task.status in (TaskStatus.READY, TaskStatus.RUNNING) and task.deps_left:
                self.unplan(task)
                self.moves.move(task, TaskStatus.WAITING, now, "an input it needs is made again")
        for name in sorted(remade):
            task = self.tasks[name]
            if task.status is TaskStatus.WAITING and task.deps_left == 0:
                self.moves.make_ready(task, now, f"runs again: {cause} took its output")
        for task in stalled:
            path = task.lost_input
            why = (
                f"its input {path} went with {cause}: it goes on on {task.peer} in case it "
                f"has it, and is stopped once {self.producer.get(path, '?')} has made it again"
            )
            self.moves.note(task.name, now, why)
            out.append(Notice(f"{task.name}: {why}", detail=True))
        if also is not None and also.status is TaskStatus.RUNNING:
            self.moves.make_ready(also, now, f"an input went with {cause}: runs again")

    def restart_stalled_readers(
        self, producer: TaskState, now: float, out: list[Instruction]
    ) -> None:
        """`producer` made its outputs again: its readers still running since their input
        was lost (maybe stuck fetching it from the lost peer) are stopped and placed again."""
        for path in self.data[producer.name].outputs:
            for name in self.readers.get(path, ()):
                task = self.tasks[name]
                if task.status is not TaskStatus.RUNNING or not task.lost_input:
                    continue
                refs = [self.files.ref(p) for p in self.data[name].inputs]
                if not all(r is not None and self.files.available(r.digest) for r in refs):
                    continue  # another of its lost inputs is still being made
                assert task.peer is not None
                why = (
                    f"stopped on {task.peer}: {task.lost_input} exists again "
                    f"({producer.name} remade it); runs again with it (no retry used)"
                )
                out.append(StopRun(name, task.peer, task.attempts, why))
                out.append(Notice(f"{name}: {why}"))
                self.moves.detach(task)
                self.moves.make_ready(task, now, why)

    def still_serving(self, peer: str) -> bool:
        """Whether a running task may still be fetching from idle `peer` (it holds one of its
        inputs), or a prefetch is pulling from it: releasing it would revoke the job key on
        its data socket in the middle of that transfer. O(1): the file table counts the
        readers of what each peer holds, and `serving` counts the copies a peer sends (one
        per `_incoming` entry via it, as `validate` checks)."""
        slots = self.peers.get(peer)
        return self.files.serves_readers(peer) or (slots is not None and slots.serving > 0)

    def validate(self) -> None:
        """Invariants while the job runs (the core's `validate_state`)."""
        assert self.planned == sum(p.planned_ready for p in self.peers.values())
        vias = [via for incoming in self._incoming.values() for via in incoming.values()]
        for peer in self.peers.values():
            assert peer.serving == vias.count(peer.name), f"{peer.name} serving is off"
        by_load: dict[int, set[str]] = defaultdict(set)
        for name, peer in self.peers.items():
            if peer.planned_ready:
                by_load[peer.planned_ready].add(name)
        actual = {load: set(bucket) for load, bucket in self._by_load.items()}
        assert actual == by_load, "the peers by ready planned tasks are off"
        roomy = {
            name
            for name, peer in self.peers.items()
            if len(peer.planned) < self._depth and peer.planned_bytes < self.settings.max_bytes
        }
        assert set(self._roomy) == roomy, "the peers with room for a plan are off"
