"""bgrid side by side with Dask and with this machine's limits, measured in the same run.

Theory: a figure alone says little on a shared 2-core machine, whose speed changes from one
minute to the next. So every workload runs three ways in one round, one right after the other:
`bgrid submit --local 2` (the bgrid of the venv this script runs with: run it with main's venv
before a merge and with the merged venv after), the same DAG on a Dask LocalCluster of
2 processes x 1 thread (each task `subprocess.run(["sh", "-c", cmd], cwd=shared_dir)`,
submitted with its parents' futures as dependencies, files in one shared directory), and the
machine limit that bounds it (spawning `sh -c true` on 2 threads, raw zmq and CurveZMQ
throughput, SHA-256, a local copy). Rounds repeat (`--repeats`), so a noisy moment hurts every
side alike; the table gives the median and the range [min-max] of each, and the RATIO of
bgrid's speed to each anchor's (anchor time / bgrid time, or bgrid rate / anchor rate):
above 1, bgrid is faster.

    .venv/bin/python benchmarks/compare.py                       # every workload, 5 rounds
    .venv/bin/python benchmarks/compare.py --repeats 3 --markdown --json compare.json
    .venv/bin/python benchmarks/compare.py --quick --only tiny,fan  # a smoke run, seconds

Every bgrid figure comes from its `--json` report: the span (first task `start` to last task
`end`, start-up and recruitment left out) and the submit's wall time. A Dask task records its
own start and end: its span is measured alike, its wall time is the whole child process
(cluster start and close included, as `--local` starts and stops its workers). Each side gets
fresh random inputs of its own, so no cache carries over between runs. Everything lives in
one temp dir (XDG dirs too) removed at the end; every child runs in its own process group,
killed on timeout. The LAN workload builds network namespaces (tests/lan/netns.py, root only)
and never touches the machine's interfaces. See benchmarks/README.md for each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_HERE = Path(__file__).resolve().parent
sys.path[len(sys.path) :] = [str(_HERE), str(_HERE.parent)]  # data_lan.py, tests/lan/netns.py

MiB = 1024 * 1024
MB = 1_000_000
DASK_MISSING = "not installed (pip install -e '.[bench]')"
_RUN_TIMEOUT_S = 1800.0
_PEERS_DEADLINE_S = 60.0


# -- sizes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; `--quick` shrinks every one of them."""

    tiny: int = 2_000
    tiny_big: int = 20_000
    fan: int = 500
    montage_tiles: int = 24  # 24 tiles: 24 + 43 + 1 + 1 + 24 + 1 + 1 = 95 tasks
    montage_tile_bytes: int = 1_333_333  # 4 x 24 tiles' worth of files: ~128 MB
    mapreduce_parts: int = 16
    mapreduce_part_bytes: int = 64 * MiB
    transfer_bytes: int = 1024 * MiB
    spawns: int = 2_000
    hash_bytes: int = 256 * MiB


QUICK = Sizes(
    tiny=200,
    tiny_big=1_000,
    fan=50,
    montage_tiles=6,
    montage_tile_bytes=333_333,
    mapreduce_parts=4,
    mapreduce_part_bytes=4 * MiB,
    transfer_bytes=64 * MiB,
    spawns=300,
    hash_bytes=32 * MiB,
)


# -- DAGs: one description, written as a bgrid workflow and run as a Dask graph ----------------


@dataclass
class Dag:
    """Tasks in topological order: name -> command, inputs, outputs, after."""

    name: str
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    input_bytes: int = 0

    def add(
        self,
        name: str,
        command: str,
        inputs: tuple[str, ...] = (),
        outputs: tuple[str, ...] = (),
        after: tuple[str, ...] = (),
    ) -> None:
        self.tasks[name] = {
            "command": command,
            "inputs": list(inputs),
            "outputs": list(outputs),
            "after": list(after),
        }

    def workflow(self) -> dict[str, Any]:
        """The bgrid workflow document (empty lists left out)."""
        tasks = {n: {k: v for k, v in t.items() if v} for n, t in self.tasks.items()}
        return {"name": self.name, "defaults": {"env": {"LC_ALL": "C"}}, "tasks": tasks}

    def dependencies(self) -> dict[str, list[str]]:
        """Each task's parents, as bgrid derives them: producers of its inputs, plus `after`."""
        producer = {out: n for n, t in self.tasks.items() for out in t["outputs"]}
        return {
            n: sorted({producer[i] for i in t["inputs"] if i in producer} | set(t["after"]))
            for n, t in self.tasks.items()
        }


