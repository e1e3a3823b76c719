"""What a speculative copy saves a job with a straggler: `bgrid submit --local 2` of N quick
siblings and one task whose first attempt is slow (a desktop gone slow), speculation off
(the default) and on (`[schedule]` in bgrid.toml), interleaved.

Off, the job waits for the slow run; on, a copy runs on the idle peer once the slow run has
taken `--factor` x its siblings' median (and `--min-s`), and the first run to exit 0 wins.
The figure is the report's makespan per variant (median and range over the repeats), and
whether the copy won.

    .venv/bin/python benchmarks/speculation.py                    # slow run 20 s, 3 repeats
    .venv/bin/python benchmarks/speculation.py --slow-s 60 --repeats 5 --json spec.json
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
from typing import Any

from workflows import submit_local_json  # benchmarks/ is on the path: run as a script

BGRID = [sys.executable, "-m", "bonjourgrid.cli"]


def run(directory: Path, args: argparse.Namespace, speculate: bool) -> dict[str, Any]:
    tasks: dict[str, Any] = {
        f"s{i}": {"command": f"sleep {args.task_s}; echo {i} > s{i}.txt", "outputs": [f"s{i}.txt"]}
        for i in range(args.siblings)
    }
    tasks["slow"] = {  # slow on its first attempt only: any copy is quick
        "command": f'if [ "$BGRID_ATTEMPT" = 1 ]; then sleep {args.slow_s}; fi; '
        f"sleep {args.task_s}; echo done > slow.txt",
        "outputs": ["slow.txt"],
    }
    (directory / "wf.json").write_text(json.dumps({"name": "straggler", "tasks": tasks}))
    if speculate:
        (directory / "bgrid.toml").write_text(
            f"[schedule]\nspeculation_factor = {args.factor}\n"
            f"speculation_min_s = {args.min_s}\nspeculation_min_siblings = 3\n"
        )
    return submit_local_json(directory, "wf.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--siblings", type=int, default=6)
    parser.add_argument("--task-s", type=float, default=0.5, help="a sibling's run time")
    parser.add_argument("--slow-s", type=float, default=20.0, help="the slow run's extra time")
    parser.add_argument("--factor", type=float, default=3.0)
    parser.add_argument("--min-s", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    spans: dict[str, list[float]] = {"off": [], "on": []}
    copy_won = 0
    with tempfile.TemporaryDirectory(prefix="bgrid-speculation-") as tmp:
        home = Path(tmp) / "home"  # a grid key of its own: the user's config is left alone
        os.environ["XDG_CONFIG_HOME"] = str(home / "config")
        os.environ["XDG_CACHE_HOME"] = str(home / "cache")
        subprocess.run([*BGRID, "keys", "init"], capture_output=True, check=True)
        for _ in range(args.repeats):
            for name in ("off", "on"):  # interleaved: off, on, off, on ...
                directory = Path(tmp) / f"{name}-{len(spans[name])}"
                directory.mkdir()
                report = run(directory, args, speculate=name == "on")
                spans[name].append(float(report["makespan_s"]))
                copy_won += str(report["tasks"]["slow"].get("won", "")).startswith("a copy")
    result = {}
    for name, values in spans.items():
        median = statistics.median(values)
        result[name] = {"makespan_s": median, "min_s": min(values), "max_s": max(values)}
        print(
            f"speculation={name:3s} siblings={args.siblings} slow_s={args.slow_s:g} "
            f"makespan_s={median:.2f} ({min(values):.2f}-{max(values):.2f}) "
            f"load={os.getloadavg()[0]:.2f}"
        )
    saved = result["off"]["makespan_s"] - result["on"]["makespan_s"]
    print(f"saved_s={saved:.2f} copy_won={copy_won}/{args.repeats}")
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "saved_s": saved}, indent=2) + "\n")


if __name__ == "__main__":
    main()
