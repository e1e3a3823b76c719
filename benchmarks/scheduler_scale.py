"""How fast the pure scheduler core decides, at scale: a simulated run of a large DAG.

Drives `SchedulerCore` exactly as the shell does (PeerJoined, TaskReported, OutputsCollected)
with simulated peers and zero-length tasks, so the figure is the core's own cost per task.

    .venv/bin/python benchmarks/scheduler_scale.py --tasks 100000 --peers 1000 --cpus 4
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque

from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator import core

REF = FileRef("0" * 64, 1)


def layered_dag(n_tasks: int, width: int) -> list[tuple[str, list[str], str, int]]:
    """Layers of `width` tasks, each reading two tasks of the layer before (a wavefront)."""
    tasks = []
    for i in range(n_tasks):
        layer, pos = divmod(i, width)
        deps = (
            []
            if layer == 0
            else sorted(
                {f"t{(layer - 1) * width + pos}", f"t{(layer - 1) * width + (pos + 1) % width}"}
            )
        )
        tasks.append((f"t{i}", deps, "", 0))
    return tasks


def simulate(n_tasks: int, n_peers: int, cpus: int, width: int) -> dict[str, float]:
    start = time.perf_counter()
    sched = core.SchedulerCore(layered_dag(n_tasks, width))
    built = time.perf_counter()
    pending: deque[core.Dispatch] = deque()
    now = 0.0
    for p in range(n_peers):
        pending.extend(
            i
            for i in sched.handle(core.PeerJoined(f"p{p}", cpus, {}), now)
            if isinstance(i, core.Dispatch)
        )
    events = 0
    while pending:
        d = pending.popleft()
        now += 0.001
        out = sched.handle(core.TaskReported(d.peer, d.task, d.attempt, 0, "", (("f", REF),)), now)
        out += sched.handle(core.OutputsCollected(d.task, d.attempt), now)
        events += 2
        pending.extend(i for i in out if isinstance(i, core.Dispatch))
    done = time.perf_counter()
    assert sched.finished is not None and sched.finished.status == "succeeded"
    sched.validate_state()
    return {
        "tasks": n_tasks,
        "peers": n_peers,
        "cpus": cpus,
        "build_s": round(built - start, 3),
        "run_s": round(done - built, 3),
        "us_per_event": round((done - built) / events * 1e6, 1),
        "tasks_per_s": round(n_tasks / (done - built)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--cpus", type=int, default=4)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    result = simulate(args.tasks, args.peers, args.cpus, args.width)
    print(" ".join(f"{k}={v}" for k, v in result.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