def random_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        left = size
        while left > 0:
            block = os.urandom(min(left, 4 * MiB))
            out.write(block)
            left -= len(block)


def tiny_dag(n: int) -> Callable[[Path], Dag]:
    def build(root: Path) -> Dag:
        dag = Dag(f"tiny{n}")
        for i in range(n):
            dag.add(f"t{i:06d}", "true")
        return dag

    return build


def fan_dag(width: int) -> Callable[[Path], Dag]:
    def build(root: Path) -> Dag:
        dag = Dag(f"fan{width}")
        dag.add("split", "true")
        middle = tuple(f"m{i:04d}" for i in range(width))
        for name in middle:
            dag.add(name, "true", after=("split",))
        dag.add("join", "true", after=middle)
        return dag

    return build


def montage_pairs(tiles: int) -> list[tuple[int, int]]:
    """The tiles whose difference is fitted: every (i, i+1), then (i, i+2) until there are
    2 x tiles - 5 fits in all, so that 24 tiles make Montage's 95 tasks."""
    pairs = [(i, i + 1) for i in range(tiles - 1)]
    second = [(i, i + 2) for i in range(tiles - 2)]
    return pairs + second[: max(0, 2 * tiles - 5 - len(pairs))]


def montage_tasks(tiles: int) -> int:
    """project + difffit + concatfit + bgmodel + background + add + shrink."""
    return 2 * tiles + len(montage_pairs(tiles)) + 4


def montage_dag(tiles: int, tile_bytes: int) -> Callable[[Path], Dag]:
    """The shape of Montage (bonjourgrid/examples/montage, grown): project each raw tile, fit
    the difference of neighbours (i, i+1) and (i, i+2), gather the fits, model the background,
    correct each tile, add the tiles into a mosaic, shrink it."""

    def build(root: Path) -> Dag:
        dag = Dag("montage")
        for i in range(tiles):
            random_file(root / f"raw/{i}.bin", tile_bytes)
        dag.input_bytes = tiles * tile_bytes
        for i in range(tiles):
            cmd = f"mkdir -p proj && tr 'a-z' 'A-Z' < raw/{i}.bin > proj/{i}.bin"
            dag.add(f"project_{i}", cmd, (f"raw/{i}.bin",), (f"proj/{i}.bin",))
        fits = []
        for a, b in montage_pairs(tiles):
            out = f"fits/{a}_{b}.txt"
            cmd = f"mkdir -p fits && cat proj/{a}.bin proj/{b}.bin | sha256sum > {out}"
            dag.add(f"difffit_{a}_{b}", cmd, (f"proj/{a}.bin", f"proj/{b}.bin"), (out,))
            fits.append(out)
        dag.add("concatfit", f"cat {' '.join(fits)} > fits.tbl", tuple(fits), ("fits.tbl",))
        dag.add("bgmodel", "sha256sum fits.tbl > corr.tbl", ("fits.tbl",), ("corr.tbl",))
        corrected = []
        for i in range(tiles):
            out = f"corr/{i}.bin"
            correct = f"{{ head -c 64 corr.tbl; tr 'A-Z' 'a-z' < proj/{i}.bin; }}"
            cmd = f"mkdir -p corr && {correct} > {out}"
            dag.add(f"background_{i}", cmd, ("corr.tbl", f"proj/{i}.bin"), (out,))
            corrected.append(out)
        add_cmd = f"cat {' '.join(corrected)} > mosaic.bin"
        dag.add("add", add_cmd, tuple(corrected), ("mosaic.bin",))
        shrink = "head -c 1000000 mosaic.bin > mosaic_small.bin"
        dag.add("shrink", shrink, ("mosaic.bin",), ("mosaic_small.bin",))
        return dag

    return build


