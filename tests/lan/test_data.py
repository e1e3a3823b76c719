"""Data on a real LAN (issue 3, "Data that moves once"): intermediates travel peer to peer and
stay there, a lost one is made again, a second run reads its inputs from the peers' caches.

Four hosts in network namespaces, shared by the module: each test starts its own worker
daemons on hosts 1-3 under names of its own (so each has fresh caches) and stops them when it
ends; host 4 submits. Tasks are pinned to peers by RAM: `ram<4GiB` runs on the 2 GiB peers,
`ram>=4GiB` on the 8 GiB one. Nothing waits blindly: tests poll `bgrid peers --json`, the
job journal in the submit directory, or files that tasks append a line to each time they
start (every namespace shares the filesystem), each with a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.waiting import wait_until as _wait

from .conftest import Bgrid
from .harness import DETECTED_S as _DETECTED_S
from .harness import SEEN_S as _SEEN_S
from .harness import STARTED_S as _STARTED_S
from .harness import LanGrid, Worker, share_grid_key
from .netns import Lan

_MIB = 1 << 20
_MID_SIZE = 4 * _MIB  # the intermediate file
_INPUT_SIZE = 2 * _MIB  # each source input of the cache test
_SUBMITTER = 3  # host index; workers run on hosts 0-2
SMALL, LARGE = "2GiB", "8GiB"  # --ram of the peers `make` and `use` are pinned to
ON_SMALL, ON_LARGE = "ram<4GiB", "ram>=4GiB"


class DataGrid(LanGrid):
    """The LAN of this module: host 4 submits."""

    def __init__(self, lan: Lan, bgrid: Bgrid, tmp: Path) -> None:
        super().__init__(lan, bgrid, tmp, _SUBMITTER)


@pytest.fixture(scope="module")
def keyed_lan(lan4: Lan, bgrid: Bgrid) -> Lan:
    """Every host holds the same grid key (public and secret halves)."""
    share_grid_key(lan4, bgrid)
    return lan4


@pytest.fixture
def grid(keyed_lan: Lan, bgrid: Bgrid, tmp_path: Path) -> Generator[DataGrid, None, None]:
    """This test's workers and submits; its workers are stopped when it ends."""
    data = DataGrid(keyed_lan, bgrid, tmp_path)
    try:
        yield data
    finally:
        data.stop_workers()


def _mark(path: Path) -> str:
    """A shell command appending "<attempt> <sandbox path>" to `path`, one line per start (the
    sandbox lives in the worker's cache directory, named after the worker)."""
    return f'echo "$BGRID_ATTEMPT $PWD" >> {shlex.quote(str(path))}'


def _starts(path: Path) -> list[str]:
    """One line per start of the task marked with `path`."""
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _ran_on(start: str, worker: Worker) -> bool:
    """Whether a `_mark` line was written by a task running on `worker`."""
    return f"/worker-{worker.name}/" in start


def _journal_done(wf: Path, task: str) -> dict[str, Any] | None:
    """The journal's record of `task` done (in the submit directory), or None yet."""
    journal = wf.parent / ".bgrid" / f"{yaml.safe_load(wf.read_text())['name']}.journal"
    try:
        lines = journal.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written
        if record.get("t") == "done" and record.get("task") == task:
            return dict(record)
    return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The intermediate: 4 MiB of one repeated letter, so the test knows its digest.
_MID_LETTER = "m"
_MID_BYTES = _MID_LETTER.encode() * _MID_SIZE
_MAKE_MID = f"head -c {_MID_SIZE} /dev/zero | tr '\\0' {_MID_LETTER} > mid.bin"
# `use` proves what it read: mid.bin's digest, then the small source input's text.
_USE_MID = "{ sha256sum mid.bin | cut -c1-64; cat salt.txt; } > final.txt"


def _pipeline(grid: DataGrid, variant: str, keep: bool) -> tuple[Path, bytes]:
    """make (on a 2 GiB peer) -> mid.bin -> use (on the 8 GiB peer, also reading salt.txt from
    the submit directory) -> final.txt; the workflow and salt.txt's bytes."""
    salt = f"salt of {variant}\n".encode()
    make: dict[str, Any] = {"command": _MAKE_MID, "outputs": ["mid.bin"], "require": ON_SMALL}
    if keep:
        make["keep"] = True
    wf = grid.workflow(
        f"p2p-{variant}",
        {
            "make": make,
            "use": {"command": _USE_MID, "inputs": ["mid.bin", "salt.txt"],
                    "outputs": ["final.txt"], "require": ON_LARGE},
        },
        subdir=variant,
    )  # fmt: skip
    (wf.parent / "salt.txt").write_bytes(salt)
    return wf, salt


