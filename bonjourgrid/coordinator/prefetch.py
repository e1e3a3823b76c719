"""Prefetch policies: which files move to which peer before a task needs them.

The settings live here; the decisions are made by the pure scheduler core
(`coordinator/core.py`), which asks this module what a policy allows.

- `none`: a task's inputs move when it starts on its peer. Use it when inputs are tiny, or
  to measure what prefetching buys.
- `lookahead` (default): every peer has up to `depth` tasks planned after the ones it runs;
  their inputs move while it computes. Best for bags of tasks whose inputs take about as
  long to move as to process.
- `eager`: every ready task is planned on a peer at once and its inputs move at once, and
  an input of a task still waiting moves as soon as its producer is done. Best when there
  is disk to spare and the LAN is idle most of the time.
- `critical-path`: lookahead, and the available inputs of waiting tasks on the longest
  remaining path move ahead of everything else. Best for deep DAGs with one long chain.

`max_bytes` bounds what is planned ahead on one peer (bytes still to move there);
`broadcast_min_consumers`: a file read by at least that many tasks is pushed to every
recruited peer up front, peer to peer (a doubling tree: each holder serves one new peer at
a time, the coordinator serves the first copy only).
"""

from __future__ import annotations

from dataclasses import dataclass

from bonjourgrid.errors import ConfigError

POLICIES = ("none", "lookahead", "eager", "critical-path")
DEFAULT_DEPTH = 2  # tasks planned ahead per peer under lookahead / critical-path
DEFAULT_MAX_BYTES = 4 * 1024**3  # bytes planned ahead per peer
DEFAULT_BROADCAST_MIN_CONSUMERS = 4


@dataclass(frozen=True)
class PrefetchSettings:
    """`--prefetch POLICY` and the `[prefetch]` table of bgrid.toml."""

    policy: str = "lookahead"
    depth: int = DEFAULT_DEPTH
    max_bytes: int = DEFAULT_MAX_BYTES
    broadcast_min_consumers: int = DEFAULT_BROADCAST_MIN_CONSUMERS  # 0: never broadcast

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(
                f"prefetch policy {self.policy!r} is not one of {', '.join(POLICIES)}"
            )
        if self.depth < 0:
            raise ConfigError(f"prefetch depth {self.depth} must be 0 or more")
        if self.max_bytes < 0:
            raise ConfigError(f"prefetch max_bytes {self.max_bytes} must be 0 or more")
        if self.broadcast_min_consumers < 0:
            raise ConfigError(
                f"prefetch broadcast_min_consumers {self.broadcast_min_consumers} must be 0 "
                "(never) or more"
            )

    @property
    def plans_ahead(self) -> bool:
        """Whether tasks are planned on peers before a slot is free for them."""
        return self.policy != "none" and (self.depth > 0 or self.policy == "eager")


@dataclass(frozen=True)
class DataOptions:
    """How a job moves its data: the prefetch policy and what comes back to the submitter."""

    prefetch: PrefetchSettings = PrefetchSettings()
    fetch_all: bool = False  # bring every output back, intermediates included (--fetch-all)