def mapreduce_dag(parts: int, part_bytes: int) -> Callable[[Path], Dag]:
    """Map each part (`tr` over it, as big as its input), reduce every mapped part (sha256sum)."""

    def build(root: Path) -> Dag:
        dag = Dag("mapreduce")
        for i in range(parts):
            random_file(root / f"in/{i}.bin", part_bytes)
        dag.input_bytes = parts * part_bytes
        mapped = []
        for i in range(parts):
            out = f"map/{i}.bin"
            cmd = f"mkdir -p map && tr 'a-z' 'A-Z' < in/{i}.bin > {out}"
            dag.add(f"map_{i}", cmd, (f"in/{i}.bin",), (out,))
            mapped.append(out)
        dag.add(
            "reduce", f"sha256sum {' '.join(mapped)} > result.txt", tuple(mapped), ("result.txt",)
        )
        return dag

    return build


def transfer_dag(size: int) -> Callable[[Path], Dag]:
    """One task that reads nothing but needs one big input: its span is the staging."""

    def build(root: Path) -> Dag:
        dag = Dag("transfer")
        random_file(root / "big.bin", size)
        dag.input_bytes = size
        dag.add("take", "true", ("big.bin",))
        return dag

    return build


def first_task_dag(root: Path) -> Dag:
    """One task that writes the wall clock time it started at (seconds since the epoch)."""
    dag = Dag("first")
    dag.add("first", "date +%s.%N > started.txt", outputs=("started.txt",))
    return dag


# -- the bgrid side ----------------------------------------------------------------------------


def bgrid_command() -> list[str]:
    """The `bgrid` installed in this interpreter's environment."""
    script = Path(sys.executable).parent / "bgrid"
    if script.exists():
        return [str(script)]
    found = shutil.which("bgrid")
    if found is None:
        raise SystemExit("no bgrid next to this interpreter nor on PATH")
    return [found]


def isolated_env(home: Path) -> dict[str, str]:
    """This environment with XDG dirs inside `home`: no key, cache or config of the user."""
    env = dict(os.environ)
    for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        path = home / var.lower()
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    env.pop("BGRID_INTERFACES", None)
    return env


