"""What a user checks on a real LAN: peers are seen, a job runs where it may, grids stay apart.

Four hosts in network namespaces: three workers of one grid (2, 8 and 16 GiB of RAM) and a
fourth host that submits. Tests run in file order and share the workers (module scope); the
last one stops them.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import Bgrid, MdnsWatcher
from .netns import Host, Lan, LanSetupError, lan_available, namespace_prefix

Peers = list[dict[str, Any]]

_SEEN_DEADLINE_S = 10.0  # the spec says 2 s; the margin covers interpreter start on a busy box
_IDLE_AGAIN_DEADLINE_S = 5.0
_SUBMIT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class WorkerSpec:
    """One worker daemon of the test grid and what `bgrid peers` must say about it."""

    name: str
    host_index: int
    ram: str
    ram_mib: int
    cost: float
    cpus: int = 2


_WORKERS = (
    WorkerSpec("small", 0, "2GiB", 2048, 0.5),
    WorkerSpec("mid", 1, "8GiB", 8192, 1.0),
    WorkerSpec("big", 2, "16GiB", 16384, 2.0),
)


@dataclass
class Grid:
    """Three workers of one grid on hosts 1-3, and host 4 holding the same grid key."""

    lan: Lan
    procs: dict[str, subprocess.Popen[Any]]
    started_at: float

    @property
    def submitter(self) -> Host:
        return self.lan.hosts[3]

    def host_of(self, spec: WorkerSpec) -> Host:
        return self.lan.hosts[spec.host_index]

    def assert_alive(self) -> None:
        """Fail at once, not at a deadline, when a worker daemon has died."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None:
                pytest.fail(f"worker {name!r} exited with code {code} (logs below)")


def _explain(done: subprocess.CompletedProcess[str]) -> str:
    return (
        f"`bgrid {' '.join(done.args[3:])}` exited {done.returncode}\n"
        f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )


def _config_dir(host: Host, env: dict[str, str] | None = None) -> Path:
    return Path((env or host.env)["XDG_CONFIG_HOME"]) / "bonjourgrid"


def _keys_init(bgrid: Bgrid, host: Host, env: dict[str, str] | None = None) -> Path:
    """Make a grid key on `host` (in `env`'s XDG_CONFIG_HOME) and return its key dir."""
    done = bgrid(host, "keys", "init", env=env, timeout=30)
    assert done.returncode == 0, _explain(done)
    key_dir = _config_dir(host, env)
    assert key_dir.is_dir() and any(key_dir.iterdir()), f"`keys init` left nothing in {key_dir}"
    return key_dir


@pytest.fixture(scope="module")
def grid(lan4: Lan, bgrid: Bgrid) -> Generator[Grid, None, None]:
    """One grid key shared by all four hosts; a worker daemon on each of hosts 1-3."""
    key_dir = _keys_init(bgrid, lan4.hosts[0])
    for host in lan4.hosts[1:]:
        shutil.copytree(key_dir, _config_dir(host), dirs_exist_ok=True)
    started_at = time.monotonic()
    procs = {
        spec.name: bgrid.start(
            lan4.hosts[spec.host_index],
            "worker",
            "--name",
            spec.name,
            "--cpus",
            str(spec.cpus),
            "--ram",
            spec.ram,
            "--cost",
            str(spec.cost),
            "--always-idle",
        )
        for spec in _WORKERS
    }
    yield Grid(lan4, procs, started_at)
    # Lan.close (module teardown of lan4) kills whatever is still running.


def _ours(peers: Peers) -> dict[str, dict[str, Any]]:
    names = {spec.name for spec in _WORKERS}
    return {p["name"]: p for p in peers if isinstance(p, dict) and p.get("name") in names}


def _all_idle(peers: Peers) -> bool:
    ours = _ours(peers)
    return len(ours) == len(_WORKERS) and all(p.get("state") == "idle" for p in ours.values())


