"""The condor backend's files: golden files, and a round trip through HTCondor's own parsers
(no daemon needed): the DAG through `Submit.from_dag`, each submit description through
`htcondor2.Submit`, the configs through the bindings' config reader in a subprocess.

Regenerate the golden files after an intended change:
    BGRID_REGEN_GOLDEN=1 .venv/bin/pytest -q tests/pure/test_condor_translate.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

htcondor2 = pytest.importorskip("htcondor2", reason="the condor extra is not installed")

from bonjourgrid.backends.base import (  # noqa: E402
    BackendContext,
    Commands,
    HeldPeer,
    JobPlan,
    StagedInput,
    TaskRun,
)
from bonjourgrid.backends.condor import CondorBackend, template  # noqa: E402
from bonjourgrid.cache.store import FileRef  # noqa: E402
from bonjourgrid.errors import ConfigError  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "condor" / "diamond"
REGENERATE = os.environ.get("BGRID_REGEN_GOLDEN") == "1"
GIB = 1024**3
REF = FileRef("0" * 64, 6)


def diamond_plan() -> JobPlan:
    """The diamond of examples/dags with files: a -> b, c -> d."""
    a_txt = StagedInput("a.txt", REF)
    return JobPlan(
        job="diamond-1a2b3c",
        root=Path("/home/user/work"),
        coordinator="10.77.0.1",
        peers=(
            HeldPeer("desk-2", "10.77.0.2", cpus=4, ram=8 * GIB, middleware=frozenset({"condor"})),
            HeldPeer("desk-3", "10.77.0.3", cpus=2, ram=3 * GIB, middleware=frozenset({"condor"})),
        ),
        runs=(
            TaskRun("a", 1, None, "echo 'it''s a' > a.txt", outputs=("a.txt",), retries=2),
            TaskRun("b", 1, None, "tr a-z A-Z < a.txt > out/b.txt", inputs=(a_txt,),
                    outputs=("out/b.txt",), parents=("a",), ram=512 * 1024**2,
                    env={"LANG": "C", "GREETING": 'say "hi" now'}),
            TaskRun("c", 1, None, "wc -c a.txt > c.txt", inputs=(a_txt,), outputs=("c.txt",),
                    parents=("a",), cpus=2, limits={"wall_s": 90}),
            TaskRun("d", 1, None, "cat out/b.txt c.txt > d.txt",
                    inputs=(StagedInput("out/b.txt", REF), StagedInput("c.txt", REF)),
                    outputs=("d.txt",), parents=("b", "c"), retries=1),
        ),
    )


def backend(state_dir: Path = Path("/home/user/work/.bgrid/diamond-1a2b3c")) -> CondorBackend:
    return CondorBackend(
        BackendContext(
            job="diamond-1a2b3c",
            root=Path("/home/user/work"),
            state_dir=state_dir,
            commands=Commands(),
            options={"coordinator": "10.77.0.1", "collector_port": "9700"},
        )
    )


def test_the_files_match_the_golden_files() -> None:
    files = backend().translate(diamond_plan())
    if REGENERATE:
        for name, text in files.items():
            (GOLDEN / name).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / name).write_text(text)
        (GOLDEN / "INDEX.json").write_text(json.dumps(sorted(files), indent=1) + "\n")
    assert sorted(files) == json.loads((GOLDEN / "INDEX.json").read_text())
    for name, text in files.items():
        assert text == (GOLDEN / name).read_text(), f"{name} differs from its golden file"


def test_the_same_plan_gives_the_same_files_in_another_interpreter() -> None:
    """DAGMan's writer walks sets: a different hash seed must not reorder our DAG."""
    code = (
        "import json, sys; sys.path.insert(0, 'tests/pure');"
        "from test_condor_translate import backend, diamond_plan;"
        "print(json.dumps(backend().translate(diamond_plan())))"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    ]
    assert runs[0] == runs[1]


def _dag_structure(text: str) -> tuple[list[str], set[tuple[str, str]], dict[str, int]]:
    jobs, edges, retries = [], set(), {}
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "JOB":
            jobs.append(words[1])
            assert words[2] == f"{words[1]}.sub"
        elif words[0] == "PARENT":
            split = words.index("CHILD")
            edges |= {(p, c) for p in words[1:split] for c in words[split + 1:]}
        elif words[0] == "RETRY":
            retries[words[1]] = int(words[2])
        else:
            pytest.fail(f"unexpected DAG line {line!r}")
    return jobs, edges, retries