@pytest.mark.parametrize(
    ("variant", "flags", "keep", "comes_back"),
    [
        ("lookahead", (), False, False),
        ("no-prefetch", ("--prefetch", "none"), False, False),
        ("fetch-all", ("--fetch-all",), False, True),
        ("keep", (), True, True),
    ],
)
def test_an_intermediate_travels_peer_to_peer_and_stays_there(
    grid: DataGrid, variant: str, flags: tuple[str, ...], keep: bool, comes_back: bool
) -> None:
    """A 4 MiB intermediate made on one peer and read on another: the coordinator serves
    none of its bytes (its served-byte counter is exactly the small source input), the
    consumer got it peer to peer, and it reaches the submit directory only with
    `--fetch-all` or `keep: true`."""
    small = grid.start_worker("small", 0, 0.0, ram=SMALL)
    large = grid.start_worker("large", 1, 1.0, ram=LARGE)
    grid.wait_idle([small, large], _SEEN_S, "both workers listed idle")
    wf, salt = _pipeline(grid, variant, keep)

    done = grid.submit(wf, "--workers", "2..2", *flags)
    assert done.code == 0, done.explain()
    assert done.report["status"] == "succeeded", done.explain()
    assert done.task("make")["peer"] == small.name, done.explain()
    assert done.task("use")["peer"] == large.name, done.explain()
    final = (wf.parent / "final.txt").read_bytes()
    assert final == f"{_sha256(_MID_BYTES)}\n".encode() + salt, "use read other bytes"

    moved = done.moved
    # The coordinator's data server served salt.txt, once, and not one byte of mid.bin.
    assert moved["from_coordinator"] == len(salt), done.explain()
    assert moved["peer_to_peer"] >= _MID_SIZE, done.explain()
    mid = wf.parent / "mid.bin"
    if comes_back:
        assert mid.is_file(), f"mid.bin did not come back with {variant}"
        assert _sha256(mid.read_bytes()) == _sha256(_MID_BYTES)
        assert moved["to_submitter"] == len(final) + _MID_SIZE, done.explain()
    else:
        assert not mid.exists(), "an intermediate was collected into the submit directory"
        assert moved["to_submitter"] == len(final), done.explain()


def _remake_setup(
    grid: DataGrid, roles: tuple[str, str, str]
) -> tuple[list[Worker], Worker, Path, Path, Path]:
    """Two 2 GiB twins and an 8 GiB reader, listed idle; `make` writes mid.bin on a twin,
    `use` reads it on the reader once `gate` opens (the file the test touches). Returns the
    twins, the reader, the file make marks each start in, the gate, and the workflow."""
    twins = [grid.start_worker(roles[0], 0, 0.0, ram=SMALL),
             grid.start_worker(roles[1], 1, 0.5, ram=SMALL)]  # fmt: skip
    large = grid.start_worker(roles[2], 2, 1.0, ram=LARGE)
    grid.wait_idle([*twins, large], _SEEN_S, "the three workers listed idle")
    make_starts = grid.tmp / "make.starts"
    gate = grid.tmp / "gate-open"
    wait_gate = f"while [ ! -e {shlex.quote(str(gate))} ]; do sleep 0.1; done"
    wf = grid.workflow(
        "remake",
        {
            "make": {"command": f"{_mark(make_starts)}; {_MAKE_MID}", "outputs": ["mid.bin"],
                     "require": ON_SMALL},
            "gate": {"command": f"{wait_gate}; echo open > gate.txt", "outputs": ["gate.txt"],
                     "require": ON_LARGE},
            "use": {"command": "{ sha256sum mid.bin | cut -c1-64; cat gate.txt; } > final.txt",
                    "inputs": ["mid.bin", "gate.txt"], "outputs": ["final.txt"],
                    "require": ON_LARGE},
        },
        subdir="wf",
    )  # fmt: skip
    return twins, large, make_starts, gate, wf


def _made_on(wf: Path, twins: list[Worker]) -> tuple[Worker, Worker]:
    """Once make is journaled done: the twin it ran on, and the other one."""
    _wait(lambda: _journal_done(wf, "make") is not None, _STARTED_S, "make journaled done")
    record = _journal_done(wf, "make")
    assert record is not None
    by_name = {w.name: w for w in twins}
    assert record["peer"] in by_name, f"make ran on {record['peer']}"
    producer = by_name[record["peer"]]
    return producer, next(w for w in twins if w is not producer)


