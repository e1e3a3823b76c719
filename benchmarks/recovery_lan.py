"""Recovery after a lost peer: the makespan of an Epigenomics-like workflow on a LAN of
namespaces, without a kill and with a worker killed (SIGKILL) while it runs tasks.

The workflow (generated here, 50 tasks, small files, short sleeps) has the shape of
WfCommons' Epigenomics: 2 fastqSplit, each feeding lanes of filterContams -> sol2sanger ->
fastq2bfq -> map (11 lanes), a mapMerge per split, then maqIndex and pileup. Every
intermediate stays on the peer that made it, so a killed worker takes some with it and their
producers run again. Each run has inputs of its own (no cache hit carries over).

    sudo .venv/bin/python benchmarks/recovery_lan.py [--runs 3] [--json recovery.json]

Prints the median makespans (from each report's `makespan_s`), the overhead of the kill,
and what it should be: the peer timeout plus the lost work (the sleeps of the tasks that ran
again, along their longest chain). Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent)]  # tests/lan/netns.py, bonjourgrid/

from tests.lan.netns import Host, Lan, lan_available  # noqa: E402

_PEERS_DEADLINE_S = 60.0
_SUBMIT_TIMEOUT_S = 300.0
_LANES = (6, 5)  # lanes per fastqSplit
_CHAIN = ("filterContams", "sol2sanger", "fastq2bfq", "map")


def bgrid(*args: str) -> list[str]:
    return [sys.executable, "-m", "bonjourgrid.cli", *args]


def epigenomics(root: Path, nonce: str, sleep_s: float) -> tuple[Path, dict[str, list[str]]]:
    """Write the workflow and its inputs under `root`; (its path, each task's predecessors)."""
    root.mkdir(parents=True)
    tasks: dict[str, dict[str, Any]] = {}
    preds: dict[str, list[str]] = {}

    def task(name: str, inputs: list[str], outputs: list[str], after: list[str]) -> None:
        # Each output: its inputs' bytes and a line of its own (a few KB, deterministic).
        body = f"sleep {sleep_s:g}; " + "; ".join(
            f"{{ cat {' '.join(inputs)}; echo {name}:{out}; }} > {out}" for out in outputs
        )
        tasks[name] = {"command": body, "inputs": inputs, "outputs": outputs}
        preds[name] = after

    merged = []
    for s, lanes in enumerate(_LANES):
        reads = f"reads{s}.fq"
        (root / reads).write_text(f"{nonce} reads {s}\n" * 100)
        splits = [f"split{s}_{i}.fq" for i in range(lanes)]
        task(f"fastqSplit_{s}", [reads], splits, [])
        maps = []
        for i, split in enumerate(splits):
            prev, prev_task = split, f"fastqSplit_{s}"
            for stage in _CHAIN:
                name = f"{stage}_{s}_{i}"
                out = f"{stage}_{s}_{i}.out"
                task(name, [prev], [out], [prev_task])
                prev, prev_task = out, name
            maps.append((prev, prev_task))
        out = f"mapMerge_{s}.out"
        task(f"mapMerge_{s}", [m for m, _ in maps], [out], [t for _, t in maps])
        merged.append((out, f"mapMerge_{s}"))
    task("maqIndex", [m for m, _ in merged], ["index.out"], [t for _, t in merged])
    task("pileup", ["index.out"], ["pileup.out"], ["maqIndex"])
    assert len(tasks) == 50, len(tasks)
    path = root / "epigenomics.yaml"
    path.write_text(yaml.safe_dump({"name": "epigenomics", "tasks": tasks}, sort_keys=False))
    return path, preds


class Grid:
    """Host 1 submits; hosts 2.. run one worker daemon each."""

    def __init__(self, lan: Lan, cpus: int) -> None:
        self.lan, self.cpus = lan, cpus
        sub = self.submitter
        if sub.run(bgrid("keys", "init"), timeout=30).returncode != 0:
            raise RuntimeError("`bgrid keys init` failed")
        key_dir = Path(sub.env["XDG_CONFIG_HOME"]) / "bonjourgrid"
        self.workers: dict[str, tuple[Host, subprocess.Popen[Any]]] = {}
        for i, host in enumerate(lan.hosts[1:], start=1):
            shutil.copytree(
                key_dir, Path(host.env["XDG_CONFIG_HOME"]) / "bonjourgrid", dirs_exist_ok=True
            )
            self.start(f"w{i}", host)

    @property
    def submitter(self) -> Host:
        return self.lan.hosts[0]

    def start(self, name: str, host: Host) -> None:
        args = ["worker", "--name", name, "--cpus", str(self.cpus), "--always-idle"]
        self.workers[name] = (host, host.popen(bgrid(*args)))

    def kill(self, name: str) -> None:
        host, proc = self.workers[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.start(name, host)  # back for the next run (it kills its orphaned tasks first)

    def wait_idle(self) -> None:
        deadline = time.monotonic() + _PEERS_DEADLINE_S
        while time.monotonic() < deadline:
            done = self.submitter.run(bgrid("peers", "--json"), timeout=30)
            if done.returncode == 0:
                idle = {p.get("name") for p in json.loads(done.stdout) if p["state"] == "idle"}
                if set(self.workers) <= idle:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"workers not idle:\n{self.lan.describe_logs()}")

    def busy_worker(self) -> str | None:
        """A worker whose namespace runs a task's `sleep` now."""
        for name, (host, _) in self.workers.items():
            pids = subprocess.run(
                ["ip", "netns", "pids", host.name], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                try:
                    argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
                except OSError:
                    continue
                if Path(argv0.decode(errors="replace")).name == "sleep":
                    return name
        return None


def run(grid: Grid, wf: Path, kill_after: int | None, peer_timeout: float) -> dict[str, Any]:
    """One submit; with `kill_after`, SIGKILL a busy worker once that many tasks finished."""
    grid.wait_idle()
    report = wf.parent / "report.json"
    args = [
        "-vv",
        "submit",
        str(wf),
        "--report",
        str(report),
        "--peer-timeout",
        f"{peer_timeout:g}",
    ]
    args += ["--lease", "3"]
    job = grid.submitter.popen(bgrid(*args), cwd=wf.parent)
    killed = None
    if kill_after is not None:
        deadline = time.monotonic() + _SUBMIT_TIMEOUT_S
        while killed is None and time.monotonic() < deadline and job.poll() is None:
            victim = grid.busy_worker() if _done_count(wf) >= kill_after else None
            if victim is not None:
                grid.kill(victim)
                killed = victim
            else:
                time.sleep(0.05)
    code = job.wait(timeout=_SUBMIT_TIMEOUT_S)
    data: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {}
    if code != 0 or data.get("status") != "succeeded":
        raise RuntimeError(
            f"submit exited {code}: {data.get('reason')}\n{grid.lan.describe_logs()}"
        )
    if kill_after is not None and killed is None:
        raise RuntimeError("the job ended before a worker could be killed")
    again = {n: t for n, t in data["tasks"].items() if t["attempts"] > 1}
    return {"makespan_s": data["makespan_s"], "killed": killed, "ran_again": sorted(again)}


def _done_count(wf: Path) -> int:
    """Tasks the submitter's journal records as done (the coordinator writes it as it goes)."""
    count = 0
    for journal in (wf.parent / ".bgrid").glob("*.journal"):
        with contextlib.suppress(OSError):
            count += journal.read_text().count('{"t":"done"')
    return count


def lost_work(preds: dict[str, list[str]], again: list[str], sleep_s: float) -> float:
    """The sleeps along the longest chain of tasks that ran again."""
    rerun = set(again)
    depth: dict[str, int] = {}

    def chain(name: str) -> int:
        if name not in depth:
            depth[name] = 1 + max((chain(p) for p in preds[name] if p in rerun), default=0)
        return depth[name]

    return sleep_s * max((chain(n) for n in rerun), default=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4, help="worker hosts (default 4)")
    ap.add_argument("--cpus", type=int, default=2, help="task slots per worker (default 2)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each kind; medians (default 3)")
    ap.add_argument("--sleep", type=float, default=0.3, help="each task's sleep, s (default 0.3)")
    ap.add_argument("--peer-timeout", type=float, default=2.0, help="default 2 s")
    ap.add_argument("--kill-after", type=int, default=14, help="tasks done before the kill")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, reports)")
    args = ap.parse_args()
    reason = lan_available()
    if reason is not None:
        print(f"cannot build the LAN: {reason}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bgrid-recovery-"))
    results: dict[str, Any] = {"config": vars(args) | {"json": str(args.json)}, "runs": []}
    try:
        with Lan(args.workers + 1, tmp / "lan") as lan:
            grid = Grid(lan, args.cpus)
            preds: dict[str, list[str]] = {}
            for i in range(args.runs):
                for kind in ("no kill", "kill"):
                    wf, preds = epigenomics(
                        tmp / f"run{i}-{kind.replace(' ', '')}", f"{i}{kind}", args.sleep
                    )
                    kill_after = args.kill_after if kind == "kill" else None
                    r = run(grid, wf, kill_after, args.peer_timeout)
                    r["kind"] = kind
                    r["lost_work_s"] = lost_work(preds, r["ran_again"], args.sleep)
                    results["runs"].append(r)
                    print(
                        f"  {kind:8} run {i + 1}: {r['makespan_s']:6.2f} s  "
                        f"killed={r['killed']} ran again={len(r['ran_again'])} "
                        f"(lost work {r['lost_work_s']:.1f} s)",
                        flush=True,
                    )
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    plain = statistics.median(r["makespan_s"] for r in results["runs"] if r["kind"] == "no kill")
    kills = [r for r in results["runs"] if r["kind"] == "kill"]
    killed = statistics.median(r["makespan_s"] for r in kills)
    lost = statistics.median(r["lost_work_s"] for r in kills)
    goal = plain + args.peer_timeout + lost
    results["summary"] = {
        "no_kill_s": plain,
        "kill_s": killed,
        "lost_work_s": lost,
        "goal_s": goal,
        "excess_s": killed - goal,
    }
    print(f"makespan, median of {args.runs}: no kill {plain:.2f} s; kill {killed:.2f} s")
    print(
        f"goal: {plain:.2f} + peer timeout {args.peer_timeout:g} + lost work {lost:.1f}"
        f" = {goal:.2f} s; excess {killed - goal:+.2f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
