"""A DAG run by a middleware that holds its edges (`capabilities.dependencies == "middleware"`,
HTCondor's DAGMan): what the shell hands it, and what it makes of a finished run.

The whole DAG goes at once, after the deployment: one `JobPlan` with a run per task left to
do, each with its parents and retries and no peer (the middleware places the runs). A
resumed job's kept tasks are left out, and so are the edges to them: their outputs are in
the submit directory, where the middleware's file transfer finds them. An input that another
run of the plan makes has no known content yet (`NOT_MADE_YET`).

Such a middleware moves its own data (`data=False`): a finished run's outputs are in the
submit directory. The journal (for `--resume`) and the report need their FileRefs: they are
hashed there, off the event loop; a declared output that is not there fails the attempt.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from bonjourgrid.backends.base import NOT_MADE_YET, HeldPeer, JobPlan, StagedInput, TaskRun
from bonjourgrid.cache.store import FileRef, hash_file
from bonjourgrid.coordinator import core
from bonjourgrid.dag import Workflow


def job_plan(
    workflow: Workflow,
    job: str,
    peers: Sequence[HeldPeer],
    kept: Collection[str],
    input_ref: Callable[[str], FileRef | None],
    coordinator: str,
) -> JobPlan:
    """The plan of every task not in `kept`; `input_ref` gives an input's content if known."""
    runs = []
    for name, spec in workflow.tasks.items():
        if name in kept:
            continue
        runs.append(
            TaskRun(
                task=name,
                attempt=1,
                peer=None,
                command=spec.command,
                inputs=tuple(
                    StagedInput(path, input_ref(path) or NOT_MADE_YET) for path in spec.inputs
                ),
                outputs=spec.outputs,
                env=spec.env,
                limits=spec.limits,
                parents=tuple(p for p in workflow.graph.predecessors(name) if p not in kept),
                retries=spec.retries,
            )
        )
    return JobPlan(job, workflow.root, tuple(peers), tuple(runs), coordinator)


async def with_outputs(
    report: core.TaskReported, root: Path, outputs: Sequence[str]
) -> core.TaskReported:
    """A successful run's report with its declared outputs, hashed in the submit directory;
    with an error instead when one is not there (exit code 0 stays: the middleware counted
    the run a success)."""
    if report.exit_code != 0 or report.error:
        return report
    try:
        refs = await asyncio.to_thread(_hash_outputs, root, outputs)
    except OSError as err:
        return dataclasses.replace(report, error=str(err), outputs=())
    return dataclasses.replace(report, outputs=refs)


def _hash_outputs(root: Path, outputs: Sequence[str]) -> tuple[tuple[str, FileRef], ...]:
    refs = []
    for path in outputs:
        if not (root / path).is_file():
            raise FileNotFoundError(
                f"declared output {path} is not in the submit directory {root} after the run "
                "(the task did not write it, or the middleware did not bring it back)"
            )
        try:
            refs.append((path, hash_file(root / path)))
        except OSError as err:
            raise OSError(f"cannot read output {path} in {root}: {err}") from None
    return tuple(refs)