def test_an_intermediate_lost_with_its_peer_is_made_again(grid: DataGrid) -> None:
    """make writes mid.bin on a 2 GiB peer; use (on the 8 GiB peer) cannot start before a gate
    the test opens. Once make is done, its peer is killed (-9): make runs again on the other
    2 GiB peer, and use reads the new copy. `--prefetch none`, so no copy of mid.bin reaches
    the consumer ahead of time (with one, nothing would be lost)."""
    twins, large, make_starts, gate, wf = _remake_setup(grid, ("small1", "small2", "large"))
    job = grid.start_submit(wf, "--workers", "3..3", "--prefetch", "none")
    try:
        producer, spare = _made_on(wf, twins)
        assert [_ran_on(s, producer) for s in _starts(make_starts)] == [True]
        producer.kill()
        took = _wait(
            lambda: len(_starts(make_starts)) >= 2, _DETECTED_S, "make started again after kill -9"
        )
        print(f"make started again {took:.1f} s after its peer was killed")
        assert _ran_on(_starts(make_starts)[1], spare), _starts(make_starts)
    finally:
        gate.touch()  # also when the test fails: the job ends
    done = job.finish()
    assert done.code == 0, done.explain()
    make = done.task("make")
    assert (make["status"], make["peer"]) == ("done", spare.name), done.explain()
    assert make["attempts"] >= 2, done.explain()
    assert len(_starts(make_starts)) == 2, _starts(make_starts)
    use = done.task("use")
    assert (use["status"], use["peer"], use["attempts"]) == ("done", large.name, 1), done.explain()
    final = (wf.parent / "final.txt").read_text()
    assert final == f"{_sha256(_MID_BYTES)}\nopen\n"
    assert not (wf.parent / "mid.bin").exists(), "the remade intermediate was collected"
    # The new copy went from the spare to the consumer, not through the coordinator.
    assert done.moved["from_coordinator"] == 0, done.explain()
    assert done.moved["peer_to_peer"] >= _MID_SIZE, done.explain()


def test_a_reader_stuck_on_a_lost_peer_gets_the_remade_intermediate(grid: DataGrid) -> None:
    """make writes mid.bin on a 2 GiB peer, which is then frozen (SIGSTOP) before use (on the
    8 GiB peer) may start: use's fetch of mid.bin hangs on it. The frozen peer is killed (-9)
    and lost: make runs again on the other 2 GiB peer at once, use gets the new copy, and the
    report says why make ran again."""
    twins, large, make_starts, gate, wf = _remake_setup(grid, ("stuck1", "stuck2", "reader"))
    job = grid.start_submit(wf, "--workers", "3..3", "--prefetch", "none")
    try:
        producer, spare = _made_on(wf, twins)
        producer.signal(signal.SIGSTOP)  # it holds the only mid.bin and serves nothing now
        gate.touch()  # use may start: its fetch of mid.bin hangs on the frozen producer
        producer.kill()
        _wait(lambda: len(_starts(make_starts)) >= 2, _DETECTED_S, "make started again")
        assert _ran_on(_starts(make_starts)[1], spare), _starts(make_starts)
    finally:
        gate.touch()  # also when the test fails: the job ends
    done = job.finish()
    assert done.code == 0, done.explain()
    make = done.task("make")
    assert (make["status"], make["peer"]) == ("done", spare.name), done.explain()
    assert make["rerun"] == f"its output mid.bin was lost with peer {producer.name}"
    use = done.task("use")
    assert (use["status"], use["peer"]) == ("done", large.name), done.explain()
    assert "error" not in use, done.explain()  # a lost input is not the reader's failure
    final = (wf.parent / "final.txt").read_text()
    assert final == f"{_sha256(_MID_BYTES)}\nopen\n"


def test_a_second_run_reads_its_inputs_from_the_peers_caches(grid: DataGrid) -> None:
    """Three tasks, each reading its own 2 MiB source input, run twice on the same three
    peers: the second run finds at least 90% of the input bytes in local caches and the
    coordinator serves less than 10% of them."""
    workers = [grid.start_worker(f"c{i}", i, float(i), ram=SMALL) for i in range(3)]
    grid.wait_idle(workers, _SEEN_S, "the three workers listed idle")
    inputs = {f"in{i}.bin": os.urandom(_INPUT_SIZE) for i in range(3)}
    total = sum(len(data) for data in inputs.values())
    tasks = {
        f"t{i}": {"command": f"sha256sum in{i}.bin | cut -c1-64 > out{i}.txt",
                  "inputs": [f"in{i}.bin"], "outputs": [f"out{i}.txt"]}
        for i in range(3)
    }  # fmt: skip
    wf = grid.workflow("cached", tasks, subdir="wf")
    for name, data in inputs.items():
        (wf.parent / name).write_bytes(data)

    runs = []
    for n in (1, 2):
        done = grid.submit(wf, "--workers", "3..3")
        assert done.code == 0, done.explain()
        for i in range(3):
            out = (wf.parent / f"out{i}.txt").read_text()
            assert out == _sha256(inputs[f"in{i}.bin"]) + "\n", f"run {n}: out{i}.txt"
        runs.append(done)
        grid.wait_idle(workers, _SEEN_S, f"every peer idle after run {n}")
    first, second = (run.moved for run in runs)
    print(f"input bytes {total}; first run {first}; second run {second}")
    assert first["from_coordinator"] >= total, runs[0].explain()
    assert second["cache_hits"] >= 0.9 * total, runs[1].explain()
    assert second["from_coordinator"] < 0.1 * total, runs[1].explain()
