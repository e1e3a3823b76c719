"""The HTCondor files of a job, pure: a DAGMan DAG, one submit description per task, and the
configs of a personal pool (central manager and submit on the coordinator's host, a startd
on each peer).

Everything here is text built from plain data, so it is golden-file tested and checked by
the bindings' own parsers (`htcondor2.Submit`, `Submit.from_dag`, the config reader) without
any daemon.

Security of the personal pool: one POOL key per job, used as the PASSWORD shared secret and
as the IDTOKENS signing key (HTCondor reads both from `$(SEC_PASSWORD_DIRECTORY)/POOL`). It is
never written into these files: the coordinator writes it 0600, peers receive it as a
service secret on the job's CURVE channel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import htcondor2
from htcondor2 import dags
from htcondor2.dags.formatter import NodeNameFormatter
from htcondor2.dags.writer import DAGWriter

from bonjourgrid.backends.base import HeldPeer, JobPlan, TaskRun
from bonjourgrid.errors import ConfigError

DAG_FILE = "bgrid.dag"
NODES_LOG = DAG_FILE + ".nodes.log"  # DAGMan's default node log: every node job's events
DAGMAN_LOG = DAG_FILE + ".dagman.log"  # the DAGMan job's own events (from Submit.from_dag)
COORDINATOR_CONFIG = "condor/coordinator.config"
STARTD_SERVICE = "condor-startd"
STARTD_CONFIG = "condor_config"  # the startd's config file, in the service's {dir}
STARTD_READY = "log/.startd_address"  # written by the startd once it serves
POOL_KEY = "passwords.d/POOL"  # relative to LOCAL_DIR, where HTCondor looks for it
_MIB = 1024 * 1024
# DAGMan reserves these words; a node cannot be named after one (case does not matter).
_RESERVED_NODE_NAMES = frozenset({"parent", "child", "all_nodes"})


def startd_config_name(peer: str) -> str:
    return f"condor/startd-{peer}.config"


def submit_file_name(task: str) -> str:
    return f"{task}.sub"


# -- the DAG ------------------------------------------------------------------------------


class _TaskNames(NodeNameFormatter):  # type: ignore[misc]  # htcondor2 has no types
    """One DAGMan node per layer, named as the task: `DAG Node: NAME` in the event log is
    then the task's own name (the default formatter would write `NAME:0`)."""

    def generate(self, layer_name: str, node_index: int) -> str:
        return layer_name

    def parse(self, node_name: str) -> tuple[str, int]:
        return node_name, 0


def build_dag(plan: JobPlan, log_dir: Path) -> dags.DAG:
    """The plan as an `htcondor2.dags.DAG`: a layer per task, an edge per parent, RETRY from
    the run's retries."""
    dag = dags.DAG()
    layers = {}
    for run in plan.runs:
        if run.task.lower() in _RESERVED_NODE_NAMES:
            raise ConfigError(
                f"task {run.task!r}: DAGMan reserves that name for its own syntax; "
                "rename the task to run it with --backend condor"
            )
        layers[run.task] = dag.layer(
            name=run.task,
            submit_description=submit_description(run, plan, log_dir),
            retries=run.retries or None,
        )
    for run in plan.runs:
        for parent in run.parents:
            if parent not in layers:
                raise ConfigError(
                    f"task {run.task!r} waits for {parent!r}, which is not in the plan"
                )
            layers[run.task].add_parents(layers[parent])
    return dag


def dag_text(plan: JobPlan, log_dir: Path) -> str:
    """The DAG file, lines in the plan's order.

    `DAGWriter.write` walks the graph in set order (string hashes differ between runs), so
    its own line generators are called here node by node, with each node's edges sorted:
    the same plan always gives the same file."""
    dag = build_dag(plan, log_dir)
    writer = DAGWriter(dag, node_name_formatter=_TaskNames())
    lines: list[str] = ["# BEGIN META", *writer.yield_dag_meta_lines(), "# END META"]
    lines.append("# BEGIN NODES AND EDGES")
    nodes = {node.name: node for node in dag.nodes}
    for run in plan.runs:
        node = nodes[run.task]
        lines.extend(writer.yield_node_lines(node))
        lines.extend(sorted(writer.yield_edge_lines(node)))
    lines.append("# END NODES AND EDGES")
    return "\n".join(lines) + "\n"


