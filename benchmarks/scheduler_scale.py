"""How fast the pure scheduler core decides, at scale: a simulated run of a large DAG.

Drives `SchedulerCore` exactly as the shell does (PeerJoined, TaskReported, OutputsCollected)
with simulated peers and zero-length tasks, so the figure is the core's own cost per task.
With `--data POLICY` every task also reads the files its predecessors wrote (the first layer
reads source files), intermediates stay on peers, and prefetches arrive at once: the cost of
data-aware placement and of the prefetch policy.

A decision is a placement (a `Dispatch`): decisions/s is placements per second of the run,
wall clock (`decisions_per_s`) and CPU time of this process (`cpu_decisions_per_s`, less
sensitive to other load on the machine). The time includes making the simulated events.
By default it runs with 1,000 and then 10,000 peers (`--peers` takes a list).

    .venv/bin/python benchmarks/scheduler_scale.py       # 100k tasks; 1k, then 10k peers
    .venv/bin/python benchmarks/scheduler_scale.py --data lookahead
    .venv/bin/python benchmarks/scheduler_scale.py --tasks 30000 --peers 10000 --cpus 4
"""

from __future__ import annotations

import argparse
import json
import time
from collections import deque

from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator import core
from bonjourgrid.coordinator.prefetch import PrefetchSettings

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


def ref(name: str) -> FileRef:
    return FileRef(f"{hash(name) & (2**256 - 1):064x}", 1000)


def with_files(
    tasks: list[tuple[str, list[str], str, int]],
) -> tuple[dict[str, core.TaskData], dict[str, FileRef]]:
    """Each task writes f<name> and reads its predecessors' files (or a source file)."""
    data = {}
    sources = {}
    read = {dep for _, deps, _, _ in tasks for dep in deps}
    for name, deps, _, _ in tasks:
        inputs = [f"f{d}" for d in deps] or [f"src{name}"]
        if not deps:
            sources[f"src{name}"] = ref(f"src{name}")
        data[name] = core.TaskData(tuple(inputs), (f"f{name}",), collect=name not in read)
    return data, sources


def simulate(
    n_tasks: int, n_peers: int, cpus: int, width: int, policy: str | None = None
) -> dict[str, float | str]:
    start = time.perf_counter()
    cpu_start = time.process_time()
    tasks = layered_dag(n_tasks, width)
    kwargs = {}
    if policy is not None:
        data, sources = with_files(tasks)
        kwargs = {"data": data, "sources": sources, "prefetch": PrefetchSettings(policy)}
    sched = core.SchedulerCore(tasks, **kwargs)  # type: ignore[arg-type]
    built = time.perf_counter()
    cpu_built = time.process_time()
    pending: deque[core.Instruction] = deque()
    now = 0.0
    for p in range(n_peers):
        pending.extend(sched.handle(core.PeerJoined(f"p{p}", cpus, {}), now))
    events = 0
    decisions = 0
    while pending:
        i = pending.popleft()
        now += 0.001
        match i:
            case core.Dispatch(task, peer, attempt):
                decisions += 1
                outputs = ((f"f{task}", ref(f"f{task}")),)
                out = sched.handle(core.TaskReported(peer, task, attempt, 0, "", outputs), now)
            case core.Collect(task, _, attempt, _):
                out = sched.handle(core.OutputsCollected(task, attempt), now)
            case core.Prefetch(peer, files, _):
                out = []
                for file_ref, _ in files:
                    out += sched.handle(core.FileArrived(peer, file_ref.digest), now)
            case _:
                continue
        events += 1
        pending.extend(out)
    done = time.perf_counter()
    cpu_done = time.process_time()
    assert sched.finished is not None and sched.finished.status == "succeeded"
    sched.validate_state()
    return {
        "data": policy or "off",
        "tasks": n_tasks,
        "peers": n_peers,
        "cpus": cpus,
        "build_s": round(built - start, 3),
        "run_s": round(done - built, 3),
        "us_per_event": round((done - built) / events * 1e6, 1),
        "tasks_per_s": round(n_tasks / (done - built)),
        "decisions_per_s": round(decisions / (done - built)),
        "cpu_decisions_per_s": round(decisions / (cpu_done - cpu_built)),
        "build_cpu_s": round(cpu_built - cpu_start, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--peers", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--cpus", type=int, default=4)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument(
        "--data", metavar="POLICY", help="files and this prefetch policy (e.g. lookahead)"
    )
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    results = []
    for peers in args.peers:
        result = simulate(args.tasks, peers, args.cpus, args.width, args.data)
        print(" ".join(f"{k}={v}" for k, v in result.items()), flush=True)
        results.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