def test_the_dag_holds_the_plans_edges_and_retries_and_dagman_takes_it(tmp_path: Path) -> None:
    plan = diamond_plan()
    files = backend().translate(plan)
    jobs, edges, retries = _dag_structure(files[template.DAG_FILE])
    assert jobs == ["a", "b", "c", "d"]
    assert edges == {("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")}
    assert retries == {"a": 2, "d": 1}

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    dag = tmp_path / template.DAG_FILE
    # from_dag parses the DAG's commands and writes DAGMan's own submit file; it only needs
    # some condor_dagman executable to name (none is installed here).
    dagman = htcondor2.Submit.from_dag(str(dag), {"dagman": "/bin/true", "batch-name": plan.job})
    assert dagman["universe"] == "scheduler"
    assert f"-Dag {dag}" in dagman["arguments"]
    assert dagman["log"] == f"{dag}.dagman.log"
    assert (tmp_path / f"{template.DAG_FILE}.condor.sub").exists()


def test_from_dag_refuses_a_broken_dag(tmp_path: Path) -> None:
    """The check above has teeth: HTCondor's DAG parser rejects what is not a DAG command."""
    dag = tmp_path / "broken.dag"
    dag.write_text("JOB a a.sub\nRUN a NOW\n")
    with pytest.raises(htcondor2.HTCondorException, match="not a valid DAG command"):
        htcondor2.Submit.from_dag(str(dag), {"dagman": "/bin/true"})


def test_each_submit_description_parses_back_with_its_task() -> None:
    plan = diamond_plan()
    files = backend().translate(plan)
    for run in plan.runs:
        desc = htcondor2.Submit(files[template.submit_file_name(run.task)])
        assert desc["executable"] == "/bin/sh"
        assert desc["universe"] == "vanilla"
        assert desc["should_transfer_files"] == "YES"
        assert desc["initialdir"] == str(plan.root)
        assert desc["My.BgridTask"] == f'"{run.task}"'
        assert desc["My.BgridAttempt"] == str(run.attempt)
        assert desc["request_cpus"] == str(run.cpus)
        inputs = [p.strip() for p in desc.get("transfer_input_files", "").split(",") if p.strip()]
        assert inputs == [item.path for item in run.inputs]
        assert [p.strip() for p in desc["transfer_output_files"].split(",")] == list(run.outputs)
        assert desc["output"].endswith(f"/logs/{run.task}.out")
    b = htcondor2.Submit(files["b.sub"])
    assert b["request_memory"] == "512M"
    assert b["environment"] == "\"GREETING='say \"\"hi\"\" now' LANG='C'\""
    assert htcondor2.Submit(files["c.sub"])["allowed_execute_duration"] == "90"


def test_the_command_reaches_sh_as_one_argument() -> None:
    """HTCondor's argument syntax: what the bindings parse is `-c` and the command, intact."""
    files = backend().translate(diamond_plan())
    arguments = htcondor2.Submit(files["a.sub"])["arguments"]
    assert arguments == "\"'-c' 'echo ''it''''s a'' > a.txt'\""


def _condor_params(config: Path, *names: str) -> dict[str, str | None]:
    """What HTCondor makes of a config file (values as text): the bindings read
    $CONDOR_CONFIG at import, so a fresh interpreter reads ours (and fails on a config
    error). `condor_config_val` is not installed here; the bindings ship the same reader."""
    code = (
        "import json, sys, htcondor2;"
        "v = {k: htcondor2.param.get(k) for k in sys.argv[1:]};"
        "print(json.dumps({k: None if x is None else str(x) for k, x in v.items()}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True,
        env={**os.environ, "CONDOR_CONFIG": str(config)},
    )
    assert done.returncode == 0, done.stderr
    values: dict[str, str | None] = json.loads(done.stdout)
    return values