# -- one submit description per task --------------------------------------------------------


def _quote_argument(arg: str) -> str:
    """One argument in HTCondor's new argument syntax (inside the outer double quotes):
    single quotes group it, a single quote doubles, a double quote doubles."""
    return "'" + arg.replace("'", "''").replace('"', '""') + "'"


def _environment(env: Mapping[str, str]) -> str:
    """`environment` in the new syntax: "NAME=value ..." with values quoted as arguments."""
    for name in env:
        if not name or "=" in name or any(c.isspace() for c in name):
            raise ConfigError(f"environment variable name {name!r} is not valid for HTCondor")
    return '"' + " ".join(f"{k}={_quote_argument(v)}" for k, v in sorted(env.items())) + '"'


def submit_description(run: TaskRun, plan: JobPlan, log_dir: Path) -> htcondor2.Submit:
    """The task as a vanilla-universe job: `/bin/sh -c COMMAND` in a scratch directory,
    inputs sent from the submit directory and outputs brought back to it by HTCondor's
    file transfer (relative paths kept)."""
    logs = log_dir / run.task
    desc: dict[str, str] = {
        "universe": "vanilla",
        "executable": "/bin/sh",
        "arguments": '"' + " ".join(_quote_argument(a) for a in ("-c", run.command)) + '"',
        "initialdir": str(plan.root),
        "should_transfer_files": "YES",
        "when_to_transfer_output": "ON_EXIT",
        "preserve_relative_paths": "True",
        "transfer_executable": "False",
    }
    if run.inputs:
        desc["transfer_input_files"] = ", ".join(item.path for item in run.inputs)
    if run.outputs:
        # Without it HTCondor brings back every new file of the scratch directory.
        desc["transfer_output_files"] = ", ".join(run.outputs)
    if run.env:
        desc["environment"] = _environment(run.env)
    desc["request_cpus"] = str(max(1, run.cpus))
    if run.ram > 0:
        desc["request_memory"] = f"{math.ceil(run.ram / _MIB)}M"
    wall_s = run.limits.get("wall_s")
    if wall_s:
        # HTCondor holds the job past this; the event reader turns the hold into a failure.
        desc["allowed_execute_duration"] = str(math.ceil(wall_s))
    desc.update(
        {
            "output": f"{logs}.out",
            "error": f"{logs}.err",
            "log": f"{logs}.log",
            "My.BgridJob": f'"{plan.job}"',
            "My.BgridTask": f'"{run.task}"',
            "My.BgridAttempt": str(run.attempt),
            # Written into the event log next to every event: cluster -> task, for readers
            # that have no DAG node name (a plain submit to an existing pool).
            "job_ad_information_attrs": "BgridTask, BgridAttempt",
            "notification": "never",
        }
    )
    return htcondor2.Submit(desc)


# -- the personal pool ------------------------------------------------------------------------


def _security(trust_domain: str, methods: str) -> Iterator[str]:
    yield "# One POOL key per job: the PASSWORD secret and the IDTOKENS signing key."
    yield "use SECURITY : recommended_v9_0"
    yield f"UID_DOMAIN = {trust_domain}"
    yield f"TRUST_DOMAIN = {trust_domain}"
    yield "SEC_PASSWORD_DIRECTORY = $(LOCAL_DIR)/passwords.d"
    yield "SEC_TOKEN_SYSTEM_DIRECTORY = $(LOCAL_DIR)/tokens.d"
    yield "SEC_TOKEN_DIRECTORY = $(LOCAL_DIR)/tokens.d"
    yield f"SEC_DEFAULT_AUTHENTICATION_METHODS = {methods}"
    yield f"SEC_CLIENT_AUTHENTICATION_METHODS = {methods}"
    yield "ALLOW_ADVERTISE_STARTD = condor_pool@$(UID_DOMAIN), condor@$(TRUST_DOMAIN)"
    yield "ALLOW_ADVERTISE_SCHEDD = condor_pool@$(UID_DOMAIN), condor@$(TRUST_DOMAIN)"


