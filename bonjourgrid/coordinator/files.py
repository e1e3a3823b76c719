"""Where every file of a job is, pure: the scheduler core's view of the data.

A file is known by its path in the workflow and, once it exists, by its content (FileRef).
The table knows which peers hold a replica of each content (they produced it, a task of the
job read it there, a prefetch brought it, or it was in their cache when they were
recruited) and whether the coordinator can serve it (a source input, or an output already
collected into the submit directory). It answers the questions placement and prefetching
ask: how many of a task's input bytes a peer already holds, what it is missing, where to
fetch a file from, and which contents a lost peer took with it.

It also keeps, incrementally, which peers hold a content that a running task reads
(`serves_readers`): such a peer may have a fetch in progress from it, and scale-in must
not release it. Counting it at each question would scan every running task's inputs for
every idle peer (O(peers x running tasks) per event); instead the core says when a task
starts and stops reading (`start_reading`, `stop_reading`), and the counts follow every
change of a path's content and of a digest's holders.

No sockets, no clock: `coordinator/core.py` drives it.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

from bonjourgrid.cache.store import FileRef

COORDINATOR = "coordinator"  # the source name of the coordinator's own data server
MAX_PEER_SOURCES = 3  # peer replicas offered per fetch (then the coordinator, if it holds it)


class FileTable:
    """Replicas by content, references by path, and the coordinator's holdings."""

    def __init__(self, refs: Mapping[str, FileRef] | None = None) -> None:
        self.refs: dict[str, FileRef] = {}  # path -> content, once it exists
        self.paths: dict[str, list[str]] = defaultdict(list)  # digest -> paths with it
        self.holders: dict[str, dict[str, None]] = defaultdict(dict)  # digest -> peers
        self.by_peer: dict[str, set[str]] = defaultdict(set)  # peer -> digests it holds
        self.at_coordinator: set[str] = set()  # digests the coordinator serves
        self._turn: dict[str, int] = defaultdict(int)  # spreads fetches over replicas
        self._reading: Counter[str] = Counter()  # path -> running tasks that read it
        self._read: Counter[str] = Counter()  # digest -> running reads of its paths
        self._serving: Counter[str] = Counter()  # peer -> digests it holds that are read
        for path, ref in (refs or {}).items():
            self.learn(path, ref)
            self.at_coordinator.add(ref.digest)

    # -- facts ----------------------------------------------------------------------------

    def learn(self, path: str, ref: FileRef) -> None:
        """`path` now has this content (a source, or an output a task reported)."""
        old = self.refs.get(path)
        if old == ref:
            return
        readers = self._reading.get(path, 0)
        if old is not None:  # remade with other bytes
            self.paths[old.digest].remove(path)
            self._count_reads(old.digest, -readers)
        self.refs[path] = ref
        self.paths[ref.digest].append(path)
        self._count_reads(ref.digest, readers)

    def hold(self, peer: str, digest: str) -> None:
        holders = self.holders[digest]
        if peer in holders:
            return
        holders[peer] = None
        self.by_peer[peer].add(digest)
        if self._read.get(digest):
            self._serving[peer] += 1

    def drop_peer(self, peer: str) -> set[str]:
        """Forget a peer; the digests it held."""
        held = self.by_peer.pop(peer, set())
        for digest in held:
            self.holders[digest].pop(peer, None)
        self._serving.pop(peer, None)
        return held

    def start_reading(self, paths: Iterable[str]) -> None:
        """A task that reads `paths` started running."""
        for path in paths:
            self._reading[path] += 1
            ref = self.refs.get(path)
            if ref is not None:
                self._count_reads(ref.digest, 1)

    def stop_reading(self, paths: Iterable[str]) -> None:
        """A task that reads `paths` stopped running."""
        for path in paths:
            self._reading[path] -= 1
            if not self._reading[path]:
                del self._reading[path]
            ref = self.refs.get(path)
            if ref is not None:
                self._count_reads(ref.digest, -1)

    def _count_reads(self, digest: str, change: int) -> None:
        if not change:
            return
        before = self._read.get(digest, 0)
        after = before + change
        if after:
            self._read[digest] = after
        else:
            del self._read[digest]
        if bool(before) == bool(after):
            return  # its holders serve it still, or still not
        step = 1 if after else -1
        for peer in self.holders.get(digest, ()):
            self._serving[peer] += step
            if not self._serving[peer]:
                del self._serving[peer]

    # -- questions ------------------------------------------------------------------------

    def serves_readers(self, peer: str) -> bool:
        """Whether `peer` holds a content that a running task reads (on any peer)."""
        return peer in self._serving

    def validate(self) -> None:
        """The read counts against a recomputation from the paths being read."""
        read: Counter[str] = Counter()
        for path, readers in self._reading.items():
            assert readers > 0, f"{path}: {readers} readers"
            ref = self.refs.get(path)
            if ref is not None:
                read[ref.digest] += readers
        assert read == self._read, "reads by content are off"
        serving = Counter(peer for digest in read for peer in self.holders.get(digest, ()))
        assert serving == self._serving, "peers serving readers are off"

    def holds(self, peer: str, digest: str) -> bool:
        return peer in self.holders.get(digest, ())

    def available(self, digest: str) -> bool:
        """Whether some live peer or the coordinator can serve these bytes."""
        return digest in self.at_coordinator or bool(self.holders.get(digest))

    def ref(self, path: str) -> FileRef | None:
        return self.refs.get(path)

    def held_bytes(self, peer: str, paths: Iterable[str]) -> int:
        """Bytes of `paths` (known contents only) that `peer` already holds."""
        held = self.by_peer.get(peer)
        if not held:
            return 0
        total = 0
        for path in paths:
            ref = self.refs.get(path)
            if ref is not None and ref.digest in held:
                total += ref.size
        return total

    def missing(self, peer: str, paths: Iterable[str]) -> list[FileRef]:
        """Known contents of `paths` that `peer` does not hold, each once."""
        held = self.by_peer.get(peer, set())
        seen: set[str] = set()
        out = []
        for path in paths:
            ref = self.refs.get(path)
            if ref is not None and ref.digest not in held and ref.digest not in seen:
                seen.add(ref.digest)
                out.append(ref)
        return out

    def sources(self, digest: str, for_peer: str, first: str | None = None) -> list[str]:
        """Where `for_peer` should fetch `digest` from, best first: peers holding a replica
        (`first` before the others, the rest in turn so that readers spread over them),
        then the coordinator if it can serve it."""
        peers = [p for p in self.holders.get(digest, ()) if p != for_peer and p != first]
        if peers:
            turn = self._turn[digest] % len(peers)
            self._turn[digest] += 1
            peers = peers[turn:] + peers[:turn]
        if first is not None and first != for_peer and self.holds(first, digest):
            peers.insert(0, first)
        chosen = peers[:MAX_PEER_SOURCES]
        if digest in self.at_coordinator:
            chosen.append(COORDINATOR)
        return chosen
