"""How long a run that a worker refuses takes to become a failed attempt.

Runs a coordinator in this process against one real `bgrid worker` (the embedded local grid
on 127.0.0.1). Its one task carries a command over the wire's 64 KiB string limit, set past
the loader (which refuses it) as a coordinator with a bug would send it: the worker cannot
read the run, answers `refused` naming the attempt, and the coordinator fails the attempt.
The figure is the task's `end - start` in the report: from the dispatch of the `run` to the
failed attempt. (A run that is never acknowledged fails after `RUN_ACK_TIMEOUT_S`, by design.)

    .venv/bin/python benchmarks/refused_run.py --repeats 5

Target (issue 8): a refused run never leaves its task running; it fails within a round trip.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

from bonjourgrid import wire
from bonjourgrid.coordinator.peers import RUN_ACK_TIMEOUT_S
from bonjourgrid.coordinator.recruit import needs_from
from bonjourgrid.coordinator.shell import Coordinator
from bonjourgrid.coordinator.submit import admission
from bonjourgrid.dag import load_workflow
from bonjourgrid.worker.local import LOOPBACK, LocalGrid


def refused_once(cluster: LocalGrid, directory: Path) -> float:
    """Seconds from the dispatch of a refused run to its failed attempt."""
    task = {"command": "true", "outputs": ["never.txt"]}
    (directory / "wf.json").write_text(json.dumps({"name": "refused", "tasks": {"big": task}}))
    workflow = load_workflow(directory / "wf.json")
    big = "true " + "x" * (wire.MAX_STRING + 10)
    workflow.tasks["big"] = dataclasses.replace(workflow.tasks["big"], command=big)
    needs = needs_from(
        workflow, cluster.grid.fingerprint, None, None, (1, 1), admission(cluster.grid)
    )
    coordinator = Coordinator(
        workflow, needs, cluster.grid, interface=LOOPBACK, expected_peers=cluster.n_workers
    )
    report = asyncio.run(coordinator.run())
    entry = report["tasks"]["big"]
    if entry["status"] != "failed" or "refused the run" not in entry["error"]:
        raise SystemExit(f"the run was not refused as expected: {entry}")
    return float(entry["end"]) - float(entry["start"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="submits (default 5)")
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    args = ap.parse_args()
    with LocalGrid(1) as cluster, tempfile.TemporaryDirectory(prefix="bgrid-refused-") as tmp:
        figures = []
        for i in range(args.repeats):
            directory = Path(tmp) / f"run-{i}"
            directory.mkdir()
            figures.append(refused_once(cluster, directory))
    result = {
        "refused_to_failed_ms": [round(s * 1000, 2) for s in figures],
        "median_ms": round(statistics.median(figures) * 1000, 2),
        "never_acknowledged_s": RUN_ACK_TIMEOUT_S,
    }
    print(
        f"refused run -> failed attempt: median {result['median_ms']} ms over {args.repeats} "
        f"submits ({', '.join(f'{ms:g}' for ms in result['refused_to_failed_ms'])} ms); a run "
        f"never acknowledged fails after {RUN_ACK_TIMEOUT_S:g} s"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
