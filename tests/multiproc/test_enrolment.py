"""Enrolling a desktop, as README shows it: `bgrid keys enroll` on a submitting desktop, one
`bgrid keys join` line on the worker's; revoking it; impostors that copy a real peer's TXT.
Real `bgrid` processes over 127.0.0.1."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import zmq

from bonjourgrid.discovery.txt import peer_txt
from tests.multiproc.conftest import LOOPBACK, Grid, RogueHost, bgrid_cmd, submit, write_workflow
from tests.records import idle_peer

pytestmark = pytest.mark.timeout(120)

ONE_TASK = "tasks:\n  t: {command: 'echo ran on $BGRID_JOB > t.txt', outputs: [t.txt]}\n"


def desk(grid: Grid, name: str) -> Grid:
    """Another desktop: a config directory of its own, nothing in it yet."""
    other = Grid(grid.root.parent / name)
    other.root.mkdir()
    other.tag = grid.tag
    return other


def test_an_enrolled_desktop_works_for_the_grid_until_it_is_revoked(
    tmp_path: Path, grid: Grid
) -> None:
    lab = desk(grid, "lab")
    name = f"lab-{grid.tag}"
    # Without enrolment a desktop holding the grid's public key does not start.
    (lab.root / "config" / "bonjourgrid").mkdir(parents=True)
    (lab.root / "config" / "bonjourgrid" / "grid.key").write_bytes(
        (grid.root / "config" / "bonjourgrid" / "grid.key").read_bytes()
    )
    refused = lab.run("worker", "--interface", LOOPBACK, "--always-idle", timeout=20)
    assert refused.returncode == 2, refused.stderr
    assert "not enrolled" in refused.stderr and "bgrid keys enroll" in refused.stderr

    enrolled = grid.run("keys", "enroll", name, check=True).stdout
    token = next(w for w in enrolled.split() if w.startswith("bgrid-enroll-1:"))
    joined = lab.run("keys", "join", token, check=True).stdout
    assert f"worker {name!r}" in joined

    log = open(lab.root / f"{name}.log", "wb")  # noqa: SIM115
    lab.procs[name] = subprocess.Popen(  # no --name: the enrolled name
        bgrid_cmd("worker", "--interface", LOOPBACK, "--always-idle"),
        env=lab.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        lab.wait_all_idle()
        wf = write_workflow(tmp_path / "wf", ONE_TASK)
        code, report, out = submit(grid, wf)
        assert code == 0, out + lab.logs()
        assert report["tasks"]["t"]["peer"] == name

        revoked = grid.run("keys", "revoke", name, check=True).stdout
        assert "revoked 1 credential" in revoked
        listed = grid.run("keys", "list", check=True).stdout
        assert name in listed and "revoked" in listed
        code, _, out = submit(grid, wf)
        assert code == 3, out
        assert "was revoked" in out
    finally:
        lab.stop()


def test_a_desktop_enrolled_under_one_name_does_not_start_under_another(grid: Grid) -> None:
    lab = desk(grid, "lab")
    token = next(
        w
        for w in grid.run("keys", "enroll", "lab-1", check=True).stdout.split()
        if w.startswith("bgrid-enroll-1:")
    )
    lab.run("keys", "join", token, check=True)
    out = lab.run("worker", "--name", "lab-2", "--interface", LOOPBACK, timeout=20)
    assert out.returncode == 2
    assert "enrolled as 'lab-1'" in out.stderr


@pytest.mark.parametrize("copied", ["own-key", "every-field"])
def test_an_impostor_copying_a_real_peer_s_txt_receives_nothing(
    tmp_path: Path, grid: Grid, rogue: RogueHost, copied: str
) -> None:
    """A keyless host copies a real peer's TXT (fingerprint, credential; its own key, or the
    real one too), at cost 0 with 64 CPUs so it ranks first: its credential does not verify,
    the job runs on the real peer, and the impostor's socket never receives a message (no
    command, env, key or digest)."""
    real = grid.start_worker("real", "--cost", "5")
    listed = grid.wait_all_idle()[real]
    ctx = zmq.Context()
    trap = ctx.socket(zmq.ROUTER)
    public, secret = zmq.curve_keypair()
    trap.curve_server, trap.curve_publickey, trap.curve_secretkey = True, public, secret
    port = trap.bind_to_random_port(f"tcp://{LOOPBACK}")
    fake = idle_peer(
        f"impostor-{grid.tag}",
        port=port,
        cpus=64,
        key=public.decode() if copied == "own-key" else listed["key"],
        grid=listed["grid"],
        cred=listed["cred"],
    )
    # (Under the real peer's very name, the credential would verify and the handshake,
    # pinned to the real key, keep the impostor out; but the two records then race in the
    # browser: see test_hostile's same-name impostor test.)
    rogue.advertise(fake.name, port, peer_txt(fake))
    try:
        wf = write_workflow(
            tmp_path / "wf",
            "tasks:\n  t:\n    command: 'echo $API_TOKEN | sha256sum > t.txt'\n"
            "    outputs: [t.txt]\n    env: {API_TOKEN: s3cret}\n",
        )
        code, report, out = submit(grid, wf)
        assert code == 0, out + grid.logs()
        assert report["tasks"]["t"]["peer"] == real
        received = 0
        while trap.poll(0):
            trap.recv_multipart()
            received += 1
        assert received == 0
    finally:
        trap.close(linger=0)
        ctx.term()
