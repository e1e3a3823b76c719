"""Where every file of a job is, pure: the scheduler core's view of the data.

A file is known by its path in the workflow and, once it exists, by its content (FileRef).
The table knows which peers hold a replica of each content (they produced it, a task of the
job read it there, a prefetch brought it, or it was in their cache when they were
recruited) and whether the coordinator can serve it (a source input, or an output already
collected into the submit directory). It answers the questions placement and prefetching
ask: how many of a task's input bytes a peer already holds, what it is missing, where to
fetch a file from, and which contents a lost peer took with it.

No sockets, no clock: `coordinator/core.py` drives it.
"""

from __future__ import annotations

from collections import defaultdict
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
        for path, ref in (refs or {}).items():
            self.learn(path, ref)
            self.at_coordinator.add(ref.digest)

    # -- facts ----------------------------------------------------------------------------

    def learn(self, path: str, ref: FileRef) -> None:
        """`path` now has this content (a source, or an output a task reported)."""
        old = self.refs.get(path)
        if old == ref:
            return
        if old is not None:  # remade with other bytes
            self.paths[old.digest].remove(path)
        self.refs[path] = ref
        self.paths[ref.digest].append(path)

    def hold(self, peer: str, digest: str) -> None:
        self.holders[digest][peer] = None
        self.by_peer[peer].add(digest)

    def drop_peer(self, peer: str) -> set[str]:
        """Forget a peer; the digests it held."""
        held = self.by_peer.pop(peer, set())
        for digest in held:
            self.holders[digest].pop(peer, None)
        return held

    # -- questions ------------------------------------------------------------------------

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
