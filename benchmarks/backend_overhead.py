"""What `--backend slurm` costs against `--backend native` on the same LAN of namespaces.

Five hosts (`tests/lan/netns.py`): hosts 1-4 run one worker daemon each
(`bgrid worker --cpus 1 --always-idle`, a short `--cache-dir`: munge's socket path must fit
108 bytes), host 5 submits. Every daemon and submit starts with `nsenter --net` (the host's
/sys: slurmd needs /sys/fs/cgroup), for both backends, so both see the same environment.

Two workflows, each run with `--workers 4..4 --report FILE -v`, the backends interleaved,
`--repeats` times each:

- bag: 40 independent tiny tasks, `echo $BGRID_TASK > out_i.txt` (a declared output);
- chain: 10 tasks, each reading the previous one's file and writing its own.

Figures: the submit's wall time; the span of the tasks, from the report's first task start
to its last task end (seconds since the job started: recruitment and the Slurm cluster's
deployment come before the first start, so the span is the per-task path only); each
task's own `end - start` (dispatch to done); and, from the slurm submits' `-v` log, the
time to deploy the 4-peer Slurm cluster and to tear it down. The overhead of slurm is
(span_slurm - span_native) / tasks for the bag (per task of throughput on 4 peers) and per
link of the chain (latency: staging, sbatch, Slurm's scheduling and launch, the step).

    sudo .venv/bin/python benchmarks/backend_overhead.py [--repeats 3] [--json out.json]

Needs root (network namespaces), slurm-wlm and munge.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent)]  # tests/lan/netns.py, bonjourgrid/

from tests.lan.netns import Host, Lan, lan_available  # noqa: E402

BACKENDS = ("native", "slurm")
_WORKERS = 4
_PEERS_DEADLINE_S = 60.0
_SUBMIT_TIMEOUT_S = 300.0
_DEPLOYED = re.compile(r"slurm deployed over (\d+) peer\(s\) in ([0-9.]+) s")
_TORN_DOWN = re.compile(r"slurm torn down in ([0-9.]+) s")
_NEEDED = ("slurmctld", "slurmd", "munged", "sbatch", "nsenter")


def bgrid(*args: str) -> list[str]:
    return [sys.executable, "-m", "bonjourgrid.cli", *args]


def bag(tasks: int) -> dict[str, Any]:
    return {
        "name": "bag",
        "tasks": {
            f"t{i:02d}": {"command": f"echo $BGRID_TASK > out_{i}.txt", "outputs": [f"out_{i}.txt"]}
            for i in range(tasks)
        },
    }


def chain(links: int) -> dict[str, Any]:
    tasks: dict[str, Any] = {"c00": {"command": "echo $BGRID_TASK > c00.txt",
                                     "outputs": ["c00.txt"]}}  # fmt: skip
    for i in range(1, links):
        prev, out = f"c{i - 1:02d}.txt", f"c{i:02d}.txt"
        tasks[f"c{i:02d}"] = {
            "command": f"{{ cat {prev}; echo $BGRID_TASK; }} > {out}",
            "inputs": [prev],
            "outputs": [out],
        }
    return {"name": "chain", "tasks": tasks}


class Grid:
    """Hosts 1-4 run one worker each; host 5 submits. Everything with the host's /sys."""

    def __init__(self, lan: Lan, short: Path) -> None:
        self.lan = lan
        self.verbosity = "-v"  # the deploy and teardown times are logged at -v
        sub = self.submitter
        if sub.run(bgrid("keys", "init"), timeout=30).returncode != 0:
            raise RuntimeError("`bgrid keys init` failed")
        key_dir = Path(sub.env["XDG_CONFIG_HOME"]) / "bonjourgrid"
        self.names: list[str] = []
        for i, host in enumerate(lan.hosts[:_WORKERS], start=1):
            shutil.copytree(
                key_dir, Path(host.env["XDG_CONFIG_HOME"]) / "bonjourgrid", dirs_exist_ok=True
            )
            name = f"w{i}"
            args = ["worker", "--name", name, "--cpus", "1", "--always-idle",
                    "--cache-dir", str(short / name)]  # fmt: skip
            host.popen(bgrid(*args), host_sys=True)
            self.names.append(name)

    @property
    def submitter(self) -> Host:
        return self.lan.hosts[_WORKERS]

    def wait_idle(self) -> None:
        deadline = time.monotonic() + _PEERS_DEADLINE_S
        while time.monotonic() < deadline:
            done = self.submitter.run(bgrid("peers", "--json", "--wait", "0.5"), timeout=30)
            if done.returncode == 0:
                idle = {
                    p.get("name")
                    for p in json.loads(done.stdout)
                    if p["state"] == "idle" and p.get("job") is None
                }
                if set(self.names) <= idle:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"workers not idle after {_PEERS_DEADLINE_S:g} s:\n"
                           f"{self.lan.describe_logs()}")  # fmt: skip

    def submit(self, directory: Path, workflow: dict[str, Any], backend: str) -> dict[str, Any]:
        """One `bgrid submit` of `workflow` in a fresh `directory`; its figures."""
        self.wait_idle()
        directory.mkdir(parents=True)
        wf = directory / "wf.yaml"
        wf.write_text(yaml.safe_dump(workflow, sort_keys=False))
        report_path = directory / "report.json"
        args = ["submit", str(wf), self.verbosity, "--backend", backend, "--workers",
                f"{_WORKERS}..{_WORKERS}", "--report", str(report_path)]  # fmt: skip
        began = time.monotonic()
        proc = self.submitter.popen(bgrid(*args), host_sys=True, cwd=directory)
        try:
            code = proc.wait(timeout=_SUBMIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"submit still running after {_SUBMIT_TIMEOUT_S:g} s") from None
        wall_s = time.monotonic() - began
        log = self.submitter.record(proc).stderr_path.read_text(errors="replace")
        report: dict[str, Any] = {}
        if report_path.exists():
            report = json.loads(report_path.read_text())
        if code != 0 or report.get("status") != "succeeded":
            raise RuntimeError(
                f"{backend} submit of {workflow['name']} exited {code}: "
                f"{report.get('reason')}\n{log[-3000:]}"
            )
        return figures(report, log, backend, wall_s)


