"""Launch -> first task: how long `bgrid submit` takes to dispatch its first task.

Measured from the moment this script starts the submit process (Python's start-up and
imports included) to the first task's dispatch: the report's `started_at` (wall clock, when
the coordinator began) plus the earliest task `start` (seconds since then), minus the launch.
Two places, each a one-task workflow (`echo ok > out`):

- **local**: `bgrid submit --local 2` (no root): the coordinator starts two worker daemons
  on 127.0.0.1 and waits for them, so their start-up is on the path;
- **lan**: a LAN of network namespaces (`tests/lan/netns.py`, root): one host submits, `--peers`
  hosts run an idle `bgrid worker --cpus 1 --always-idle`, started before and listed idle by
  `bgrid peers` before each submit (`ip netns exec` is on the path, a few ms).

`--base PYTHON` runs the same measures with another environment's interpreter (a worktree of
main with its own venv), interleaved with this one's (A B B A ...: on the LAN, the workers of
each side run that side's code, and are restarted at each switch, outside the measure):

    .venv/bin/python benchmarks/first_task.py --where local --repeats 7 \\
        --base /work/wt-base/.venv/bin/python
    sudo .venv/bin/python benchmarks/first_task.py --where lan --repeats 7 \\
        --base /work/wt-base/.venv/bin/python --json first_task.json

Prints each run (launch -> coordinator start, -> first dispatch), then per side and place
the median and range of launch -> first task, of launch -> coordinator start, and of what
lies between (the coordinator's own part: what the machine's load moves least), and the
load average before and after.
Figures only: the machine's load moves them; compare sides of one interleaved run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent)]  # tests/lan/netns.py

from tests.lan.netns import Host, Lan, lan_available  # noqa: E402

_SUBMIT_TIMEOUT_S = 120.0
_IDLE_DEADLINE_S = 60.0
_WORKFLOW = "name: first\ntasks:\n  t: {command: 'echo ok > out', outputs: [out]}\n"


def bgrid(python: str, *args: str) -> list[str]:
    # -P: not the working directory's `bonjourgrid`, but the one installed in `python`'s venv.
    return [python, "-P", "-m", "bonjourgrid.cli", *args]


def first_task(report: dict[str, Any], launched: float) -> dict[str, float]:
    """Launch -> coordinator start and launch -> first dispatch (s), from a report."""
    if report.get("status") != "succeeded":
        raise SystemExit(f"the job {report.get('status')}: {report.get('reason')}")
    first = min(t["start"] for t in report["tasks"].values() if t.get("start") is not None)
    coordinator = float(report["started_at"]) - launched
    return {"coordinator_s": coordinator, "first_task_s": coordinator + float(first)}


def alternate(sides: list[str], repeats: int) -> Iterator[tuple[int, str]]:
    """(repeat, side) in A B B A A B ... order: each side as often first as second, and
    one switch of side per repeat."""
    order = list(sides)
    for i in range(repeats):
        for side in order:
            yield i, side
        order.reverse()


# -- local ---------------------------------------------------------------------------------


def local_run(python: str, directory: Path) -> dict[str, float]:
    directory.mkdir(parents=True)
    (directory / "wf.yaml").write_text(_WORKFLOW)
    report = directory / "report.json"
    launched = time.time()
    done = subprocess.run(
        bgrid(python, "submit", "wf.yaml", "--local", "2", "--quiet", "--report", str(report)),
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=_SUBMIT_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{python}: submit exited {done.returncode}:\n{done.stderr[-2000:]}")
    return first_task(json.loads(report.read_text()), launched)


# -- lan -----------------------------------------------------------------------------------


class LanGrid:
    """Host 1 submits; hosts 2.. run one idle worker each, of one side at a time."""

    def __init__(self, lan: Lan, python: str) -> None:
        self.lan = lan
        self.side: str | None = None
        submitter = self.submitter
        if submitter.run(bgrid(python, "keys", "init"), timeout=60).returncode != 0:
            raise SystemExit("bgrid keys init failed")
        key_dir = Path(submitter.env["XDG_CONFIG_HOME"]) / "bonjourgrid"
        for host in self.workers:
            shutil.copytree(
                key_dir, Path(host.env["XDG_CONFIG_HOME"]) / "bonjourgrid", dirs_exist_ok=True
            )
        self.names = [f"w{host.index}" for host in self.workers]

    @property
    def submitter(self) -> Host:
        return self.lan.hosts[0]

    @property
    def workers(self) -> list[Host]:
        return self.lan.hosts[1:]

    def serve(self, side: str, python: str) -> None:
        """The workers of `side` running (those of the other side stopped)."""
        if self.side != side:
            for host in self.workers:
                host.terminate_all()
            for host, name in zip(self.workers, self.names, strict=True):
                host.popen(bgrid(python, "worker", "--name", name, "--cpus", "1", "--always-idle"))
            self.side = side
        self.wait_idle(python)

    def wait_idle(self, python: str) -> None:
        deadline = time.monotonic() + _IDLE_DEADLINE_S
        while time.monotonic() < deadline:
            done = self.submitter.run(bgrid(python, "peers", "--json", "--wait", "1"), timeout=30)
            if done.returncode == 0:
                idle = {p["name"] for p in json.loads(done.stdout) if p["state"] == "idle"}
                if set(self.names) <= idle:
                    return
            time.sleep(0.2)
        raise SystemExit(f"the workers are not listed idle:\n{self.lan.describe_logs()}")

    def run(self, python: str, directory: Path) -> dict[str, float]:
        directory.mkdir(parents=True)
        (directory / "wf.yaml").write_text(_WORKFLOW)
        report = directory / "report.json"
        args = ["submit", str(directory / "wf.yaml"), "--quiet", "--report", str(report)]
        launched = time.time()
        done = self.submitter.run(bgrid(python, *args), timeout=_SUBMIT_TIMEOUT_S)
        if done.returncode != 0:
            raise SystemExit(f"{python}: submit exited {done.returncode}:\n{done.stderr[-2000:]}")
        return first_task(json.loads(report.read_text()), launched)


# -- main ----------------------------------------------------------------------------------


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s [{min(values):.3f}, {max(values):.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--where", choices=("local", "lan", "both"), default="both")
    ap.add_argument("--repeats", type=int, default=5, help="submits per side and place")
    ap.add_argument("--peers", type=int, default=3, help="idle workers on the LAN (default 3)")
    ap.add_argument("--base", help="the interpreter of the environment to compare against")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    args = ap.parse_args()
    pythons = {"this": sys.executable}
    if args.base:
        pythons["base"] = args.base
    places = ["local", "lan"] if args.where == "both" else [args.where]
    if "lan" in places and (reason := lan_available()) is not None:
        if args.where == "lan":
            raise SystemExit(f"cannot build a test LAN: {reason}")
        print(f"lan: skipped ({reason})")
        places.remove("lan")
    load_before = os.getloadavg()
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        place: {side: [] for side in pythons} for place in places
    }
    with tempfile.TemporaryDirectory(prefix="bgrid-first-") as tmp:
        root = Path(tmp)
        for place in places:
            lan = Lan(1 + args.peers, root / "lan") if place == "lan" else None
            try:
                grid = LanGrid(lan, sys.executable) if lan is not None else None
                for i, side in alternate(list(pythons), args.repeats):
                    python = pythons[side]
                    directory = root / place / f"{side}-{i}"
                    if grid is not None:
                        grid.serve(side, python)
                        figures = grid.run(python, directory)
                    else:
                        figures = local_run(python, directory)
                    runs[place][side].append(figures)
                    print(
                        f"{place} {side:4} run {i + 1}: first task {figures['first_task_s']:.3f} s"
                        f" (coordinator started at {figures['coordinator_s']:.3f} s)",
                        flush=True,
                    )
            finally:
                if lan is not None:
                    lan.close()
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    print("launch -> first task, median [min, max]:")
    result: dict[str, Any] = {"repeats": args.repeats, "load": [load_before, load_after]}
    for place in places:
        for side in pythons:
            firsts = [r["first_task_s"] for r in runs[place][side]]
            starts = [r["coordinator_s"] for r in runs[place][side]]
            # What the coordinator itself takes, Python's start-up and imports left out.
            after = [f - s for f, s in zip(firsts, starts, strict=True)]
            print(
                f"  {place:5} {side:4} {summary(firsts)}   coordinator start {summary(starts)}"
                f"   start -> first task {summary(after)}"
            )
            result[f"{place}_{side}"] = {
                "first_task_s": firsts,
                "coordinator_s": starts,
                "median_first_task_s": statistics.median(firsts),
                "median_start_to_first_task_s": statistics.median(after),
            }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
