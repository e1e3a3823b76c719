"""Data-heavy workflows for benchmarks/data_lan.py, generated at run time into a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MB = 1_000_000  # decimal megabytes: link rates are decimal too (100 Mbit/s = 12.5 MB/s)


@dataclass(frozen=True)
class Workflow:
    """A generated workflow: its YAML file and the byte counts its targets are measured against."""

    name: str
    path: Path
    input_bytes: int  # bytes of the files the user supplies (the submit dir's own inputs)
    final_outputs: tuple[str, ...]  # outputs no task reads: what the user wants back
    big_file_bytes: int = 0  # the reference workflow's shared file, else 0


def random_file(path: Path, size: int) -> None:
    """Write `size` random bytes to `path` (like `head -c SIZE /dev/urandom > PATH`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        left = size
        while left > 0:
            block = os.urandom(min(left, 4 * 1024 * 1024))
            out.write(block)
            left -= len(block)


def write_yaml(path: Path, name: str, workers: int, tasks: dict[str, object]) -> None:
    """Write a workflow file that recruits exactly `workers` peers."""
    doc = {
        "name": name,
        "grid": {"workers": {"min": workers, "max": workers}},
        "defaults": {"retries": 1, "env": {"LC_ALL": "C"}},
        "tasks": tasks,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def submit_local_json(directory: Path, workflow: str, workers: int = 2) -> dict[str, Any]:
    """`bgrid submit WORKFLOW --local WORKERS --json` in `directory`: the report; exits saying
    what went wrong when the submit failed."""
    done = subprocess.run(
        [sys.executable, "-m", "bonjourgrid.cli", "submit", workflow, "--local", str(workers),
         "--interface", "127.0.0.1", "--json"],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"bgrid submit exited {done.returncode}:\n{done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report
