"""Issue 13, "owners lose nothing and jobs lose nothing": suspend against kill.

Real `bgrid worker` daemons on 127.0.0.1 with a throwaway grid key: a desktop `desk`
(cost 0, watching its owner through `--activity-file`, `--max-load 1`, idle again
`--owner-s` seconds after the owner's last input) and a dedicated `spare` (cost 1,
`--always-idle`). One-task jobs (`--workers 1..1`, so the cheaper desk runs it) count
`--steps` steps of 0.1 s, one line each in a progress file, naming their pid. Halfway, the
owner touches the activity file (the owner's input), and stays `--owner-s` seconds.

Three modes, interleaved trial by trial (the desk restarted with the mode's flags between
trials, outside the measure):
- `none`: the owner never comes: the job's makespan without an owner;
- `suspend`: `--vacate-after 600` (the default): the task's process group is stopped, then
  continued when the owner is away again;
- `kill`: `--vacate-after 0` (the peer before issue 13): the task is killed and runs again
  from the start on the spare.

Per trial: the CPU-release time (from the touch to every process of the task's group in
state T, or gone, polled every millisecond from /proc), the makespan (the report's), and
the steps done twice (progress lines beyond `--steps`: work thrown away). Then medians and
ranges per mode, and the load average.

    .venv/bin/python benchmarks/owner_suspend.py --repeats 5 --json owner.json

Figures only: the machine's load moves them; compare modes of one interleaved run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent)]  # tests/multiproc/conftest.py

from tests.multiproc.conftest import LOOPBACK, Grid, bgrid_cmd  # noqa: E402

MODES = {"none": "600", "suspend": "600", "kill": "0"}  # mode -> --vacate-after
BASE_MODE = "base-kill"  # --base: the desk runs the other environment's code (no suspend)
STEP_S = 0.1
COUNTER = f"""
import os, sys, time
with open(sys.argv[1], "a") as progress:
    for step in range(int(sys.argv[2])):
        progress.write(f"{{os.getpid()}} {{step}}\\n")
        progress.flush()
        time.sleep({STEP_S})
open("t.txt", "w").write("ok\\n")
"""


def group_state(pgid: int) -> str:
    """ "gone", "stopped" (every live process of the group in state T) or "running"."""
    states = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            states.append(fields[0])
    if not states:
        return "gone"
    return "stopped" if all(s == "T" for s in states) else "running"


def task_pid(progress: Path) -> int:
    return int(progress.read_text().split()[0])


def start_desk(grid: Grid, name: str, flags: list[str], base: str | None) -> str:
    """The desk: this tree's worker, or with `base` that python's (`-P`: its own package)."""
    if base is None:
        return grid.start_worker(name, *flags)
    full = f"{name}-{grid.tag}"
    with open(grid.root / f"{full}.log", "wb") as log:
        command = [base, "-P", "-m", "bonjourgrid.cli", "worker", "--name", full]
        grid.procs[full] = subprocess.Popen(
            [*command, "--interface", LOOPBACK, *flags],
            env=grid.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return full


def trial(grid: Grid, root: Path, mode: str, args: argparse.Namespace, n: int) -> dict[str, Any]:
    steps, owner_s = args.steps, args.owner_s
    activity = root / f"owner-{n}"
    flags = ["--no-always-idle", "--activity-file", str(activity), "--max-load", "1"]
    flags += ["--idle-minutes", str(owner_s / 60), "--cost", "0"]
    if mode != BASE_MODE:
        flags += ["--vacate-after", MODES[mode]]
    desk = start_desk(grid, f"desk{n}", flags, args.base if mode == BASE_MODE else None)
    grid.wait_peers(lambda ps: ps.get(desk, {}).get("state") == "idle", timeout=20)
    work = root / f"job-{n}"
    work.mkdir()
    progress = work / "progress"
    (work / "counter.py").write_text(COUNTER)
    (work / "wf.yaml").write_text(
        "tasks:\n  t:\n"
        f"    command: {sys.executable} {work / 'counter.py'} {progress} {steps}\n"
        "    outputs: [t.txt]\n"
    )
    submit = ["submit", str(work / "wf.yaml"), "--interface", LOOPBACK, "--workers", "1..1"]
    job = subprocess.Popen(
        bgrid_cmd(*submit, "--quiet", "--report", str(work / "report.json")),
        env=grid.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    release_s = None
    try:
        while not progress.exists() or len(progress.read_text().splitlines()) < steps // 2:
            if job.poll() is not None:
                raise SystemExit(f"the job ended early: {job.stderr.read() if job.stderr else ''}")
            time.sleep(0.01)
        pgid = os.getpgid(task_pid(progress))  # the task's shell leads it; python is in it
        if mode != "none":
            activity.touch()  # the owner's input
            touched = time.monotonic()
            while group_state(pgid) == "running":
                time.sleep(0.001)
            release_s = time.monotonic() - touched
        _, stderr = job.communicate(timeout=steps * STEP_S * 4 + 60)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        grid.procs.pop(desk).terminate()
    if job.returncode != 0:
        raise SystemExit(f"{mode}: the job failed: {stderr}")
    report = json.loads((work / "report.json").read_text())
    task = report["tasks"]["t"]
    lines = progress.read_text().splitlines()
    return {
        "mode": mode,
        "cpu_release_s": release_s,
        "makespan_s": report["makespan_s"],
        "steps_redone": len(lines) - steps,
        "attempts": task["attempts"],
        "suspensions": task.get("suspensions", 0),
        "peer": "desk" if task["peer"] == desk else "spare",
    }


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} [{min(values):.3f}..{max(values):.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="trials per mode")
    parser.add_argument("--steps", type=int, default=60, help="steps of 0.1 s per task")
    parser.add_argument("--owner-s", type=float, default=3.0, help="how long the owner stays")
    parser.add_argument(
        "--base",
        metavar="PYTHON",
        help=f"also mode {BASE_MODE}: the desk runs this python's bgrid (a worktree of main)",
    )
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bgrid-owner-bench-"))
    grid = Grid(root)
    grid.init_key()
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    modes = [*MODES, BASE_MODE] if args.base else list(MODES)
    try:
        grid.start_worker("spare", "--cost", "1")
        n = 0
        for _ in range(args.repeats):
            for mode in modes:
                n += 1
                result = trial(grid, root, mode, args, n)
                results.append(result)
                print(json.dumps(result), flush=True)
    finally:
        grid.stop()
    print(
        f"\n{args.steps} steps of {STEP_S} s, owner back halfway for {args.owner_s:g} s, "
        f"{args.repeats} trials per mode; median [range]"
    )
    print(f"{'mode':<9} {'CPU release s':>24} {'makespan s':>24} {'steps redone':>14}")
    for mode in modes:
        of = [r for r in results if r["mode"] == mode]
        release = [r["cpu_release_s"] for r in of if r["cpu_release_s"] is not None]
        redone = statistics.median([r["steps_redone"] for r in of])
        print(
            f"{mode:<9} {summary(release):>24} {summary([r['makespan_s'] for r in of]):>24} "
            f"{redone:>14g}"
        )
    print(f"load average before {load_before}, after {os.getloadavg()}")
    if args.json:
        figures = {"results": results, "load_before": load_before, "load_after": os.getloadavg()}
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