def _poll_peers(
    bgrid: Bgrid, grid: Grid, until: Callable[[Peers], bool], deadline_s: float, what: str
) -> Peers:
    """`bgrid peers --json` from the submitting host until `until(peers)` or the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        grid.assert_alive()
        done = bgrid(grid.submitter, "peers", "--json", timeout=30)
        assert done.returncode == 0, _explain(done)
        peers = json.loads(done.stdout)
        assert isinstance(peers, list), f"`peers --json` printed {type(peers).__name__}, not a list"
        if until(peers):
            return peers
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: not true after {deadline_s} s; last `peers --json`:\n{peers}")


@pytest.fixture
def watcher(grid: Grid) -> Generator[MdnsWatcher, None, None]:
    """A live mDNS view from the submitting host, started with every worker seen idle."""
    watch = MdnsWatcher(grid.submitter)
    try:
        watch.wait_until(
            lambda w: all(states(w, spec.name)[-1:] == ["idle"] for spec in _WORKERS),
            _SEEN_DEADLINE_S,
            "every worker idle",
        )
        yield watch
    finally:
        watch.stop()


def states(watcher: MdnsWatcher, name: str) -> list[str | None]:
    """Every state peer `name` was seen in, in order."""
    return [state for state, _ in watcher.history(name)]


def _write_workflow(wf_dir: Path) -> tuple[Path, list[str], dict[str, str]]:
    """A small DAG: five producers, one task reading a submitted file, one join.

    Returns the workflow file, its task names and the final outputs with their content.
    """
    wf_dir.mkdir(parents=True)
    (wf_dir / "seed.txt").write_text("bonjour grid\n")
    tasks: dict[str, dict[str, Any]] = {
        f"make_{i}": {
            "command": f"mkdir -p out && echo value-{i} > out/v{i}.txt",
            "outputs": [f"out/v{i}.txt"],
        }
        for i in range(1, 6)
    }
    tasks["shout"] = {
        "command": "mkdir -p out && tr a-z A-Z < seed.txt > out/shout.txt",
        "inputs": ["seed.txt"],
        "outputs": ["out/shout.txt"],
    }
    tasks["join"] = {
        "command": "mkdir -p out && cat out/v1.txt out/v2.txt out/v3.txt > out/joined.txt",
        "inputs": ["out/v1.txt", "out/v2.txt", "out/v3.txt"],
        "outputs": ["out/joined.txt"],
    }
    wf = wf_dir / "wf.yaml"
    wf.write_text(yaml.safe_dump({"name": "lan-join", "tasks": tasks}, sort_keys=False))
    # Final outputs (no task reads them) come back to the workflow's directory.
    finals = {
        "out/joined.txt": "value-1\nvalue-2\nvalue-3\n",
        "out/v4.txt": "value-4\n",
        "out/v5.txt": "value-5\n",
        "out/shout.txt": "BONJOUR GRID\n",
    }
    return wf, list(tasks), finals


def test_mdns_crosses_the_test_lan(lan4: Lan) -> None:
    """A python-zeroconf service in one namespace is found and resolved from another."""
    a, b = lan4.hosts[0], lan4.hosts[1]
    service = "_bgsmoke._tcp.local."
    register = r"""
import socket, sys, threading
from zeroconf import ServiceInfo, Zeroconf
ip, service = sys.argv[1], sys.argv[2]
zc = Zeroconf()
zc.register_service(ServiceInfo(service, "smoke-a." + service, port=4242,
    addresses=[socket.inet_aton(ip)], properties={"state": "idle"}, server="smoke-a.local."))
print("registered", flush=True)
threading.Event().wait()
"""
    browse = r"""
import json, sys, threading, time
from zeroconf import ServiceBrowser, Zeroconf
service, wait_s = sys.argv[1], float(sys.argv[2])
start = time.monotonic()
zc = Zeroconf()
names, found = [], threading.Event()
def on_change(zeroconf, service_type, name, state_change):
    names.append(name)
    found.set()
ServiceBrowser(zc, service, handlers=[on_change])
if not found.wait(wait_s):
    sys.exit("nothing found")
info = zc.get_service_info(service, names[0], timeout=3000)
if info is None:
    sys.exit(f"{names[0]} found but not resolved")
print(json.dumps({"name": info.name, "addresses": info.parsed_addresses(), "port": info.port,
    "state": info.properties.get(b"state", b"").decode(), "found_s": time.monotonic() - start}))
zc.close()
"""
    registrar = a.popen([sys.executable, "-c", register, a.ip, service])
    try:
        done = b.run([sys.executable, "-c", browse, service, "10"], timeout=30)
        assert registrar.poll() is None, "the registering side died (logs below)"
        assert done.returncode == 0, f"not found across the LAN: {done.stderr}"
        seen = json.loads(done.stdout)
        assert seen["name"] == "smoke-a." + service
        assert seen["addresses"] == [a.ip]
        assert seen["port"] == 4242
        assert seen["state"] == "idle"
    finally:
        registrar.terminate()
        registrar.wait(timeout=10)


def _our_namespaces() -> set[str]:
    """Namespaces named like the ones this process creates."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    return {name for name in names if name.startswith(namespace_prefix())}


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _skip_without_lan() -> None:
    reason = lan_available()
    if reason is not None:
        pytest.skip(reason)


