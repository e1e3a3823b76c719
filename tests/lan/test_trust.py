"""Trust on a real LAN: a keyless host that copies a real peer's TXT record gets nothing.

Four hosts in network namespaces: host 1 runs the real (enrolled) worker, host 3 submits,
both holding the grid key; host 2 holds no key at all and runs `impostor.py`, which copies
every TXT field of the real peer, ranks itself first (cost 0, 64 CPUs) and records whatever
reaches its sockets.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import wait_until

from .conftest import Bgrid
from .harness import SEEN_S, LanGrid
from .netns import Lan

_WORKER, _IMPOSTOR, _SUBMITTER = 0, 1, 3
_SCRIPT = Path(__file__).resolve().parent / "impostor.py"


@pytest.fixture(scope="module")
def trust_lan(lan4: Lan, bgrid: Bgrid) -> Lan:
    """The grid key on the worker's and the submitter's hosts only."""
    first = lan4.hosts[_WORKER]
    done = bgrid(first, "keys", "init", timeout=30)
    assert done.returncode == 0, done.stderr
    key_dir = Path(first.env["XDG_CONFIG_HOME"]) / "bonjourgrid"
    target = Path(lan4.hosts[_SUBMITTER].env["XDG_CONFIG_HOME"]) / "bonjourgrid"
    shutil.copytree(key_dir, target, dirs_exist_ok=True)
    return lan4


@pytest.fixture
def grid(trust_lan: Lan, bgrid: Bgrid, tmp_path: Path) -> Generator[LanGrid, None, None]:
    lan_grid = LanGrid(trust_lan, bgrid, tmp_path, _SUBMITTER)
    try:
        yield lan_grid
    finally:
        lan_grid.stop_workers()


def test_an_impostor_copying_every_txt_field_receives_nothing(
    grid: LanGrid, bgrid: Bgrid, tmp_path: Path
) -> None:
    real = grid.start_worker("real", _WORKER, cost=1.0)
    grid.wait_idle([real], SEEN_S, "the real worker to be listed")
    host = grid.lan.hosts[_IMPOSTOR]
    assert not (Path(host.env["XDG_CONFIG_HOME"]) / "bonjourgrid").exists()  # keyless
    log = tmp_path / "impostor.json"
    alias = f"impostor-{grid.tag}"
    args = ["--copy", real.name, "--as", alias, "--ip", host.ip, "--log", str(log)]
    impostor = host.popen([sys.executable, str(_SCRIPT), *args])
    try:

        def heard() -> dict[str, Any]:
            return dict(json.loads(log.read_text())) if log.is_file() else {}

        wait_until(lambda: bool(heard().get("advertised")), SEEN_S, "the impostor to advertise")

        def listed() -> bool:
            done = bgrid(grid.submitter, "peers", "--json", "--wait", "0.5", timeout=30)
            names = {p["name"] for p in json.loads(done.stdout or "[]")}
            return {f"{alias}-own", f"{alias}-copy"} <= names

        wait_until(listed, SEEN_S, "the submitter to see the impostor")

        secret = "the payroll of the lab\n"
        wf = grid.workflow(
            "payroll",
            {
                "t": {
                    "command": "sha256sum < secret.txt > out.txt && echo $API_TOKEN >> out.txt",
                    "inputs": ["secret.txt"],
                    "outputs": ["out.txt"],
                    "env": {"API_TOKEN": "s3cret-token"},
                }
            },
        )
        (wf.parent / "secret.txt").write_text(secret)
        done = grid.submit(wf)
        assert done.code == 0, done.explain()
        assert done.task("t")["peer"] == real.name
        digest = hashlib.sha256(secret.encode()).hexdigest()
        assert (wf.parent / "out.txt").read_text() == f"{digest}  -\ns3cret-token\n"

        caught = heard()
        assert caught["copied"]["cred"], "the real peer advertises its credential"
        # Neither credential verifies (the grid signed another key, or another name): the
        # coordinator never even connects, let alone sends a probe, a task or a job key.
        nothing = {"accepted": 0, "handshakes": 0, "messages": []}
        assert caught["own-key"] == nothing and caught["real-key"] == nothing
    finally:
        impostor.terminate()
        impostor.wait(timeout=10)
