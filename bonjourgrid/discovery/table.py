"""Peers and jobs for people (aligned tables) and for scripts (plain JSON-able dicts)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bonjourgrid.discovery.txt import JobRecord, PeerRecord
from bonjourgrid.units import MIB, format_size

_GRID_CHARS = 8  # enough of a fingerprint to tell grids apart at a glance

# (title, right-aligned?)
_PEER_COLUMNS = [
    ("NAME", False),
    ("STATE", False),
    ("JOB", False),
    ("CPUS", True),
    ("RAM", True),
    ("DISK", True),
    ("COST", True),
    ("ARCH/OS", False),
    ("ADDRESS", False),
    ("GRID", False),
]
_JOB_COLUMNS = [
    ("JOB", False),
    ("STATE", False),
    ("PROGRESS", True),
    ("RUNNING", True),
    ("FAILED", True),
    ("PEERS", True),
    ("USER", False),
    ("HOST", False),
]


def _render(columns: Sequence[tuple[str, bool]], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(row[i]) for row in [[c[0] for c in columns], *rows]) for i in range(len(columns))
    ]
    lines = []
    for row in [[c[0] for c in columns], *rows]:
        cells = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, (_, right) in zip(row, widths, columns, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _address(addresses: tuple[str, ...], port: int) -> str:
    return f"{addresses[0]}:{port}" if addresses else f"?:{port}"


def format_peer_table(peers: Sequence[PeerRecord]) -> str:
    """One aligned line per peer under a header, or "no peers found"."""
    if not peers:
        return "no peers found"
    rows = [
        [
            peer.name,
            peer.state,
            peer.job or "-",
            str(peer.cpus),
            format_size(peer.ram * MIB),
            format_size(peer.disk * MIB),
            f"{peer.cost:g}",
            f"{peer.arch}/{peer.os}",
            _address(peer.addresses, peer.port),
            peer.grid[:_GRID_CHARS],
        ]
        for peer in peers
    ]
    return _render(_PEER_COLUMNS, rows)


def format_job_table(jobs: Sequence[JobRecord]) -> str:
    """One aligned line per job under a header, or "no jobs found"."""
    if not jobs:
        return "no jobs found"
    rows = [
        [
            job.job,
            job.state,
            f"{job.done}/{job.tasks}",
            str(job.running),
            str(job.failed),
            str(job.peers),
            job.user,
            _address(job.addresses, job.port),
        ]
        for job in jobs
    ]
    return _render(_JOB_COLUMNS, rows)


def peer_json(record: PeerRecord) -> dict[str, Any]:
    """Every field of a peer as JSON-able values (ram and disk in MiB)."""
    return {
        "name": record.name,
        "addresses": list(record.addresses),
        "port": record.port,
        "state": record.state,
        "job": record.job,
        "cpus": record.cpus,
        "ram": record.ram,
        "disk": record.disk,
        "cost": record.cost,
        "arch": record.arch,
        "os": record.os,
        "mw": list(record.mw),
        "key": record.key,
        "grid": record.grid,
        "cred": record.cred,
        "v": record.v,
        "extra": dict(record.extra),
    }


def job_json(record: JobRecord) -> dict[str, Any]:
    """Every field of a job as JSON-able values."""
    return {
        "name": record.name,
        "addresses": list(record.addresses),
        "port": record.port,
        "job": record.job,
        "state": record.state,
        "tasks": record.tasks,
        "done": record.done,
        "failed": record.failed,
        "running": record.running,
        "peers": record.peers,
        "user": record.user,
        "started": record.started,
        "key": record.key,
        "v": record.v,
    }