def test_lan_teardown_leaves_nothing_behind(tmp_path: Path) -> None:
    """close() kills even a process that left its group, and deletes every namespace."""
    _skip_without_lan()
    before = _our_namespaces()
    lan = Lan(2, tmp_path, rate="100mbit")
    escape = "setsid sleep 600 >/dev/null 2>&1 & echo $!"  # a grandchild in a session of its own
    escapee = int(lan.hosts[0].run(["sh", "-c", escape], timeout=10, check=True).stdout)
    lan.hosts[1].popen(["sleep", "600"])
    with pytest.raises(subprocess.TimeoutExpired):  # even with a pipe held by an escapee
        lan.hosts[1].run(["sh", "-c", "setsid sleep 600 & sleep 600"], timeout=0.5)
    assert _our_namespaces() - before == {lan.switch, *(h.name for h in lan.hosts)}
    lan.close()
    lan.close()  # idempotent
    assert _our_namespaces() == before
    assert not _running(escapee), "a process started in a host survived close()"
    assert all(p.proc.poll() is not None for h in lan.hosts for p in h.processes)


def test_failed_setup_deletes_what_it_made(tmp_path: Path) -> None:
    """A LAN whose setup fails half-way (bad tc rate) leaves no namespace behind."""
    _skip_without_lan()
    before = _our_namespaces()
    with pytest.raises(LanSetupError, match="tbf"):
        Lan(2, tmp_path, rate="not-a-rate")
    assert _our_namespaces() == before


def test_link_down_cuts_a_host_off_and_up_restores_it(tmp_path: Path) -> None:
    """set_link(False) makes a host unreachable; set_link(True) brings it and multicast back."""
    _skip_without_lan()
    probe = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], 9), timeout=float(sys.argv[2])).close()
except ConnectionRefusedError:
    print("reachable")  # the host answered: nothing listens on port 9
except OSError as err:
    print(f"unreachable: {err}")
"""
    with Lan(2, tmp_path) as lan:
        a, b = lan.hosts

        def reach() -> str:
            done = b.run([sys.executable, "-c", probe, a.ip, "1.0"], timeout=10, check=True)
            return done.stdout.strip()

        assert reach() == "reachable"
        a.set_link(False)
        assert reach().startswith("unreachable")
        a.set_link(True)
        assert reach() == "reachable"
        routes = a.run(["ip", "route"], timeout=10, check=True).stdout
        assert "224.0.0.0/4 dev eth0" in routes


def test_every_worker_is_seen_from_another_host(grid: Grid, bgrid: Bgrid) -> None:
    """Three daemons with different RAM and cost show up idle, with what they declared."""
    peers = _poll_peers(bgrid, grid, _all_idle, _SEEN_DEADLINE_S, "all three workers idle")
    print(f"all workers seen {time.monotonic() - grid.started_at:.1f} s after start")
    ours = _ours(peers)
    for spec in _WORKERS:
        peer = ours[spec.name]
        assert peer["state"] == "idle"
        assert peer["job"] is None
        assert peer["ram"] == spec.ram_mib, f"{spec.name}: ram {peer['ram']} MiB"
        assert peer["cost"] == pytest.approx(spec.cost), f"{spec.name}: cost {peer['cost']}"
        assert peer["cpus"] == spec.cpus
        assert grid.host_of(spec).ip in peer["addresses"], (
            f"{spec.name} runs on {grid.host_of(spec).ip} but advertises {peer['addresses']}"
        )
        assert isinstance(peer["port"], int) and peer["port"] > 0
        assert peer["key"], f"{spec.name} advertises no CURVE key"
    grids = {p["grid"] for p in ours.values()}
    assert len(grids) == 1 and "" not in grids, f"one grid key, several fingerprints: {grids}"


def test_job_runs_only_on_peers_that_fit_and_hands_them_back(
    grid: Grid, bgrid: Bgrid, watcher: MdnsWatcher, tmp_path: Path
) -> None:
    """`--require ram>=4GiB`: tasks run on mid and big only, outputs come home, all idle after."""
    _poll_peers(bgrid, grid, _all_idle, _SEEN_DEADLINE_S, "all workers idle before submit")
    wf, task_names, finals = _write_workflow(tmp_path / "wf")
    report_path = tmp_path / "report.json"
    done = bgrid(
        grid.submitter,
        "submit", str(wf),
        "--require", "ram>=4GiB",
        "--workers", "1..3",
        "--report", str(report_path),
        timeout=_SUBMIT_TIMEOUT_S,
        cwd=grid.submitter.dir,  # not the workflow dir: outputs must go there anyway
    )  # fmt: skip
    assert done.returncode == 0, _explain(done)
    assert "Traceback" not in done.stderr, _explain(done)

    report = json.loads(report_path.read_text())
    assert report["status"] == "succeeded"
    assert set(report["tasks"]) == set(task_names)
    fit = {spec.name for spec in _WORKERS if spec.ram_mib >= 4096}
    placed = {name: task["peer"] for name, task in report["tasks"].items()}
    assert set(placed.values()) <= fit, f"tasks ran on peers without 4 GiB: {placed}"
    assert all(task["exit_code"] == 0 for task in report["tasks"].values()), report["tasks"]
    recruited = {peer["name"] for peer in report["peers"]}
    assert recruited and recruited <= fit, f"recruited {recruited}, only {fit} fit"

    for rel, content in finals.items():
        path = wf.parent / rel
        assert path.is_file(), f"{rel} did not come back to {wf.parent}"
        assert path.read_text() == content, f"{rel} holds {path.read_text()!r}"

    _poll_peers(bgrid, grid, _all_idle, _IDLE_AGAIN_DEADLINE_S, "every peer idle after the job")
    assert set(states(watcher, "small")) == {"idle"}, "a peer with 2 GiB left idle for the job"


_API_SCRIPT = """
import json, sys
import networkx as nx
from bonjourgrid import Workflow, run