def figures(report: dict[str, Any], log: str, backend: str, wall_s: float) -> dict[str, Any]:
    tasks = report["tasks"].values()
    span = max(t["end"] for t in tasks) - min(t["start"] for t in tasks)
    result: dict[str, Any] = {
        "backend": backend,
        "wall_s": wall_s,
        "makespan_s": report["makespan_s"],
        "span_s": span,
        "task_s": statistics.median(t["end"] - t["start"] for t in tasks),
        # The first task placed: with slurm, it waits for slurmctld's first scheduling pass.
        "first_task_s": min((t["start"], t["end"] - t["start"]) for t in tasks)[1],
        "peers": sorted({t["peer"] for t in tasks}),
    }
    if backend == "slurm":
        deployed, torn = _DEPLOYED.search(log), _TORN_DOWN.search(log)
        if deployed is None or torn is None:
            raise RuntimeError(f"no deploy/teardown line in the slurm submit's log:\n{log[-3000:]}")
        if int(deployed[1]) != _WORKERS:
            raise RuntimeError(f"slurm deployed over {deployed[1]} peers, not {_WORKERS}")
        result["deploy_s"] = float(deployed[2])
        result["teardown_s"] = float(torn[1])
    return result


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cell(values: Sequence[float]) -> str:
    s = spread(values)
    return f"{s['median']:6.2f} [{s['min']:.2f}, {s['max']:.2f}]"


def summarize(runs: list[dict[str, Any]], bag_tasks: int, links: int) -> dict[str, Any]:
    def of(workflow: str, backend: str, key: str) -> list[float]:
        return [r[key] for r in runs if r["workflow"] == workflow and r["backend"] == backend]

    summary: dict[str, Any] = {}
    for workflow in ("bag", "chain"):
        for key in ("span_s", "task_s", "first_task_s", "wall_s", "makespan_s"):
            summary[f"{workflow}_{key}"] = {b: spread(of(workflow, b, key)) for b in BACKENDS}
    slurm = [r for r in runs if r["backend"] == "slurm"]
    summary["deploy_s"] = spread([r["deploy_s"] for r in slurm])
    summary["teardown_s"] = spread([r["teardown_s"] for r in slurm])

    def extra(workflow: str, count: int) -> float:
        spans = summary[f"{workflow}_span_s"]
        return float((spans["slurm"]["median"] - spans["native"]["median"]) / count)

    summary["bag_overhead_per_task_s"] = extra("bag", bag_tasks)
    summary["chain_overhead_per_link_s"] = extra("chain", links)
    return summary