def test_the_coordinator_config_reads_as_a_central_manager_and_submit_host(tmp_path: Path) -> None:
    files = backend(tmp_path).translate(diamond_plan())
    config = tmp_path / "coordinator.config"
    config.write_text(files[template.COORDINATOR_CONFIG])
    got = _condor_params(
        config, "DAEMON_LIST", "COLLECTOR_HOST", "LOCAL_DIR", "SEC_PASSWORD_FILE",
        "SEC_TOKEN_POOL_SIGNING_KEY_FILE", "SEC_DEFAULT_AUTHENTICATION",
        "SEC_DEFAULT_AUTHENTICATION_METHODS", "SEC_DEFAULT_ENCRYPTION", "TRUST_DOMAIN",
        "COLLECTOR_ARGS",
    )
    assert got["DAEMON_LIST"] is not None
    assert set(got["DAEMON_LIST"].replace(",", " ").split()) == {
        "MASTER", "COLLECTOR", "NEGOTIATOR", "SCHEDD"
    }
    assert got["COLLECTOR_HOST"] == "10.77.0.1:9700"
    assert got["LOCAL_DIR"] == str(tmp_path / "condor")
    pool_key = str(tmp_path / "condor" / template.POOL_KEY)
    assert got["SEC_PASSWORD_FILE"] == pool_key
    assert got["SEC_TOKEN_POOL_SIGNING_KEY_FILE"] == pool_key
    assert got["SEC_DEFAULT_AUTHENTICATION"] == "required"
    assert got["SEC_DEFAULT_ENCRYPTION"] == "required"
    assert got["SEC_DEFAULT_AUTHENTICATION_METHODS"] == "FS, IDTOKENS, PASSWORD"
    assert got["TRUST_DOMAIN"] == "bgrid-diamond-1a2b3c"
    assert got["COLLECTOR_ARGS"] == "-p 9700"


@pytest.mark.parametrize("peer_index", [0, 1])
def test_each_startd_config_reads_as_that_peers_execute_node(
    tmp_path: Path, peer_index: int
) -> None:
    plan = diamond_plan()
    peer = plan.peers[peer_index]
    text = backend().translate(plan)[template.startd_config_name(peer.name)]
    # What the worker does for a service run: fill in its directory, address and port.
    service_dir = tmp_path / "service"
    text = (text.replace("{dir}", str(service_dir)).replace("{host}", peer.address)
            .replace("{port:startd}", "9711"))
    assert "{" not in text
    config = tmp_path / "startd.config"
    config.write_text(text)
    got = _condor_params(
        config, "DAEMON_LIST", "COLLECTOR_HOST", "NUM_CPUS", "MEMORY", "START", "SUSPEND",
        "PREEMPT", "KILL", "SEC_PASSWORD_FILE", "SEC_DEFAULT_AUTHENTICATION_METHODS",
        "NETWORK_INTERFACE", "STARTD_ARGS", "STARTD_ADDRESS_FILE", "SLOT_TYPE_1_PARTITIONABLE",
        "TRUST_DOMAIN",
    )
    assert got["DAEMON_LIST"] is not None
    assert set(got["DAEMON_LIST"].replace(",", " ").split()) == {"MASTER", "STARTD"}
    assert got["COLLECTOR_HOST"] == "10.77.0.1:9700"
    assert got["NUM_CPUS"] == str(peer.cpus)
    assert got["MEMORY"] == str(peer.ram // 1024**2)
    assert (got["START"], got["SUSPEND"], got["PREEMPT"], got["KILL"]) == (
        "True", "False", "False", "False"
    )
    assert got["SEC_PASSWORD_FILE"] == str(service_dir / template.POOL_KEY)
    assert got["SEC_DEFAULT_AUTHENTICATION_METHODS"] == "IDTOKENS, PASSWORD"
    assert got["NETWORK_INTERFACE"] == peer.address
    assert got["STARTD_ARGS"] == "-p 9711"
    assert got["STARTD_ADDRESS_FILE"] == str(service_dir / template.STARTD_READY)
    assert got["SLOT_TYPE_1_PARTITIONABLE"] == "True"
    assert got["TRUST_DOMAIN"] == "bgrid-diamond-1a2b3c"


def test_a_config_error_is_caught_by_the_same_reader(tmp_path: Path) -> None:
    config = tmp_path / "bad.config"
    config.write_text("use ROLE : Nonsense\n")
    with pytest.raises(AssertionError, match="does not recognise Nonsense"):
        _condor_params(config, "DAEMON_LIST")


def test_the_pool_key_is_scrambled_as_htcondor_reads_it() -> None:
    key = b"per-job-key"
    scrambled = template.scramble_pool_key(key)
    assert scrambled != key
    assert template.scramble_pool_key(scrambled) == key  # XOR: the same operation reads it
    assert scrambled[:4] == bytes(b ^ p for b, p in zip(b"per-", b"\xde\xad\xbe\xef", strict=True))


def test_a_task_named_like_a_dagman_keyword_is_refused_with_the_reason() -> None:
    plan = diamond_plan()
    bad = JobPlan(plan.job, plan.root, plan.peers, (TaskRun("parent", 1, None, "true"),))
    with pytest.raises(ConfigError, match="DAGMan reserves that name"):
        backend().translate(bad)