def run_group(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run `args` in a process group of its own; on timeout, kill the whole group."""
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything the child left in its group
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def run_bgrid(dag: Dag, root: Path, env: dict[str, str], local: int) -> dict[str, float]:
    (root / "wf.yaml").write_text(yaml.safe_dump(dag.workflow(), sort_keys=False))
    launched = time.time()
    started = time.monotonic()
    args = [*bgrid_command(), "submit", "wf.yaml", "--local", str(local), "--json", "--quiet"]
    done = run_group(args, root, env, _RUN_TIMEOUT_S)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"bgrid submit exited {done.returncode}:\n{done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    if report["status"] != "succeeded":
        raise RuntimeError(f"bgrid: the job {report['status']}: {report['reason']}")
    tasks = report["tasks"].values()
    figures = {
        "span_s": max(t["end"] for t in tasks) - min(t["start"] for t in tasks),
        "wall_s": wall,
    }
    stamp = root / "started.txt"
    if stamp.exists():
        figures["first_task_s"] = float(stamp.read_text()) - launched
    return figures


# -- the Dask side (a child process: its cluster starts and ends with it) ----------------------


def dask_installed() -> bool:
    """Whether `dask.distributed` imports here (the `bench` extra)."""
    try:
        import dask.distributed  # noqa: F401
    except ImportError:
        return False
    return True


def dask_child(spec_path: Path) -> None:
    """Run the DAG of `spec_path` on a LocalCluster of 2 processes x 1 thread; print timings."""
    from dask.distributed import Client, LocalCluster

    spec = json.loads(spec_path.read_text())
    cwd, tasks, deps = spec["cwd"], spec["tasks"], spec["deps"]
    launched = spec["launched"]
    with (
        LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=spec["workers"],
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,  # type: ignore[no-untyped-call]
    ):
        futures: dict[str, Any] = {}
        for name, task in tasks.items():
            parents = [futures[p] for p in deps[name]]
            futures[name] = client.submit(
                _dask_task, task["command"], cwd, *parents, key=name, pure=False
            )
        times = dict(zip(futures, client.gather(list(futures.values())), strict=True))
    starts = [t[0] for t in times.values()]
    ends = [t[1] for t in times.values()]
    print(json.dumps({"span_s": max(ends) - min(starts), "first_task_s": min(starts) - launched}))


def _dask_task(command: str, cwd: str, *parents: Any) -> tuple[float, float]:
    """One Dask task: the shell command in the shared dir; its own start and end times."""
    start = time.time()
    env = {**os.environ, "LC_ALL": "C"}
    subprocess.run(["sh", "-c", command], cwd=cwd, env=env, check=True)
    return start, time.time()


def run_dask(dag: Dag, root: Path, env: dict[str, str], timeout: float) -> dict[str, float]:
    spec = root / "dask-spec.json"
    launched = time.time()
    spec.write_text(
        json.dumps(
            {
                "cwd": str(root),
                "workers": 2,
                "tasks": dag.tasks,
                "deps": dag.dependencies(),
                "launched": launched,
            }
        )
    )
    started = time.monotonic()
    args = [sys.executable, str(Path(__file__).resolve()), "--dask-child", str(spec)]
    done = run_group(args, root, env, timeout)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"the Dask run exited {done.returncode}:\n{done.stderr[-2000:]}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    figures["wall_s"] = wall
    return figures


# -- machine limits ---------------------------------------------------------------------------


def spawn_rate(count: int, threads: int = 2) -> float:
    """`sh -c true` processes started and reaped per second on `threads` threads."""

    def spawn(_: int) -> None:
        subprocess.run(["sh", "-c", "true"], check=True)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(spawn, range(count)))
    return count / (time.perf_counter() - start)


def zmq_rate(size: int, secure: bool) -> float:
    """MB/s of 1 MiB frames over tcp 127.0.0.1, DEALER/ROUTER with the product's window and
    sockets (data_lan.py's raw pair), plain or CURVE."""
    from data_lan import _raw_zmq  # the same raw pair data_lan.py measures against

    return size / MB / asyncio.run(_raw_zmq(size, secure))


def sha256_rate(size: int) -> float:
    """MB/s of hashlib's SHA-256 over 1 MiB chunks in memory."""
    chunk = os.urandom(MiB)
    digest = hashlib.sha256()
    start = time.perf_counter()
    for _ in range(size // MiB):
        digest.update(chunk)
    return size / MB / (time.perf_counter() - start)


def copy_rate(source: Path) -> float:
    """MB/s of a local copy of `source` (shutil.copyfile: copy_file_range/sendfile)."""
    dest = source.with_suffix(".copy")
    start = time.perf_counter()
    shutil.copyfile(source, dest)
    rate = source.stat().st_size / MB / (time.perf_counter() - start)
    dest.unlink()
    return rate


# -- the namespace LAN (first task on idle peers) ----------------------------------------------


class LanGrid:
    """Host 1 submits; host 2 runs one idle worker with the submitter's grid key."""

    def __init__(self, tmp: Path) -> None:
        from tests.lan.netns import Lan

        self.lan = Lan(2, tmp)
        try:
            self.submitter, worker = self.lan.hosts
            if self.submitter.run(self.bgrid("keys", "init"), timeout=60).returncode != 0:
                raise RuntimeError("`bgrid keys init` failed on the submitter host")
            keys = Path(self.submitter.env["XDG_CONFIG_HOME"]) / "bonjourgrid"
            theirs = Path(worker.env["XDG_CONFIG_HOME"]) / "bonjourgrid"
            shutil.copytree(keys, theirs, dirs_exist_ok=True)
            args = ["worker", "--name", "w1", "--cpus", "1", "--always-idle"]
            self.worker = worker.popen(self.bgrid(*args))
        except BaseException:
            self.lan.close()
            raise

    @staticmethod
    def bgrid(*args: str) -> list[str]:
        return [*bgrid_command(), *args]

    def peers_s(self) -> float | None:
        """Wall time of one `bgrid peers --json` that lists the worker idle, else None."""
        if self.worker.poll() is not None:
            raise RuntimeError(f"the LAN worker exited:\n{self.lan.describe_logs()}")
        start = time.monotonic()
        done = self.submitter.run(self.bgrid("peers", "--json"), timeout=60)
        took = time.monotonic() - start
        if done.returncode != 0:
            return None
        idle = {p.get("name") for p in json.loads(done.stdout) if p.get("state") == "idle"}
        return took if "w1" in idle else None

    def wait_idle(self) -> float:
        deadline = time.monotonic() + _PEERS_DEADLINE_S
        while time.monotonic() < deadline:
            took = self.peers_s()
            if took is not None:
                return took
        raise RuntimeError(f"the LAN worker not idle:\n{self.lan.describe_logs()}")

    def first_task_s(self, root: Path) -> float:
        """Launch of `bgrid submit` on the submitter -> the task's own clock, on the worker."""
        dag = first_task_dag(root)
        workflow = dag.workflow() | {"grid": {"workers": {"min": 1, "max": 1}}}
        (root / "wf.yaml").write_text(yaml.safe_dump(workflow, sort_keys=False))
        launched = time.time()
        done = self.submitter.run(self.bgrid("submit", "wf.yaml", "--quiet"), 300, cwd=root)
        if done.returncode != 0:
            raise RuntimeError(f"LAN submit exited {done.returncode}:\n{done.stderr[-2000:]}")
        return float((root / "started.txt").read_text()) - launched

    def close(self) -> None:
        self.lan.close()


# -- workloads ----------------------------------------------------------------------------------


@dataclass
class Context:
    sizes: Sizes
    tmp: Path
    env: dict[str, str]
    dask: bool
    dask_all: bool
    lan: LanGrid | None = None
    lan_skip: str | None = None
    seq: Iterator[int] = field(default_factory=lambda: iter(range(1_000_000)))

    def fresh_dir(self, label: str) -> Path:
        path = self.tmp / f"{next(self.seq):04d}-{label}"
        path.mkdir(parents=True)
        return path


Samples = dict[str, float]  # one round of one workload: figure name -> value


@dataclass
class Workload:
    """One row of the table: how to run one round, and how to show the medians."""

    name: str
    label: Callable[[Sizes], str]
    round: Callable[[Context], Samples]
    row: Callable[[Stats, Context], tuple[str, str, str]]


class Stats:
    """The samples of one workload over every round: median [min-max] of each figure."""

    def __init__(self, rounds: list[Samples]) -> None:
        self.rounds = rounds

    def has(self, key: str) -> bool:
        return any(key in r for r in self.rounds)

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.rounds if key in r]

    def median(self, key: str) -> float:
        return statistics.median(self.values(key))

    def show(self, key: str, fmt: Callable[[float], str]) -> str:
        values = self.values(key)
        if len(values) == 1:
            return fmt(values[0])
        return f"{fmt(statistics.median(values))} [{fmt(min(values))}-{fmt(max(values))}]"


def rate(x: float) -> str:
    return f"{x:,.0f}/s"


def secs(x: float) -> str:
    return f"{x:.2f} s"


def mbps(x: float) -> str:
    return f"{x:,.0f} MB/s"


def times(x: float) -> str:
    return f"{x:.2f}x"


def dask_note(stats: Stats, ctx: Context, skipped: str | None = None) -> str | None:
    """Why the Dask column has no figure, or None when it has one."""
    if not ctx.dask:
        return DASK_MISSING
    if skipped is not None:
        return skipped
    if not stats.has("dask_span_s"):
        errors = [r for r in stats.rounds if "dask_error" in r]
        return "failed (see --json)" if errors else "not run"
    return None


def dag_round(build: Callable[[Path], Dag], ctx: Context, dask: bool, limit: bool) -> Samples:
    """bgrid, then Dask, then the spawn limit: one round of a DAG workload."""
    samples: Samples = {}
    root = ctx.fresh_dir("bgrid")
    dag = build(root)
    figures = run_bgrid(dag, root, ctx.env, 2)
    samples.update({f"bgrid_{k}": v for k, v in figures.items()})
    samples["tasks"] = len(dag.tasks)
    shutil.rmtree(root)
    if dask and ctx.dask:
        root = ctx.fresh_dir("dask")
        dag = build(root)
        timeout = max(120.0, 10 * figures["wall_s"])
        try:
            dask_figures = run_dask(dag, root, ctx.env, timeout)
            samples.update({f"dask_{k}": v for k, v in dask_figures.items()})
        except subprocess.TimeoutExpired:
            samples["dask_error"] = timeout
            print(f"  Dask did not finish in {timeout:.0f} s", flush=True)
        except RuntimeError as err:
            samples["dask_error"] = -1.0
            print(f"  {err}", flush=True)
        shutil.rmtree(root)
    if limit:
        samples["spawn_per_s"] = spawn_rate(ctx.sizes.spawns)
    return samples


def tasks_row(skip_dask: Callable[[Context], str | None]) -> Callable[[Stats, Context], Any]:
    """Tasks per second over the span: bgrid against Dask and the spawn limit."""

    def row(stats: Stats, ctx: Context) -> tuple[str, str, str]:
        n = stats.median("tasks")
        for side in ("bgrid", "dask"):
            for r in stats.rounds:
                if f"{side}_span_s" in r:
                    r[f"{side}_per_s"] = n / r[f"{side}_span_s"]
        bgrid = stats.show("bgrid_per_s", rate)
        anchors, ratios = [], []
        note = dask_note(stats, ctx, skip_dask(ctx))
        if note is None:
            anchors.append(f"Dask {stats.show('dask_per_s', rate)}")
            ratios.append(f"{times(stats.median('bgrid_per_s') / stats.median('dask_per_s'))} Dask")
        else:
            anchors.append(f"Dask {note}")
        anchors.append(f"spawn `sh -c true` on 2 threads {stats.show('spawn_per_s', rate)}")
        ratios.append(f"{stats.median('bgrid_per_s') / stats.median('spawn_per_s'):.2f} of spawn")
        return bgrid, "; ".join(anchors), ", ".join(ratios)

    return row


def span_row(stats: Stats, ctx: Context) -> tuple[str, str, str]:
    """Span (and wall time) of bgrid against Dask's."""
    bgrid = f"{stats.show('bgrid_span_s', secs)} (wall {stats.show('bgrid_wall_s', secs)})"
    note = dask_note(stats, ctx)
    if note is not None:
        return bgrid, f"Dask {note}", "-"
    dask = f"Dask {stats.show('dask_span_s', secs)} (wall {stats.show('dask_wall_s', secs)})"
    span = stats.median("dask_span_s") / stats.median("bgrid_span_s")
    wall = stats.median("dask_wall_s") / stats.median("bgrid_wall_s")
    return bgrid, dask, f"{times(span)} Dask (wall {times(wall)})"


def transfer_round(ctx: Context) -> Samples:
    """bgrid `--local 1` staging one big input, then the zmq, CURVE, copy and hash limits."""
    size = ctx.sizes.transfer_bytes
    root = ctx.fresh_dir("bgrid")
    dag = transfer_dag(size)(root)
    figures = run_bgrid(dag, root, ctx.env, 1)
    samples = {
        "bgrid_MBps": size / MB / figures["span_s"],
        "bgrid_wall_MBps": size / MB / figures["wall_s"],
        "copy_MBps": copy_rate(root / "big.bin"),
    }
    shutil.rmtree(root)
    samples["zmq_MBps"] = zmq_rate(size, secure=False)
    samples["curve_MBps"] = zmq_rate(size, secure=True)
    samples["sha256_MBps"] = sha256_rate(ctx.sizes.hash_bytes)
    return samples


def transfer_row(stats: Stats, ctx: Context) -> tuple[str, str, str]:
    bgrid = f"{stats.show('bgrid_MBps', mbps)} (over wall {stats.show('bgrid_wall_MBps', mbps)})"
    anchor = (
        f"raw CurveZMQ {stats.show('curve_MBps', mbps)}; plain zmq {stats.show('zmq_MBps', mbps)}; "
        f"local copy {stats.show('copy_MBps', mbps)}; SHA-256 {stats.show('sha256_MBps', mbps)}"
    )
    b = stats.median("bgrid_MBps")
    ratio = ", ".join(
        f"{b / stats.median(k):.2f} of {what}"
        for k, what in (("curve_MBps", "CURVE"), ("zmq_MBps", "plain"), ("copy_MBps", "copy"))
    )
    return bgrid, anchor, ratio


def first_round(ctx: Context) -> Samples:
    """Launch -> first task on `--local 1`, the same on Dask, and the import floor."""
    root = ctx.fresh_dir("bgrid")
    samples = {"bgrid_first_s": run_bgrid(first_task_dag(root), root, ctx.env, 1)["first_task_s"]}
    shutil.rmtree(root)
    if ctx.dask:
        root = ctx.fresh_dir("dask")
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            dask_figures = run_dask(first_task_dag(root), root, ctx.env, 120)
            samples["dask_first_s"] = dask_figures["first_task_s"]
        shutil.rmtree(root)
    start = time.monotonic()
    imports = [sys.executable, "-c", "import bonjourgrid.cli"]
    subprocess.run(imports, check=True, env=ctx.env, stdin=subprocess.DEVNULL)
    samples["import_s"] = time.monotonic() - start
    return samples


def first_row(stats: Stats, ctx: Context) -> tuple[str, str, str]:
    b = stats.median("bgrid_first_s")
    anchors = [f"Python + `import bonjourgrid.cli` {stats.show('import_s', secs)}"]
    ratios = []
    if ctx.dask and stats.has("dask_first_s"):
        anchors.insert(0, f"Dask (cluster start) {stats.show('dask_first_s', secs)}")
        ratios.append(f"{times(stats.median('dask_first_s') / b)} Dask")
    else:
        anchors.insert(0, f"Dask {DASK_MISSING if not ctx.dask else 'failed'}")
    ratios.append(f"{b - stats.median('import_s'):.2f} s above the import")
    return stats.show("bgrid_first_s", secs), "; ".join(anchors), ", ".join(ratios)


def lan_round(ctx: Context) -> Samples:
    """`bgrid peers` (the anchor) then launch -> first task on the idle peer of the LAN."""
    if ctx.lan is None:
        return {}
    ctx.lan.wait_idle()
    samples: Samples = {}
    peers = ctx.lan.peers_s()
    if peers is not None:
        samples["peers_s"] = peers
    ctx.lan.wait_idle()
    root = ctx.fresh_dir("lan")
    samples["bgrid_first_s"] = ctx.lan.first_task_s(root)
    shutil.rmtree(root)
    return samples


def lan_row(stats: Stats, ctx: Context) -> tuple[str, str, str]:
    if not stats.has("bgrid_first_s"):
        return f"skipped: {ctx.lan_skip}", "-", "-"
    b = stats.median("bgrid_first_s")
    anchor = f"`bgrid peers` {stats.show('peers_s', secs)}"
    return stats.show("bgrid_first_s", secs), anchor, f"{times(stats.median('peers_s') / b)} peers"


def no_dask_for_big(ctx: Context) -> str | None:
    return None if ctx.dask_all else "not run (a graph this big: --dask-all to try)"


WORKLOADS = [
    Workload(
        "tiny",
        lambda s: f"{s.tiny:,} `true` tasks",
        lambda c: dag_round(tiny_dag(c.sizes.tiny), c, dask=True, limit=True),
        tasks_row(lambda c: None),
    ),
    Workload(
        "tiny20k",
        lambda s: f"{s.tiny_big:,} `true` tasks",
        lambda c: dag_round(tiny_dag(c.sizes.tiny_big), c, dask=c.dask_all, limit=True),
        tasks_row(no_dask_for_big),
    ),
    Workload(
        "fan",
        lambda s: f"fan 1->{s.fan}->1 (`true`), span",
        lambda c: dag_round(fan_dag(c.sizes.fan), c, dask=True, limit=False),
        span_row,
    ),
    Workload(
        "montage",
        lambda s: (
            f"montage-like ({montage_tasks(s.montage_tiles)} tasks, "
            f"{4 * s.montage_tiles * s.montage_tile_bytes / MB:.0f} MB), span"
        ),
        lambda c: dag_round(
            montage_dag(c.sizes.montage_tiles, c.sizes.montage_tile_bytes), c, True, False
        ),
        span_row,
    ),
    Workload(
        "mapreduce",
        lambda s: f"map-reduce {s.mapreduce_parts} x {s.mapreduce_part_bytes // MiB} MiB, span",
        lambda c: dag_round(
            mapreduce_dag(c.sizes.mapreduce_parts, c.sizes.mapreduce_part_bytes), c, True, False
        ),
        span_row,
    ),
    Workload(
        "transfer",
        lambda s: f"{s.transfer_bytes // MiB} MiB input to one worker, `--local 1`",
        transfer_round,
        transfer_row,
    ),
    Workload(
        "first",
        lambda s: "`--local 1`: launch -> first task",
        first_round,
        first_row,
    ),
    Workload(
        "lan",
        lambda s: "LAN, idle peer: launch -> first task",
        lan_round,
        lan_row,
    ),
]


# -- the run ------------------------------------------------------------------------------------


def print_table(rows: list[tuple[str, str, str, str]], markdown: bool) -> None:
    header = ("measure", "bgrid", "anchor", "ratio")
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [w.name for w in WORKLOADS]
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--only", help=f"comma-separated workloads among {','.join(names)}")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--json", type=Path, help="write every sample and the table to this file")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--dask-all", action="store_true", help="run Dask on the 20,000 tasks too")
    ap.add_argument("--tmp", type=Path, help="where temp dirs go (default: the system's)")
    ap.add_argument("--dask-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dask_child is not None:
        dask_child(args.dask_child)
        return 0
    chosen = names if args.only is None else args.only.split(",")
    unknown = set(chosen) - set(names)
    if unknown:
        ap.error(f"unknown workload(s) {', '.join(sorted(unknown))}; choose among {names}")
    workloads = [w for w in WORKLOADS if w.name in chosen]
    sizes = QUICK if args.quick else Sizes()
    t0 = time.monotonic()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bgrid-compare-", dir=args.tmp))
    ctx = Context(sizes, tmp, isolated_env(tmp / "home"), dask_installed(), args.dask_all)
    rounds: dict[str, list[Samples]] = {w.name: [] for w in workloads}
    try:
        if "lan" in chosen:
            from tests.lan.netns import lan_available

            ctx.lan_skip = lan_available()
            if ctx.lan_skip is None:
                ctx.lan = LanGrid(tmp / "lan")
                ctx.lan.wait_idle()
            else:
                print(f"lan: skipped: {ctx.lan_skip}", flush=True)
        for i in range(args.repeats):
            for w in workloads:
                samples = w.round(ctx)
                rounds[w.name].append(samples)
                shown = ", ".join(f"{k} {v:.3g}" for k, v in samples.items())
                print(f"round {i + 1} {w.name}: {shown}", flush=True)
    finally:
        if ctx.lan is not None:
            ctx.lan.close()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [(w.label(sizes), *w.row(Stats(rounds[w.name]), ctx)) for w in workloads]
    load_after = os.getloadavg()
    took = time.monotonic() - t0
    print(
        f"\nbgrid `--local 2` (transfer: `--local 1`) vs Dask LocalCluster(2 processes x 1 thread)"
        f" vs this machine; median [min-max] of {args.repeats} interleaved round(s); "
        f"ratio = bgrid's speed / the anchor's (> 1: bgrid faster)\n"
        f"{os.cpu_count()} CPUs; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after; {took:.0f} s\n"
    )
    print_table(rows, args.markdown)
    if args.json is not None:
        result = {
            "sizes": dataclasses.asdict(sizes),
            "repeats": args.repeats,
            "load_average": {"before": load_before, "after": load_after},
            "run_s": took,
            "rounds": rounds,
            "table": [
                dict(zip(("measure", "bgrid", "anchor", "ratio"), r, strict=True)) for r in rows
            ],
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
