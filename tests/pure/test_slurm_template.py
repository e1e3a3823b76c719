"""The slurm backend's generated files (golden) and its readings of Slurm's output.

The golden files are what tests/lan/test_slurm_cluster.py proved on real daemons. After a
deliberate change, regenerate them with `BGRID_REGENERATE_GOLDEN=1 pytest tests/pure/...`
and read the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bonjourgrid.backends.base import (
    Backend,
    BackendContext,
    Commands,
    HeldPeer,
    JobPlan,
    PeerGone,
    TaskFailed,
    TaskFinished,
    TaskRun,
)
from bonjourgrid.backends.slurm import SlurmBackend, template

GOLDEN = Path(__file__).parent / "golden" / "slurm"
REGENERATE = os.environ.get("BGRID_REGENERATE_GOLDEN") == "1"

LAYOUT = template.ClusterLayout(
    job="montage",
    controller_host="desk0",
    controller_address="10.0.0.1",
    controller_port=41817,
    slurmd_port=41818,
    user="alice",
    state_dir="/home/alice/run/.bgrid/slurm",
    munge_socket="/home/alice/run/.bgrid/slurm/munge/munge.socket",
)
PEERS = (
    HeldPeer("desk2", "10.0.0.2", cpus=4, ram=8 * 2**30, middleware=frozenset({"slurm"})),
    HeldPeer("Bob's iMac", "10.0.0.3", cpus=2, ram=3 * 2**30 + 5, middleware=frozenset({"slurm"})),
)
RUN = TaskRun(
    task="add",
    attempt=2,
    peer="Bob's iMac",
    command="python3 add.py proj/*.fits mosaic.fits",
    cpus=2,
    ram=512 * 2**20,
    parents=("project_1", "project_2"),
)


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGENERATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with BGRID_REGENERATE_GOLDEN=1 once"
    assert text == path.read_text(), f"{name} changed: BGRID_REGENERATE_GOLDEN=1 to accept"


def test_controller_slurm_conf() -> None:
    assert_golden("controller.slurm.conf", template.controller_conf(LAYOUT, PEERS))


def test_peer_slurm_conf_names_its_service_directory() -> None:
    text = template.node_conf(LAYOUT, PEERS[1], "/var/lib/bgrid/svc/m1/munge.socket")
    assert "SlurmdSpoolDir={dir}/spool" in text
    assert_golden("peer.slurm.conf", text)


def test_dynamic_peer_slurm_conf_has_no_node_line() -> None:
    text = template.node_conf(LAYOUT, None, "/s/munge.socket")
    assert "NodeName=" not in text


def test_batch_script_pins_the_peer_and_waits_for_the_parents() -> None:
    step = template.task_step_argv("/var/lib/bgrid/svc/d1", "montage", RUN)
    script = template.batch_script(
        "montage", RUN, node_dir="/var/lib/bgrid/svc/d1", step=step, parent_ids=["12", "9"]
    )
    assert "#SBATCH --dependency=afterok:9:12\n" in script
    assert_golden("add.2.sbatch", script)


def test_batch_script_without_parents_or_ram() -> None:
    run = TaskRun(task="first one", attempt=1, peer="desk2", command="true")
    script = template.batch_script("j", run, node_dir="/d", step=("true",))
    assert "--dependency" not in script and "--mem" not in script
    assert "#SBATCH --job-name=bgrid-j-first_one-1\n" in script


def test_batch_script_needs_the_core_placement() -> None:
    run = TaskRun(task="t", attempt=1, peer=None, command="true")
    with pytest.raises(ValueError, match="placement"):
        template.batch_script("j", run, node_dir="/d", step=("true",))


@pytest.mark.parametrize(
    ("peer", "node"),
    [("desk2", "desk2"), ("Bob's iMac", "bob-s-imac-"), ("7up", "7up-"), ("éé", "peer-")],
)
def test_node_names_are_slurm_safe_and_distinct(peer: str, node: str) -> None:
    name = template.node_name(peer)
    assert name.startswith(node)
    assert all(c.islower() or c.isdigit() or c == "-" for c in name)
    assert template.node_name(peer.upper()) != name or peer.upper() == peer


def test_translate_gives_the_conf_and_a_script_per_run(tmp_path: Path) -> None:
    context = BackendContext(
        job="montage", root=tmp_path, state_dir=tmp_path / "state", commands=Commands(),
        options={"controller_port": "41817", "slurmd_port": "41818"},
    )  # fmt: skip
    backend: Backend = SlurmBackend(context)
    plan = JobPlan(job="montage", root=tmp_path, peers=PEERS, runs=(RUN,))
    files = backend.translate(plan)
    assert sorted(files) == ["bgrid-montage-add-2.sh", "slurm.conf"]
    assert "--dependency=afterok:<project_1>:<project_2>" in files["bgrid-montage-add-2.sh"]
    assert "SlurmctldPort=41817" in files["slurm.conf"]
    assert SlurmBackend.capabilities.middleware == "slurm"


# -- readings: real output of Slurm 22.05 (captured on the test LAN) ---------------------------

SQUEUE = """\
1|bgrid-x-a-1|COMPLETED|n2|None
2|bgrid-x-b-1|PENDING||Dependency
4|b|FAILED|n3|NonZeroExitCode
5|c|PENDING||DependencyNeverSatisfied
"""

SCONTROL = (
    "JobId=4 JobName=b UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901757 "
    "Nice=0 Account=(null) QOS=(null) JobState=FAILED Reason=NonZeroExitCode "
    "Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=3:0 "
    "RunTime=00:00:00 AllocNode:Sid=localhost:22097 ReqNodeList=n3 ExcNodeList=(null) "
    "NodeList=n3 BatchHost=n3 NumNodes=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* "
    "NtasksPerN:B:S:C=0:0:*:* Command=(null) WorkDir=/tmp/slx StdOut=/tmp/a b.out Power=\n"
    "JobId=9 JobName=d JobState=NODE_FAIL Reason=None ExitCode=0:0 NodeList=n4\n"
    "JobId=10 JobName=e JobState=CANCELLED Reason=None ExitCode=0:15 NodeList=(null)\n"
)

SINFO = """\
n2|idle|none
n3|drained|peer left
n4|down*|Not responding
n5|idle~|none
n6|mixed|none
"""


def test_squeue_rows() -> None:
    rows = template.parse_squeue(SQUEUE)
    assert [(r.job_id, r.state, r.node, r.reason) for r in rows] == [
        ("1", "COMPLETED", "n2", "None"),
        ("2", "PENDING", "", "Dependency"),
        ("4", "FAILED", "n3", "NonZeroExitCode"),
        ("5", "PENDING", "", "DependencyNeverSatisfied"),
    ]
    with pytest.raises(ValueError, match=r"want 5 '\|'-separated"):
        template.parse_squeue("1|a|RUNNING\n")


def test_scontrol_rows_carry_the_exit_code() -> None:
    failed, lost, cancelled = template.parse_scontrol_jobs(SCONTROL)
    assert (failed.job_id, failed.state, failed.exit_code, failed.node) == ("4", "FAILED", 3, "n3")
    assert (cancelled.node, cancelled.signal) == ("", 15)
    assert template.parse_key_values(SCONTROL.splitlines()[0])["StdOut"] == "/tmp/a b.out"
    assert template.parse_scontrol_jobs("No jobs in the system\n") == []
    assert template.run_outcome(failed, "b", 1, "bob") == [
        TaskFailed("b", 1, "bob", "exit 3", exit_code=3)
    ]
    assert template.run_outcome(lost, "d", 2, "bob") == [
        PeerGone("bob", "node lost (Slurm: NODE_FAIL)"),
        TaskFailed("d", 2, "bob", "node lost (Slurm: NODE_FAIL)"),
    ]
    assert template.run_outcome(cancelled, "e", 1, "bob") == [
        TaskFailed("e", 1, "bob", "cancelled in Slurm")
    ]


def test_outcomes_of_active_and_completed_jobs() -> None:
    done, pending, _, never = template.parse_squeue(SQUEUE)
    assert template.run_outcome(done, "a", 1, "p") == [TaskFinished("a", 1, "p")]
    assert template.run_outcome(pending, "b", 1, "p") == []
    assert template.run_outcome(never, "c", 1, "p") == []  # squeue shows it pending


def test_sinfo_node_states() -> None:
    nodes = {n.name: n for n in template.parse_sinfo_nodes(SINFO)}
    assert {n for n, row in nodes.items() if template.node_ready(row)} == {"n2", "n6"}
    assert {n for n, row in nodes.items() if template.node_lost(row)} == {"n4"}
    assert nodes["n3"].reason == "peer left"