root = sys.argv[1]
G = nx.DiGraph(name="lan-api")
for i in (1, 2, 3):
    G.add_node(f"make_{i}", command=f"echo value-{i} > v{i}.txt", outputs=[f"v{i}.txt"])
G.add_node("join", command="cat v1.txt v2.txt v3.txt > joined.txt",
           inputs=["v1.txt", "v2.txt", "v3.txt"], outputs=["joined.txt"])
report = run(Workflow.from_graph(G, root=root), require="ram>=4GiB", workers="1..3")
print(json.dumps({"status": report.status, "recruited": [p.name for p in report.peers],
                  "placed": {name: task.peer for name, task in report.tasks.items()}}))
"""


def test_the_python_api_runs_a_networkx_workflow_on_the_lan(
    grid: Grid, bgrid: Bgrid, tmp_path: Path
) -> None:
    """`bonjourgrid.run` from host 4, with `bgrid submit`'s options: the same job, silently."""
    _poll_peers(bgrid, grid, _all_idle, _SEEN_DEADLINE_S, "all workers idle before the run")
    root = tmp_path / "api"
    root.mkdir()
    done = grid.submitter.run(
        [sys.executable, "-c", _API_SCRIPT, str(root)],
        timeout=_SUBMIT_TIMEOUT_S,
        cwd=grid.submitter.dir,
    )
    assert done.returncode == 0, f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.stderr == "", done.stderr  # run() prints nothing, not even progress
    said = json.loads(done.stdout)
    fit = {spec.name for spec in _WORKERS if spec.ram_mib >= 4096}
    assert said["status"] == "succeeded"
    assert set(said["placed"].values()) <= fit and set(said["recruited"]) <= fit, said
    assert (root / "joined.txt").read_text() == "value-1\nvalue-2\nvalue-3\n"
    _poll_peers(bgrid, grid, _all_idle, _IDLE_AGAIN_DEADLINE_S, "every peer idle after the run")


def test_coordinator_of_another_grid_recruits_nobody(
    grid: Grid, bgrid: Bgrid, watcher: MdnsWatcher, tmp_path: Path
) -> None:
    """A coordinator holding another grid's key finds no peer: exit 3, says why, none reserved."""
    _poll_peers(bgrid, grid, _all_idle, _SEEN_DEADLINE_S, "all workers idle before submit")
    other = {"XDG_CONFIG_HOME": str(tmp_path / "other-config")}
    _keys_init(bgrid, grid.submitter, env=other)
    wf, _, finals = _write_workflow(tmp_path / "wf")
    done = bgrid(
        grid.submitter,
        "submit", str(wf),
        "--workers", "1..3",
        "--report", str(tmp_path / "report.json"),
        env=other,
        timeout=_SUBMIT_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 3, _explain(done)
    assert "grid" in done.stderr.lower(), f"stderr does not say the grid differs:\n{done.stderr}"
    assert "Traceback" not in done.stderr, _explain(done)
    assert not any((wf.parent / rel).exists() for rel in finals), "a task ran anyway"

    seen = {spec.name: states(watcher, spec.name) for spec in _WORKERS}
    assert all(set(states) == {"idle"} for states in seen.values()), f"states seen: {seen}"
    _poll_peers(bgrid, grid, _all_idle, _IDLE_AGAIN_DEADLINE_S, "every peer still idle")


def test_workers_exit_cleanly_on_sigterm(grid: Grid, bgrid: Bgrid) -> None:
    """Last (stops the shared workers): SIGTERM ends every daemon with exit 0, and it is gone."""
    grid.assert_alive()
    for proc in grid.procs.values():
        proc.send_signal(signal.SIGTERM)
    codes: dict[str, int | None] = {}
    for name, proc in grid.procs.items():
        try:
            codes[name] = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            codes[name] = None
    assert codes == {spec.name: 0 for spec in _WORKERS}, f"exit codes on SIGTERM: {codes}"
    done = bgrid(grid.submitter, "peers", "--json", timeout=30)
    assert done.returncode == 0, _explain(done)
    assert _ours(json.loads(done.stdout)) == {}, "stopped workers still listed"
