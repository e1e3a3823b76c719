"""What pre and post scripts cost a job: N `true` tasks on `bgrid submit --local 2`, plain,
with `pre: "true"`, and with `pre: "true"` and `post: "true"`, interleaved.

The scripts run on the submitting host (coordinator/scripts.py), at most 20 of each kind at
once; a post also has its task's outputs collected first (here there are none). The figure
is the report's makespan (first dispatch to last task done) per variant, median and range
over the repeats, and the extra milliseconds per task against the plain run.

    .venv/bin/python benchmarks/script_overhead.py                     # 100 tasks, 3 repeats
    .venv/bin/python benchmarks/script_overhead.py --tasks 500 --repeats 5 --json scripts.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from workflows import submit_local_json  # benchmarks/ is on the path: run as a script

BGRID = [sys.executable, "-m", "bonjourgrid.cli"]
VARIANTS = {
    "plain": {},
    "pre": {"pre": "true"},
    "pre+post": {"pre": "true", "post": "true"},
}


def makespan(directory: Path, tasks: int, scripts: dict[str, str]) -> float:
    workflow = {
        "name": "scripts",
        "tasks": {f"t{i:05d}": {"command": "true", **scripts} for i in range(tasks)},
    }
    (directory / "wf.json").write_text(json.dumps(workflow))
    return float(submit_local_json(directory, "wf.json")["makespan_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    spans: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bgrid-scripts-") as tmp:
        home = Path(tmp) / "home"  # a grid key of its own: the user's config is left alone
        os.environ["XDG_CONFIG_HOME"] = str(home / "config")
        os.environ["XDG_CACHE_HOME"] = str(home / "cache")
        subprocess.run([*BGRID, "keys", "init"], capture_output=True, check=True)
        for _ in range(args.repeats):
            for name, scripts in VARIANTS.items():  # interleaved: A, B, C, A, B, C ...
                directory = Path(tmp) / f"{name}-{len(spans[name])}"
                directory.mkdir()
                spans[name].append(makespan(directory, args.tasks, scripts))
    plain = statistics.median(spans["plain"])
    result = {}
    for name, values in spans.items():
        median = statistics.median(values)
        result[name] = {
            "makespan_s": median,
            "min_s": min(values),
            "max_s": max(values),
            "extra_ms_per_task": 1000 * (median - plain) / args.tasks,
        }
        print(
            f"{name:9s} tasks={args.tasks} makespan_s={median:.3f} "
            f"({min(values):.3f}-{max(values):.3f}) "
            f"extra_ms_per_task={result[name]['extra_ms_per_task']:.2f} "
            f"load={os.getloadavg()[0]:.2f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
