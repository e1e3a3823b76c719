"""The Python API: build a workflow in code (or from a networkx graph) and run it.

    from bonjourgrid import Workflow, run

    wf = Workflow("hello", root=".")
    wf.task("greet", "echo hello > greeting.txt", outputs=["greeting.txt"])
    wf.task("shout", "tr a-z A-Z < greeting.txt > loud.txt",
            inputs=["greeting.txt"], outputs=["loud.txt"])
    report = run(wf, local=2)       # a typed Report; raises JobFailed if a task failed

Two workflow types, two roles. `bonjourgrid.Workflow` (this module) is a builder: it
collects tasks as the native mapping a YAML file would hold, and nothing about it is checked
until it is validated. `bonjourgrid.dag.Workflow` is the validated model the scheduler runs
(acyclic, every input produced or present, paths inside). `Workflow.validated()` turns the
first into the second through `workflow_from_mapping`, the same function every file format
goes through, so a check and its message live in one place.

`run` is `bgrid submit` without a terminal: the same options, the same engine
(`coordinator.submit.run_job`), but it prints nothing (notices go to the `bonjourgrid`
logger at INFO) and says how the job ended by its return value (a `Report`) or an exception
of the project's tree (errors.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bonjourgrid.errors import ConfigError, DagError, Interrupted, JobFailed
from bonjourgrid.job_report import Report

if TYPE_CHECKING:
    import networkx as nx

    from bonjourgrid.dag import model as dag_model

__all__ = ["Workflow", "run"]

log = logging.getLogger("bonjourgrid")

PathLike = str | os.PathLike[str]


class Workflow:
    """A workflow being built in code: tasks as the native format has them, checked on use.

    `name` is the job's name (as a file's `name:`); `root` the submit directory, where
    inputs no task produces are read and final outputs are written. `grid` and `defaults`
    are the file's sections of the same names; `more` takes its other top-level keys
    (such as `categories`) as they are.
    """

    def __init__(
        self,
        name: str = "workflow",
        root: PathLike = ".",
        *,
        grid: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
        **more: Any,
    ) -> None:
        self.name = name
        self.root = Path(root)
        self.grid = dict(grid) if grid else {}
        self.defaults = dict(defaults) if defaults else {}
        self.more = more  # other top-level keys, checked on use as the rest
        self.tasks: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, root={str(self.root)!r}, {len(self.tasks)} task(s))"

    def task(
        self,
        name: str,
        /,
        command: str | None = None,
        *,
        inputs: Iterable[str | Mapping[str, str]] = (),
        outputs: Iterable[str] = (),
        after: Iterable[str] = (),
        retries: int | None = None,
        require: str | None = None,
        env: Mapping[str, str] | None = None,
        limits: Mapping[str, Any] | None = None,
        **more: Any,
    ) -> Workflow:
        """Add a task (the keys of a task in a workflow file); returns the workflow, to chain.

        `more` takes the file's other task keys (keep, priority, pre, post...) as they are.
        A name given twice is a DagError at once; everything else is checked on use.
        """
        if name in self.tasks:
            raise DagError(f"workflow {self.name!r}: task {name!r} is defined twice")
        spec: dict[str, Any] = {}
        if command is not None:
            spec["command"] = command
        for key, items in (("inputs", inputs), ("outputs", outputs), ("after", after)):
            listed = [items] if isinstance(items, str) else list(items)
            if listed:
                spec[key] = listed
        for key, value in (("retries", retries), ("require", require)):
            if value is not None:
                spec[key] = value
        for key, mapping in (("env", env), ("limits", limits)):
            if mapping:
                spec[key] = dict(mapping)
        spec.update(more)
        self.tasks[name] = spec
        return self

    @classmethod
    def from_graph(
        cls,
        graph: nx.DiGraph,
        *,
        name: str | None = None,
        root: PathLike = ".",
        grid: Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
        **more: Any,
    ) -> Workflow:
        """A workflow of a `networkx.DiGraph`: a node is a task (its attributes are the task's
        keys: command, inputs, outputs...), an edge u -> v says v runs after u. The name is
        `name`, else the graph's "name" attribute."""
        named = name or str(graph.graph.get("name") or "workflow")
        built = cls(named, root, grid=grid, defaults=defaults, **more)
        for node, attributes in graph.nodes(data=True):
            if not isinstance(node, str):
                raise DagError(
                    f"graph node {node!r} is not a task name: name the nodes with strings "
                    "(networkx.relabel_nodes(G, str) does it)"
                )
            keys = dict(attributes)
            before = [str(u) for u in graph.predecessors(node)]
            given = keys.pop("after", ())
            given = [given] if isinstance(given, str) else list(given)
            after = list(dict.fromkeys([*before, *given]))
            built.task(node, after=after, **keys)
        return built

    @classmethod
    def load(cls, path: PathLike) -> Workflow:
        """A workflow file (any format `bgrid submit` reads), to change or run from code."""
        from bonjourgrid.coordinator.submit import load_submitted
        from bonjourgrid.dag.writer import workflow_to_mapping

        checked = load_submitted(Path(path))
        mapping = workflow_to_mapping(checked)
        name, tasks = mapping.pop("name"), mapping.pop("tasks")
        built = cls(name, checked.root, **mapping)
        for task_name, spec in tasks.items():
            built.task(task_name, **spec)
        return built

    def as_mapping(self) -> dict[str, Any]:
        """The workflow as the native file's mapping (`yaml.safe_dump` writes it as a file)."""
        mapping: dict[str, Any] = {"name": self.name}
        if self.grid:
            mapping["grid"] = dict(self.grid)
        mapping.update(self.more)
        if self.defaults:
            mapping["defaults"] = dict(self.defaults)
        mapping["tasks"] = {name: dict(spec) for name, spec in self.tasks.items()}
        return mapping

    def validated(self) -> dag_model.Workflow:
        """The validated workflow the scheduler runs; DagError naming every problem."""
        from bonjourgrid.dag import workflow_from_mapping

        return workflow_from_mapping(
            self.as_mapping(), self.root.resolve(), source=f"workflow {self.name!r}"
        )

    def digest(self) -> str:
        """SHA-256 of the canonical mapping: a journal's "the workflow changed" test."""
        text = json.dumps(self.as_mapping(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def run(
    workflow: Workflow | nx.DiGraph | PathLike,
    *,
    local: int | None = None,
    workers: int | tuple[int, int] | str | None = None,
    require: str | None = None,
    max_cost: float | None = None,
    insecure: bool = False,
    interface: str | None = None,
    backend: str = "native",
    pool: str | None = None,
    prefetch: str | None = None,
    prefetch_depth: int | None = None,
    fetch_all: bool | None = None,
    quorum: int | None = None,
    peer_timeout: float | None = None,
    lease: float | None = None,
    resume: bool = False,
    report: PathLike | None = None,
    check: bool = True,
) -> Report:
    """Run a workflow on the grid, as `bgrid submit` would; its Report.

    `workflow` is a built `Workflow`, a `networkx.DiGraph` (as `Workflow.from_graph(G)`,
    in the current directory) or the path of a workflow file.

    The options are `bgrid submit`'s flags: `local=N` runs on N worker daemons started on
    this machine; `workers` is a count (at most), (min, max) or "min..max"; `quorum=N` runs
    each task on N distinct peers and keeps outputs a majority agrees on; `report` writes
    the report file too (JSON, or a page if it ends in .html). It prints nothing.

    Raises DagError, ConfigError, StageError, RecruitError... before any task runs (as
    `bgrid submit` exits 2 or 3), JobFailed (carrying `.report`) when the job ran but did
    not succeed, unless `check=False`, and Interrupted on SIGINT/SIGTERM (with `.report`
    once tasks ran: the job was cancelled and its peers released). Signals are caught only
    when called on the main thread. Inside a running event loop it refuses (ConfigError):
    call it from a thread, `await asyncio.to_thread(run, wf, ...)`.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # no loop here: run() starts its own
    else:
        raise ConfigError(
            "bonjourgrid.run() was called inside a running event loop, which it cannot share; "
            "run it in a thread: await asyncio.to_thread(bonjourgrid.run, workflow, ...)"
        )
    if not isinstance(workflow, Workflow | str | os.PathLike):
        import networkx as nx

        if not isinstance(workflow, nx.DiGraph):
            raise DagError(
                f"run() takes a Workflow, a networkx.DiGraph or a workflow file's path, "
                f"not {type(workflow).__name__!r}"
            )
        workflow = Workflow.from_graph(workflow)
    from bonjourgrid.coordinator.journal import workflow_digest
    from bonjourgrid.coordinator.submit import (
        JobSource,
        SubmitOptions,
        load_submitted,
        run_job,
        signals_interrupt,
    )
    from bonjourgrid.fdlimit import raise_open_file_limit

    opts = SubmitOptions(
        workflow=None if isinstance(workflow, Workflow) else Path(workflow),
        workers=_worker_range(workers),
        require=require,
        max_cost=max_cost,
        local=local,
        insecure=insecure,
        interface=interface,
        report=Path(report) if report is not None else None,
        quiet=True,
        resume=resume,
        peer_timeout=peer_timeout,
        lease=lease,
        prefetch=prefetch,
        prefetch_depth=prefetch_depth,
        fetch_all=fetch_all,
        quorum=quorum,
        backend=backend,
        backend_options={"pool": pool} if pool else {},
    )
    raise_open_file_limit()  # one descriptor per peer connection and staged file
    with signals_interrupt():
        if isinstance(workflow, Workflow):
            source = JobSource(workflow.validated(), workflow.digest())
        else:
            path = Path(workflow)
            source = JobSource(load_submitted(path), workflow_digest(path), path)
        raw = run_job(source, opts, notify=log.info, display=None)
    result = Report.from_dict(raw, copy_data=False)
    if result.signal is not None and result.signal in signal.Signals.__members__:
        raise Interrupted(
            signal.Signals[result.signal], "while running tasks: the job was cancelled", result
        )
    if check and result.exit_status != 0:
        raise JobFailed(result)
    return result


def _worker_range(workers: int | tuple[int, int] | str | None) -> tuple[int, int] | None:
    """`workers` as `bgrid submit --workers` reads it: N (1..N), (MIN, MAX) or "MIN..MAX"."""
    from bonjourgrid.coordinator.submit import parse_workers

    if workers is None:
        return None
    if isinstance(workers, tuple):
        low, high = workers
        return parse_workers(f"{low}..{high}")
    return parse_workers(str(workers))