def _common(job: str, coordinator: str, collector_port: int) -> Iterator[str]:
    yield f"# HTCondor personal pool of bgrid job {job}: generated, do not edit."
    yield f"CONDOR_HOST = {coordinator}"
    yield f"COLLECTOR_HOST = $(CONDOR_HOST):{collector_port}"
    yield "USE_SHARED_PORT = False"
    yield "MAIL = /bin/true"
    yield "SENDMAIL = /bin/true"
    # Short cycles: a job's pool lives minutes, not months.
    for key in ("UPDATE_INTERVAL", "NEGOTIATOR_INTERVAL", "NEGOTIATOR_CYCLE_DELAY",
                "SCHEDD_INTERVAL", "STARTER_UPDATE_INTERVAL"):
        yield f"{key} = 5"


def trust_domain(job: str) -> str:
    return f"bgrid-{job}"


def coordinator_config(job: str, coordinator: str, collector_port: int, local_dir: Path) -> str:
    """collector, negotiator and schedd (and DAGMan's schedd) on the coordinator's host."""
    lines = [
        *_common(job, coordinator, collector_port),
        "use ROLE : CentralManager",
        "use ROLE : Submit",
        "DAEMON_LIST = MASTER, COLLECTOR, NEGOTIATOR, SCHEDD",
        f"LOCAL_DIR = {local_dir}",
        f"NETWORK_INTERFACE = {coordinator}",
        f"COLLECTOR_ARGS = -p {collector_port}",
        # FS: the coordinator's own process submits and reads the queue on this host.
        *_security(trust_domain(job), "FS, IDTOKENS, PASSWORD"),
        "ALLOW_WRITE = *",  # who may submit: any authenticated identity (see above)
        "FILESYSTEM_DOMAIN = $(UID_DOMAIN)-coordinator",
    ]
    return "\n".join(lines) + "\n"


def startd_config(job: str, coordinator: str, collector_port: int, peer: HeldPeer) -> str:
    """A startd for `peer`, with the CPUs and memory it advertised. `{dir}`, `{host}` and
    `{port:startd}` are filled in by the worker that runs it."""
    memory_mib = max(1, peer.ram // _MIB)
    lines = [
        *_common(job, coordinator, collector_port),
        "use ROLE : Execute",
        "DAEMON_LIST = MASTER, STARTD",
        "LOCAL_DIR = {dir}",
        "NETWORK_INTERFACE = {host}",
        "STARTD_ARGS = -p {port:startd}",
        *_security(trust_domain(job), "IDTOKENS, PASSWORD"),
        f"NUM_CPUS = {max(1, peer.cpus)}",
        f"MEMORY = {memory_mib}",
        # One partitionable slot: tasks take the CPUs and memory they ask for.
        "NUM_SLOTS = 1",
        "NUM_SLOTS_TYPE_1 = 1",
        "SLOT_TYPE_1 = 100%",
        "SLOT_TYPE_1_PARTITIONABLE = True",
        # The peer is recruited for this job: run at once, never suspend, vacate or preempt.
        # The worker stops the whole service when the owner comes back.
        "use POLICY : Always_Run_Jobs",
        "START = True",
        "SUSPEND = False",
        "PREEMPT = False",
        "KILL = False",
        "RANK = 0",
        "MAXJOBRETIREMENTTIME = 0",
        # Its own filesystem: HTCondor must transfer files, never assume a shared disk.
        f"FILESYSTEM_DOMAIN = $(UID_DOMAIN)-{peer.name}",
        f'BgridPeer = "{peer.name}"',
        "STARTD_ATTRS = $(STARTD_ATTRS) BgridPeer",
    ]
    return "\n".join(lines) + "\n"


def scramble_pool_key(key: bytes) -> bytes:
    """The POOL file as `condor_store_cred` writes it (HTCondor's simple_scramble)."""
    pad = b"\xde\xad\xbe\xef"
    return bytes(b ^ pad[i % 4] for i, b in enumerate(key))


# -- everything at once --------------------------------------------------------------------


def job_files(plan: JobPlan, log_dir: Path, local_dir: Path, collector_port: int) -> dict[str, str]:
    """Every file of the job: name (relative to the state directory) -> text."""
    files = {DAG_FILE: dag_text(plan, log_dir)}
    for run in plan.runs:
        files[submit_file_name(run.task)] = str(submit_description(run, plan, log_dir))
    files[COORDINATOR_CONFIG] = coordinator_config(
        plan.job, plan.coordinator, collector_port, local_dir
    )
    for peer in plan.peers:
        files[startd_config_name(peer.name)] = startd_config(
            plan.job, plan.coordinator, collector_port, peer
        )
    return files
