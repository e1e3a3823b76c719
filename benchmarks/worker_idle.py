"""What an idle worker daemon costs its desktop: CPU (% of one core) and memory (RSS).

Starts real `bgrid worker` daemons on 127.0.0.1 with a throwaway grid key, lets them settle,
then reads each one's CPU time (psutil, threads included) and RSS over a measured window:

- `dedicated`: `--always-idle` (no owner watching);
- `desktop-file`: watches its owner through `--activity-file` (the test hook);
- `desktop-probes`: the built-in probes (terminals, /dev/input, keyboard interrupts).

Every daemon that watches its owner also samples the CPU load (default `--max-load 0.3`).

    .venv/bin/python benchmarks/worker_idle.py --settle 30 --seconds 60 --json idle.json

Targets (issue 4): under 1% of one core and under 60 MB RSS each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

CPU_TARGET_PCT = 1.0
RSS_TARGET_MB = 60.0


def bgrid(*args: str) -> list[str]:
    return [sys.executable, "-m", "bonjourgrid.cli", *args]


def start(root: Path, env: dict[str, str], tag: str) -> dict[str, subprocess.Popen[bytes]]:
    kinds = {
        "dedicated": ["--always-idle"],
        "desktop-file": ["--activity-file", str(root / "owner-active")],
        "desktop-probes": [],
    }
    procs = {}
    for kind, flags in kinds.items():
        log = open(root / f"{kind}.log", "wb")  # noqa: SIM115
        procs[kind] = subprocess.Popen(
            bgrid(
                "worker",
                "--name",
                f"bench-{kind}-{tag}",
                "--interface",
                "127.0.0.1",
                "--cache-dir",
                str(root / "cache" / kind),
                *flags,
            ),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
    return procs


def measure(procs: dict[str, subprocess.Popen[bytes]], seconds: float) -> dict[str, Any]:
    handles = {kind: psutil.Process(p.pid) for kind, p in procs.items()}
    first = {kind: h.cpu_times() for kind, h in handles.items()}
    peak = dict.fromkeys(handles, 0)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for kind, h in handles.items():
            peak[kind] = max(peak[kind], h.memory_info().rss)
        time.sleep(1.0)
    wall = time.monotonic() - started
    results = {}
    for kind, h in handles.items():
        last = h.cpu_times()
        cpu_s = (last.user + last.system) - (first[kind].user + first[kind].system)
        rss = h.memory_info().rss
        results[kind] = {
            "cpu_pct_of_one_core": round(100 * cpu_s / wall, 3),
            "rss_mb": round(rss / 1e6, 1),
            "rss_peak_mb": round(max(peak[kind], rss) / 1e6, 1),
            "uss_mb": round(h.memory_full_info().uss / 1e6, 1),
            "threads": h.num_threads(),
        }
    return {"seconds": round(wall, 1), "daemons": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=30.0, help="seconds before measuring")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window")
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bgrid-idle-bench-"))
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(root / "config"),
        "XDG_CACHE_HOME": str(root / "cache"),
    }
    subprocess.run(bgrid("keys", "init"), env=env, check=True, capture_output=True)
    procs = start(root, env, uuid.uuid4().hex[:6])
    try:
        time.sleep(args.settle)
        for kind, proc in procs.items():
            if proc.poll() is not None:
                print((root / f"{kind}.log").read_text(), file=sys.stderr)
                raise SystemExit(f"the {kind} daemon exited with code {proc.returncode}")
        figures = measure(procs, args.seconds)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)
    figures.update(
        settle_s=args.settle,
        python=platform.python_version(),
        cpus=psutil.cpu_count(),
        machine_load_1min=os.getloadavg()[0],
    )
    print(f"idle worker daemons over {figures['seconds']} s (after {args.settle:.0f} s settling)")
    print(f"{'daemon':<16} {'CPU % of 1 core':>16} {'RSS MB':>8} {'peak MB':>8} {'USS MB':>8}")
    ok = True
    for kind, f in figures["daemons"].items():
        print(
            f"{kind:<16} {f['cpu_pct_of_one_core']:>16.2f} {f['rss_mb']:>8.1f} "
            f"{f['rss_peak_mb']:>8.1f} {f['uss_mb']:>8.1f}"
        )
        ok &= f["cpu_pct_of_one_core"] < CPU_TARGET_PCT and f["rss_peak_mb"] < RSS_TARGET_MB
    print(
        f"targets: < {CPU_TARGET_PCT}% of one core, < {RSS_TARGET_MB:.0f} MB RSS: "
        + ("met" if ok else "MISSED")
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