def print_table(summary: dict[str, Any], runs: list[dict[str, Any]], args: Any) -> None:
    def of(workflow: str, backend: str, key: str) -> list[float]:
        return [r[key] for r in runs if r["workflow"] == workflow and r["backend"] == backend]

    print(f"\nmedian [min, max] of {args.repeats} (s), {_WORKERS} one-CPU peers:")
    print(f"{'':42}{'native':>24}{'slurm':>24}")
    rows = [
        ("bag", args.bag, "span (first start..last end)", "span_s"),
        ("bag", args.bag, "per task (end - start)", "task_s"),
        ("bag", args.bag, "first task (end - start)", "first_task_s"),
        ("bag", args.bag, "submit wall time", "wall_s"),
        ("chain", args.chain, "span (first start..last end)", "span_s"),
        ("chain", args.chain, "per link (end - start)", "task_s"),
        ("chain", args.chain, "first link (end - start)", "first_task_s"),
        ("chain", args.chain, "submit wall time", "wall_s"),
    ]
    for workflow, count, label, key in rows:
        name = f"{workflow} {count}: {label}"
        print(f"{name:42}{cell(of(workflow, 'native', key)):>24}"
              f"{cell(of(workflow, 'slurm', key)):>24}")  # fmt: skip
    slurm = [r for r in runs if r["backend"] == "slurm"]
    print(f"{f'slurm deploy ({_WORKERS} peers)':42}{'':>24}"
          f"{cell([r['deploy_s'] for r in slurm]):>24}")  # fmt: skip
    print(f"{'slurm teardown':42}{'':>24}{cell([r['teardown_s'] for r in slurm]):>24}")
    print(
        f"slurm - native: {summary['bag_overhead_per_task_s'] * 1000:.0f} ms per task "
        f"(bag of {args.bag} on {_WORKERS} peers), "
        f"{summary['chain_overhead_per_link_s'] * 1000:.0f} ms per chain link"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each (default 3)")
    ap.add_argument("--bag", type=int, default=40, help="tasks of the bag (default 40)")
    ap.add_argument("--chain", type=int, default=10, help="links of the chain (default 10)")
    ap.add_argument("--json", type=Path, help="also write every figure to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, reports)")
    args = ap.parse_args()
    reason = lan_available()
    missing = [p for p in _NEEDED if shutil.which(p) is None]
    if reason is None and missing:
        reason = f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)"
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bgrid-overhead-"))
    short = Path(tempfile.mkdtemp(prefix="bgo-"))  # worker caches: munge's socket path
    workflows = {"bag": bag(args.bag), "chain": chain(args.chain)}
    runs: list[dict[str, Any]] = []
    try:
        with Lan(_WORKERS + 1, tmp / "lan") as lan:
            grid = Grid(lan, short)
            for i in range(args.repeats):
                for workflow, spec in workflows.items():
                    # Interleaved, the first backend alternating: a drift of the machine's
                    # load falls on both.
                    order = BACKENDS if i % 2 == 0 else BACKENDS[::-1]
                    for backend in order:
                        r = grid.submit(tmp / f"{workflow}-{backend}-{i}", spec, backend)
                        r["workflow"] = workflow
                        runs.append(r)
                        extra = ""
                        if backend == "slurm":
                            extra = (
                                f"  deploy {r['deploy_s']:.1f} s teardown {r['teardown_s']:.1f} s"
                            )
                        print(
                            f"  {workflow:5} {backend:6} run {i + 1}: span {r['span_s']:6.2f} s"
                            f"  per task {r['task_s']:5.2f} s  wall {r['wall_s']:6.2f} s{extra}",
                            flush=True,
                        )
    finally:
        shutil.rmtree(short, ignore_errors=True)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(runs, args.bag, args.chain)
    print_table(summary, runs, args)
    line = {
        "repeats": args.repeats,
        "bag_tasks": args.bag,
        "chain_links": args.chain,
        "deploy_s": round(summary["deploy_s"]["median"], 2),
        "teardown_s": round(summary["teardown_s"]["median"], 2),
        "bag_span_s": {b: round(summary["bag_span_s"][b]["median"], 2) for b in BACKENDS},
        "chain_span_s": {b: round(summary["chain_span_s"][b]["median"], 2) for b in BACKENDS},
        "bag_overhead_per_task_ms": round(summary["bag_overhead_per_task_s"] * 1000),
        "chain_overhead_per_link_ms": round(summary["chain_overhead_per_link_s"] * 1000),
    }
    print(json.dumps(line))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
