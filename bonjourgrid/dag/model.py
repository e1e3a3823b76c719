"""The workflow as the scheduler sees it: validated tasks, the file-flow graph, the grid section."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import networkx as nx

__all__ = ["NO_MAPPING", "AbortOn", "GridSpec", "TaskSpec", "Workflow", "normalize_path"]

RANKS = ("cost", "cpus")  # values of `grid.rank`; cost is the default


def normalize_path(path: object) -> str:
    """`path` as a normalized relative POSIX path inside the task directory; else ValueError."""
    # fast path first: a 100,000-task workflow has 200,000 paths, nearly all of them fine
    if isinstance(path, str) and path and path[0] not in "/~" and "\0" not in path:
        normal = posixpath.normpath(path)
        if normal != "." and normal != ".." and not normal.startswith("../"):
            return normal
    if not isinstance(path, str):
        raise ValueError(f"{path!r} is not a path; write it as a string")
    if not path:
        raise ValueError("an empty path names no file")
    if "\0" in path:
        raise ValueError(f"{path!r} contains a NUL character")
    if path.startswith("~"):
        raise ValueError(f"{path!r} is relative to a home directory; use a relative path")
    if path.startswith("/"):
        raise ValueError(f"{path!r} is absolute; use a path relative to the submit directory")
    normal = posixpath.normpath(path)
    if normal == ".":
        raise ValueError(f"{path!r} names the task directory itself, not a file")
    if normal == ".." or normal.startswith("../"):
        raise ValueError(f"{path!r} escapes the task directory; remove the '..'")
    return normal


# One read-only empty mapping for every task without env or limits (most of them): a
# 100,000-task workflow would otherwise hold 200,000 empty dicts and their proxies.
NO_MAPPING: Mapping[str, Any] = MappingProxyType({})


def _empty_env() -> Mapping[str, str]:
    return NO_MAPPING


def _empty_limits() -> Mapping[str, int]:
    return NO_MAPPING


@dataclass(frozen=True, slots=True)
class AbortOn:
    """`abort_on:` the exit code of the task's command that stops the whole job, and the
    exit status `bgrid submit` then ends with (DAGMan's ABORT-DAG-ON ... RETURN)."""

    exit: int
    status: int


@dataclass(frozen=True, slots=True)  # 100,000s of them live through a job
class TaskSpec:
    """One task: a shell command run with cwd = its sandbox, reading and writing relative paths."""

    name: str
    command: str
    inputs: tuple[str, ...]  # normalized relative POSIX paths
    outputs: tuple[str, ...]
    after: tuple[str, ...] = ()
    retries: int = 0
    require: str | None = None  # a requirement expression, already checked to parse
    env: Mapping[str, str] = field(default_factory=_empty_env, hash=False)
    keep: bool = False  # reserved for caching work
    # Resource limits of the task, as sent on the wire: per process "cpu_s" (whole seconds of
    # CPU time) and "memory" (bytes of address space); for the whole task "wall_s" (whole
    # seconds from its start); a key left out is unlimited.
    limits: Mapping[str, int] = field(default_factory=_empty_limits, hash=False)
    # Node semantics (DAGMan's PRIORITY, CATEGORY, RETRY UNLESS-EXIT, ABORT-DAG-ON, FINAL,
    # NOOP); the defaults change nothing. See the README's workflow reference.
    priority: int = 0  # higher goes first among ready tasks, before the critical path
    category: str | None = None  # at most `Workflow.categories[category]` of it run at once
    retry_unless_exit: int | None = None  # an attempt exiting with it fails the task for good
    abort_on: AbortOn | None = None  # an attempt exiting with `abort_on.exit` stops the job
    final: bool = False  # runs once every other task has ended, whatever their outcome
    noop: bool = False  # its command is not run: done once ready (command is "")
    # Runs on distinct peers whose outputs must agree (None: not said, `--quorum` decides;
    # 1: one run, the opt-out of a non-deterministic task). coordinator/copies.py.
    quorum: int | None = None
    # DAGMan's SCRIPT PRE/POST: shell commands run on the coordinator's host, in the submit
    # directory joined with `script_dir` (README: "Pre and post scripts").
    pre: str | None = None
    post: str | None = None
    script_dir: str = "."  # normalized, relative to the submit directory
    pre_skip: int | None = None  # a pre exiting with this: done, neither command nor post run
    stdout: str | None = None  # the last attempt's stdout copied to this submit-dir path
    stderr: str | None = None

    def __post_init__(self) -> None:
        # a frozen record must not share a dict its builder may still mutate
        if not isinstance(self.env, MappingProxyType):
            object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        if not isinstance(self.limits, MappingProxyType):
            object.__setattr__(self, "limits", MappingProxyType(dict(self.limits)))


@dataclass(frozen=True)
class GridSpec:
    """The workflow's `grid:` section; None means "not said, use the default"."""

    workers_min: int | None = None
    workers_max: int | None = None
    require: str | None = None
    max_cost: float | None = None
    rank: str | None = None  # "cost" (default) or "cpus"


@dataclass
class Workflow:
    """A validated workflow: acyclic, every input produced or present, every path inside."""

    name: str
    root: Path  # the submit directory: inputs nobody produces are read from here
    tasks: dict[str, TaskSpec]
    graph: nx.DiGraph  # node = task name; edge u->v when v needs u (edge data "files": list)
    producer: dict[str, str]  # output path -> the task that writes it
    grid: GridSpec = field(default_factory=GridSpec)
    urls: dict[str, str] = field(default_factory=dict)  # input path -> the URL it comes from
    # category -> how many of its tasks may run at once (None: no limit), every category
    # that a task names or the top-level `categories:` lists
    categories: dict[str, int | None] = field(default_factory=dict)

    @property
    def final_task(self) -> str | None:
        """The task marked `final: true`, if any (at most one)."""
        return next((name for name, task in self.tasks.items() if task.final), None)

    # Inputs no task produces, absent from `root` when the workflow was read, and read only by
    # tasks with a pre script: their pre makes them (hashed after it, not staged before).
    pre_made: frozenset[str] = frozenset()

    def source_inputs(self) -> list[str]:
        """Inputs no task produces (from `root`, or from `urls` for those listed there), sorted;
        without those a pre script makes (`pre_made`)."""
        return sorted(
            {path for task in self.tasks.values() for path in task.inputs}
            - self.producer.keys()
            - self.pre_made
        )

    def final_outputs(self) -> list[str]:
        """Outputs no task consumes (returned to `root`), sorted."""
        consumed = {path for task in self.tasks.values() for path in task.inputs}
        return sorted(self.producer.keys() - consumed)

    def topological_order(self) -> list[str]:
        """Every task after the tasks it needs; ties keep the order of the workflow file."""
        position = {name: index for index, name in enumerate(self.tasks)}
        return list(nx.lexicographical_topological_sort(self.graph, key=position.__getitem__))
