"""The `bgrid` command: argument parsing only; every command is a library call."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bonjourgrid import __version__
from bonjourgrid.errors import BonjourGridError, ConfigError, Interrupted

if TYPE_CHECKING:
    from bonjourgrid.credentials import WorkerIdentity
    from bonjourgrid.discovery.txt import JobRecord
    from bonjourgrid.keys import GridKey
    from bonjourgrid.worker.local import LocalGrid


def _worker(args: argparse.Namespace) -> int:
    import psutil

    from bonjourgrid.units import MIB
    from bonjourgrid.worker.config import worker_settings
    from bonjourgrid.worker.daemon import WorkerConfig, default_cache_dir, serve

    settings = worker_settings(vars(args), Path(args.config) if args.config else None)
    identity = None if args.insecure else _worker_identity(settings.name, args.credential)
    name = settings.name or (identity.name if identity else socket.gethostname().split(".")[0])
    config = WorkerConfig(
        name=name,
        cpus=settings.cpus or psutil.cpu_count() or 1,
        ram_mib=settings.ram_mib or psutil.virtual_memory().available // MIB,
        cost=settings.cost,
        cache_dir=settings.cache_dir or default_cache_dir(name),
        cache_size=settings.cache_size,
        grid=identity.grid if identity else None,
        identity=identity,
        interface=args.interface or os.environ.get("BGRID_INTERFACES"),
        always_idle=settings.always_idle,
        idle=settings.idle,
        middleware=settings.middleware,
        vacate_after_s=settings.vacate_after_s,
    )
    config.cache_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(config))
    return 0


def _worker_identity(name: str | None, credential: str | None) -> WorkerIdentity:
    """The credential this worker proves: its enrolment, or one it signs itself on a desktop
    that holds the grid's secret half (such a desktop is trusted whole: it could enroll
    any name anyway)."""
    from bonjourgrid import credentials
    from bonjourgrid.keys import key_dir, load_grid_key

    path = Path(credential) if credential else key_dir() / credentials.CREDENTIAL_FILE
    if credential is None and not path.exists():
        grid = load_grid_key()  # KeyStoreError (how to get a key) when there is none
        if grid.secret is not None:
            return credentials.issue(grid, name or socket.gethostname().split(".")[0])
    identity = credentials.load_identity(path)  # KeyStoreError saying how to enroll
    if name is not None and name != identity.name:
        raise ConfigError(
            f"this desktop is enrolled as {identity.name!r} ({path}), not {name!r}: start it "
            f"without --name, or enroll it under the new name (`bgrid keys enroll {name}`)"
        )
    return identity


def _task_step(args: argparse.Namespace) -> int:
    from bonjourgrid.worker.task_step import task_step

    return asyncio.run(task_step(Path(args.socket), args.job, args.task, args.attempt))


def _cache(args: argparse.Namespace) -> int:
    from bonjourgrid.cache import local
    from bonjourgrid.units import format_size
    from bonjourgrid.worker.config import worker_settings
    from bonjourgrid.worker.daemon import default_cache_dir

    flags = {"name": args.name, "cache_dir": args.cache_dir}
    settings = worker_settings(flags, Path(args.config) if args.config else None)
    name = settings.name or socket.gethostname().split(".")[0]
    root = settings.cache_dir or default_cache_dir(name)
    if args.verify:
        bad = local.verify_cache(root)
        print(f"verified {root}: {len(bad)} corrupt files dropped")
    if args.clear:
        print(f"cleared {root}: {format_size(local.clear_cache(root))} freed")
    if args.verify or args.clear:
        return 0
    report = local.cache_report(root, settings.cache_size)
    print(json.dumps(report, indent=2) if args.json else local.format_cache_report(report))
    return 0


def _submit(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        local_grid = None
        if args.local is not None and args.local >= 1 and not args.resume:
            # The workers of `--local` start first: their start-up overlaps the coordinator's
            # (its imports alone take a few hundred ms), not the other way round.
            from bonjourgrid.worker.local import LocalGrid

            local_grid = stack.enter_context(LocalGrid(args.local))
        return _submit_with(args, local_grid)


def _submit_with(args: argparse.Namespace, local_grid: LocalGrid | None) -> int:
    from bonjourgrid.coordinator.submit import SubmitOptions, parse_workers, submit

    return submit(
        SubmitOptions(
            workflow=Path(args.workflow),
            workers=parse_workers(args.workers) if args.workers else None,
            require=args.require,
            max_cost=args.max_cost,
            local=args.local,
            insecure=args.insecure,
            interface=args.interface,
            report=Path(args.report) if args.report else None,
            json=args.json,
            quiet=bool(args.quiet_before + args.quiet_after),  # -q anywhere: no progress
            resume=args.resume,
            peer_timeout=args.peer_timeout,
            lease=args.lease,
            prefetch=args.prefetch,
            prefetch_depth=args.prefetch_depth,
            fetch_all=args.fetch_all,
            quorum=args.quorum,
            backend=args.backend,
            backend_options={"pool": args.pool} if args.pool else {},
            local_grid=local_grid,
        )
    )


def _report(args: argparse.Namespace) -> int:
    from bonjourgrid.coordinator.report import write_report

    source = Path(args.report)
    try:
        report = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read the report {source}: {err}") from err
    if not isinstance(report, dict) or not isinstance(report.get("tasks"), dict):
        raise ConfigError(f"{source} is not a bgrid report (`bgrid submit --report FILE.json`)")
    out = Path(args.output) if args.output else source.with_suffix(".html")
    write_report(out, report)
    print(f"wrote {out}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from bonjourgrid.coordinator.submit import load_submitted
    from bonjourgrid.dag.writer import workflow_to_yaml

    source = Path(args.workflow)
    workflow = load_submitted(source)  # DagError (exit 2) naming what is wrong, as submit
    text = workflow_to_yaml(
        workflow,
        header=f"bgrid convert {source.name}: the workflow as bgrid understood it\n"
        "(defaults merged into each task; a key at its default left out)",
    )
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    try:
        with open(out, "w" if args.force else "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise ConfigError(f"{out} exists; pass --force to replace it") from None
    except OSError as err:
        raise ConfigError(f"cannot write {out}: {err.strerror or err}") from None
    print(f"wrote {out}: {len(workflow.tasks)} task(s)")
    if workflow.source_inputs() and out.resolve().parent != workflow.root:
        # A workflow's inputs are read from its own directory: OUT would not find them.
        print(
            f"note: {out} reads its inputs from {out.resolve().parent}, not {workflow.root}; "
            "move it there, or copy its inputs along",
            file=sys.stderr,
        )
    return 0


def _service(args: argparse.Namespace) -> int:
    from bonjourgrid.worker.service import UNIT_NAME, systemd_unit, user_unit_path

    worker_args = list(args.worker_args)
    build_parser().parse_args(["worker", *worker_args])  # a bad flag stops here (exit 2)
    unit = systemd_unit(worker_args)
    if args.service_command == "print":
        print(unit, end="")
        return 0
    path = user_unit_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unit)
    service = UNIT_NAME.removesuffix(".service")
    print(f"wrote {path}; start it now and at every login with:")
    print(f"  systemctl --user daemon-reload && systemctl --user enable --now {service}")
    print(f"its log: journalctl --user -u {service} -f")
    return 0


def _examples(args: argparse.Namespace) -> int:
    from bonjourgrid.dag.examples import copy_examples

    dest = Path(args.directory)
    copied = copy_examples(dest, force=args.force)
    workflows = [str(dest / path) for path in copied if path.suffix == ".yaml"]
    print(f"copied {len(copied)} files into {dest}: the workflows {', '.join(workflows)}")
    print(f"try: bgrid submit {dest / 'hello.yaml'} --local 2")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    from bonjourgrid.coordinator.cancel import cancel_job
    from bonjourgrid.discovery.advertise import resolve_interfaces

    print(asyncio.run(cancel_job(args.job, resolve_interfaces(args.interface), wait=args.wait)))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from bonjourgrid.coordinator.logs import find_log

    path = find_log(
        Path(args.dir), args.job, args.task, args.attempt, stderr=args.err, script=args.script
    )
    if path is None:
        return 0  # the attempt came back having written nothing there
    with open(path, "rb") as f:
        sys.stdout.flush()
        while chunk := f.read(1 << 16):
            sys.stdout.buffer.write(chunk)
    sys.stdout.flush()
    return 0


def _peers(args: argparse.Namespace) -> int:
    from bonjourgrid.discovery.advertise import resolve_interfaces
    from bonjourgrid.discovery.browse import snapshot_peers
    from bonjourgrid.discovery.table import format_peer_table, peer_json

    peers = asyncio.run(snapshot_peers(resolve_interfaces(args.interface), wait=args.wait))
    if args.json:
        print(json.dumps([peer_json(p) for p in peers], indent=2))
    else:
        print(format_peer_table(peers))
    return 0


def _status(args: argparse.Namespace) -> int:
    from bonjourgrid.coordinator.watch import watch_jobs
    from bonjourgrid.discovery.advertise import resolve_interfaces
    from bonjourgrid.discovery.browse import snapshot_jobs
    from bonjourgrid.discovery.table import job_json
    from bonjourgrid.errors import KeyStoreError
    from bonjourgrid.keys import load_grid_key

    try:
        grid = load_grid_key(need_secret=True)
    except KeyStoreError:
        grid = None  # nothing to prove a coordinator against: records are shown as hints
    interfaces = resolve_interfaces(args.interface)
    if args.watch:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends
            asyncio.run(watch_jobs(interfaces, lambda jobs: _job_table(jobs, grid)))
        return 0
    jobs = asyncio.run(snapshot_jobs(interfaces, wait=args.wait))
    if args.json:
        verified = asyncio.run(_verified(jobs, grid))
        print(
            json.dumps(
                [{**job_json(j), "verified": v} for j, v in zip(jobs, verified, strict=True)],
                indent=2,
            )
        )
        return 0
    print(asyncio.run(_job_table(jobs, grid)))
    return 0


async def _verified(jobs: list[JobRecord], grid: GridKey | None) -> list[bool | None]:
    """Whether each job's coordinator proves the grid's key (None: no key to check with)."""
    from bonjourgrid.coordinator.cancel import verify_jobs

    if grid is None:
        return [None] * len(jobs)
    return list(await verify_jobs(jobs, grid))


async def _job_table(jobs: list[JobRecord], grid: GridKey | None) -> str:
    """What `bgrid status` prints: the jobs whose coordinator proves the grid's key."""
    from bonjourgrid.discovery.table import format_job_table

    if grid is None:
        return format_job_table(jobs)
    verified = await _verified(jobs, grid)
    lines = [format_job_table([j for j, v in zip(jobs, verified, strict=True) if v])]
    ignored = [j for j, v in zip(jobs, verified, strict=True) if not v]
    if ignored:
        wheres = ", ".join(f"{j.job} at {j.endpoint().removeprefix('tcp://')}" for j in ignored)
        lines.append(
            f"({len(ignored)} job record(s) not shown: no coordinator of grid {grid.fingerprint} "
            f"behind them, ended, spoofed or of another grid: {wheres})"
        )
    return "\n".join(lines)


def _keys(args: argparse.Namespace) -> int:
    from bonjourgrid import credentials, keys

    command = args.keys_command
    if command == "init":
        key = keys.init_grid_key(force=args.force)
        print(f"created grid {key.fingerprint} in {keys.key_dir()}")
        print("next: `bgrid keys show` says how other desktops join it")
        return 0
    if command == "join":
        text = args.token
        if not text.startswith(credentials.TOKEN_PREFIX) and Path(text).is_file():
            text = Path(text).read_text()
        identity = credentials.parse_token(text)
        path = credentials.join(identity, force=args.force)
        print(
            f"this desktop is now worker {identity.name!r} of grid {identity.grid.fingerprint} "
            f"({path}); start it with `bgrid worker`"
        )
        return 0
    if command == "revoke":
        fresh = credentials.revoke(args.name, key=args.key)
        where = keys.key_dir() / credentials.REVOKED_FILE
        print(f"revoked {len(fresh)} credential(s) of {args.name!r}: listed in {where}")
        print("copy that file to every desktop that submits jobs, with grid.key_secret")
        return 0
    if command == "list":
        revoked = credentials.load_revoked()
        for name, public in credentials.enrolled():
            print(f"{name:24} {public}  {'revoked' if public in revoked else 'enrolled'}")
        return 0
    key = keys.load_grid_key(need_secret=command == "enroll")
    if command == "enroll":
        identity, token = credentials.enroll(key, args.name)
        if args.out:
            credentials.write_identity(identity, Path(args.out))
            print(
                f"wrote the credential of {args.name!r} to {args.out} (`bgrid worker "
                f"--credential {args.out}`); it holds a secret key: keep it private"
            )
            return 0
        print(f"enrolled worker {args.name!r} in grid {key.fingerprint}. On that desktop run:")
        print(f"\n  bgrid keys join {token}\n")
        print(
            "(the line holds the worker's secret key: paste it, do not publish it; "
            f"`bgrid keys revoke {args.name}` takes it back)"
        )
        return 0
    directory = keys.key_dir()
    print(f"grid fingerprint: {key.fingerprint}")
    print(f"public key:       {key.public.decode()}")
    print(f"stored in:        {directory}")
    print("\nTo let another desktop WORK for this grid, enroll it (here), then paste the line")
    print("it prints on that desktop:")
    print("  bgrid keys enroll NAME")
    print("To let it also SUBMIT jobs, copy the secret half (keep it private) and the revocations:")
    print(f"  scp {directory}/grid.key_secret {directory}/grid.key OTHER:~/.config/bonjourgrid/")
    print(f"  scp {directory}/{credentials.REVOKED_FILE} OTHER:~/.config/bonjourgrid/  # if any")
    if key.secret is None:
        print("\n(this desktop holds only the public half: it can work, not submit or enroll)")
    return 0


class _StrictParser(argparse.ArgumentParser):
    """No abbreviated flags: `--worker 2` is a typo, not `--workers 2`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{"allow_abbrev": False, **kwargs})


def build_parser() -> argparse.ArgumentParser:
    from bonjourgrid.coordinator.prefetch import POLICIES

    # -v and -q are read before and after the subcommand: each place counts in its own
    # dest (a subparser would overwrite the main parser's), and main() adds them up.
    def verbosity(where: str) -> _StrictParser:
        flags = _StrictParser(add_help=False)
        flags.add_argument(
            "-v", "--verbose", action="count", default=0, dest=f"verbose_{where}",
            help="more log output (-vv: debug)",
        )  # fmt: skip
        flags.add_argument(
            "-q", "--quiet", action="count", default=0, dest=f"quiet_{where}",
            help="log errors only (submit: no progress display, only the final summary)",
        )  # fmt: skip
        return flags

    parser = _StrictParser(
        prog="bgrid",
        description="BonjourGrid: a desktop grid with nothing to administer.",
        parents=[verbosity("before")],
    )
    parser.add_argument("--version", action="version", version=f"bgrid {__version__}")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=_StrictParser,
    )
    after = verbosity("after")

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[after], **kwargs)

    def interface_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--interface",
            metavar="IP",
            help="IPv4 address of the interface to use for mDNS and zmq "
            "(default: $BGRID_INTERFACES, else every interface)",
        )

    w = command("worker", help="offer this desktop to the grid (a daemon)")
    w.add_argument("--name", help="peer name on the LAN (default: host name)")
    w.add_argument("--cpus", type=int, help="task slots (default: CPU count)")
    w.add_argument("--ram", help="memory offered to tasks, e.g. 4GiB (default: available)")
    w.add_argument("--cost", type=float, help="price per CPU-hour (default 0)")
    w.add_argument("--cache-dir", help="where inputs and outputs are cached")
    w.add_argument(
        "--cache-size",
        help="bound of the local cache, e.g. 10GiB; least recently used files go first "
        "(default: the disk)",
    )
    w.add_argument(
        "--middleware",
        metavar="LIST",
        help="middleware this peer advertises for backends, comma-separated, e.g. slurm,condor "
        "(default: detected from slurmd+munged, condor_master, boinc_client on PATH; "
        "native always)",
    )
    w.add_argument(
        "--always-idle",
        action=argparse.BooleanOptionalAction,
        help="a dedicated machine: never wait for its owner to be away",
    )
    w.add_argument(
        "--idle-minutes",
        type=float,
        metavar="M",
        help="idle after M minutes without keyboard/mouse activity (default 15)",
    )
    w.add_argument(
        "--max-load",
        type=float,
        metavar="F",
        help="... and other work under this fraction of the CPUs (default 0.3; 1: ignore load)",
    )
    w.add_argument(
        "--vacate-after",
        type=float,
        metavar="S",
        help="when the owner comes back, tasks are suspended (SIGSTOP); they are killed and "
        "run elsewhere only if the owner stays S seconds (default 600; 0: at once)",
    )
    w.add_argument(
        "--activity-file",
        metavar="PATH",
        help="the file's mtime is the owner's last activity (`touch PATH`: the owner is back); "
        "replaces the built-in terminal and input-device probes",
    )
    w.add_argument(
        "--activity-command",
        metavar="CMD",
        help="a shell command printing the seconds since the last keyboard/mouse input "
        "(run every second); replaces the built-in probes",
    )
    w.add_argument(
        "--config",
        metavar="FILE",
        help="worker settings (default: $XDG_CONFIG_HOME/bonjourgrid/worker.toml); flags win",
    )
    w.add_argument(
        "--insecure",
        action="store_true",
        help="serve without a grid key: anyone on the LAN can run tasks here",
    )
    w.add_argument(
        "--credential",
        metavar="FILE",
        help="this worker's credential (default: $XDG_CONFIG_HOME/bonjourgrid/worker.cred, "
        "written by `bgrid keys join`)",
    )
    interface_flag(w)
    w.set_defaults(run=_worker)

    s = command("submit", help="run a workflow on the grid")
    s.add_argument(
        "workflow",
        help="workflow file: YAML or JSON, an HTCondor DAGMan .dag, or a WfCommons WfFormat .json",
    )
    s.add_argument("--workers", metavar="MIN..MAX", help="how many peers to recruit")
    s.add_argument("--require", metavar="EXPR", help='e.g. "ram>=4GiB and cpus>=2"')
    s.add_argument("--max-cost", type=float, help="highest cost per CPU-hour to accept")
    s.add_argument(
        "--local",
        type=int,
        metavar="N",
        help="start N worker daemons on this machine and run there",
    )
    s.add_argument(
        "--backend",
        default="native",
        help="what runs the tasks on the recruited peers: native (bgrid's own workers), "
        "slurm (a transient Slurm cluster over them), condor, or a plug-in (default: native)",
    )
    s.add_argument(
        "--pool",
        metavar="HOST:PORT",
        help="condor: submit to this existing HTCondor pool's schedd, deploying nothing",
    )
    s.add_argument("--insecure", action="store_true", help="use peers that run --insecure")
    s.add_argument(
        "--report",
        metavar="FILE",
        help="write the report to FILE: JSON, or a page to look at if FILE ends in .html",
    )
    s.add_argument(
        "--json",
        action="store_true",
        help="print the JSON report and nothing else on stdout (progress: stderr, if a terminal)",
    )
    s.add_argument(
        "--resume",
        action="store_true",
        help="go on from the journal of an interrupted run: tasks whose outputs are intact "
        "are not run again",
    )
    s.add_argument(
        "--peer-timeout",
        type=float,
        metavar="S",
        help="a peer silent this long is lost and its tasks go elsewhere (default 5)",
    )
    s.add_argument(
        "--lease",
        type=float,
        metavar="S",
        help="if this coordinator dies, its peers are free again after S seconds (default 10)",
    )
    s.add_argument(
        "--prefetch",
        choices=POLICIES,
        metavar="POLICY",
        help=f"when inputs move to the peers: {', '.join(POLICIES)} "
        "(default: [prefetch] policy in bgrid.toml, else lookahead)",
    )
    s.add_argument(
        "--prefetch-depth",
        type=int,
        metavar="N",
        help="tasks planned ahead per peer whose inputs move early (default 2)",
    )
    s.add_argument(
        "--fetch-all",
        action=argparse.BooleanOptionalAction,
        help="bring every output back to the submit directory, intermediate files too "
        "(default: final outputs and those of `keep: true` tasks)",
    )
    s.add_argument(
        "--quorum",
        type=int,
        metavar="N",
        help="run each task on N distinct peers and accept its outputs when a majority agree "
        "(a task's own `quorum:` wins; `quorum: 1` opts a non-deterministic task out)",
    )
    interface_flag(s)
    s.set_defaults(run=_submit)

    c = command("cancel", help="stop a running job (from any desktop of the grid)")
    c.add_argument("job", help="the job's name as `bgrid status` shows it, or its workflow's")
    c.add_argument("--wait", type=float, default=1.0, help="seconds to look for it (default 1)")
    interface_flag(c)
    c.set_defaults(run=_cancel)

    lg = command("logs", help="print what a task wrote on stdout (or stderr)")
    lg.add_argument(
        "job", help="the job id (as the report says), or its workflow's name: its latest job"
    )
    lg.add_argument("task", help="the task's name")
    lg.add_argument("--attempt", type=int, metavar="N", help="this attempt (default: the latest)")
    lg.add_argument("--err", action="store_true", help="print its stderr instead of its stdout")
    lg.add_argument(
        "--script", choices=("pre", "post"), help="what its pre or post script wrote instead"
    )
    lg.add_argument(
        "--dir", default=".", help="the directory the job was submitted from (default: here)"
    )
    lg.set_defaults(run=_logs)

    cv = command("convert", help="write a workflow file as native YAML: what bgrid understood")
    cv.add_argument("workflow", help="a workflow file `bgrid submit` reads")
    cv.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        default="-",
        help="the YAML file to write; - (the default): stdout",
    )
    cv.add_argument("--force", action="store_true", help="replace OUT if it exists")
    cv.set_defaults(run=_convert)

    r = command("report", help="draw a JSON report as a page (Gantt chart, DAG, bytes)")
    r.add_argument("report", help="a report written by `bgrid submit --report FILE.json`")
    r.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="where to write it; .html: one self-contained page (default: REPORT with .html)",
    )
    r.set_defaults(run=_report)

    ex = command("examples", help="copy the example workflows into a directory")
    ex.add_argument("directory", help="where to copy them (made if missing)")
    ex.add_argument("--force", action="store_true", help="copy into a directory that is not empty")
    ex.set_defaults(run=_examples)

    sv = command("service", help="run `bgrid worker` as a systemd user service")
    svsub = sv.add_subparsers(dest="service_command", required=True)
    for name, what in (
        ("print", "print the systemd user unit"),
        ("install", "write it to $XDG_CONFIG_HOME/systemd/user/ (then `systemctl --user ...`)"),
    ):
        svp = svsub.add_parser(name, help=what)
        svp.add_argument(
            "worker_args",
            nargs="*",
            metavar="-- WORKER_FLAG",
            help="flags for `bgrid worker`, after `--` (e.g. -- --always-idle --cpus 2)",
        )
    sv.set_defaults(run=_service)

    for name, func, what in (
        ("peers", _peers, "list the peers on the LAN"),
        ("status", _status, "list the jobs running on the LAN"),
    ):
        p = command(name, help=what)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--wait", type=float, default=1.0, help="seconds to listen (default 1)")
        interface_flag(p)
        p.set_defaults(run=func)
        if name == "status":
            p.add_argument(
                "--watch",
                action="store_true",
                help="keep the table current, in place, until Ctrl-C",
            )

    ts = command(
        "task-step",
        help="run a task the worker on this peer staged, inside a middleware's job "
        "(the slurm backend's batch scripts call it through {dir}/task-step)",
    )
    ts.add_argument("--socket", required=True, help="the worker's task-step socket")
    ts.add_argument("--job", required=True, help="the bgrid job")
    ts.add_argument("--task", required=True, help="the task")
    ts.add_argument("--attempt", required=True, type=int, help="the attempt (from 1)")
    ts.set_defaults(run=_task_step)

    ch = command("cache", help="show what this desktop's worker cache holds, or clear it")
    ch.add_argument("--name", help="the worker's name (default: host name)")
    ch.add_argument("--cache-dir", help="the cache directory (default: the worker's)")
    ch.add_argument("--config", metavar="FILE", help="worker settings file (as `bgrid worker`)")
    ch.add_argument("--json", action="store_true", help="machine-readable output")
    ch.add_argument(
        "--clear", action="store_true", help="remove every cached file (the worker must be stopped)"
    )
    ch.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every cached file and drop corrupt ones (the worker must be stopped)",
    )
    ch.set_defaults(run=_cache)

    k = command("keys", help="create the grid key; enroll, join and revoke workers")
    ksub = k.add_subparsers(
        dest="keys_command",
        required=True,
        parser_class=_StrictParser,
    )
    ki = ksub.add_parser("init", help="create a new grid key")
    ki.add_argument("--force", action="store_true", help="replace an existing key")
    ksub.add_parser("show", help="print the grid's fingerprint and how desktops join it")
    ke = ksub.add_parser("enroll", help="issue a worker credential for another desktop")
    ke.add_argument("name", help="the worker's name on the LAN (its `bgrid worker --name`)")
    ke.add_argument("--out", metavar="FILE", help="write the credential file instead of a token")
    kj = ksub.add_parser("join", help="make this desktop the worker a token enrolled")
    kj.add_argument("token", help="the line `bgrid keys enroll` printed (or a file holding it)")
    kj.add_argument("--force", action="store_true", help="replace this desktop's grid key")
    kr = ksub.add_parser("revoke", help="stop recruiting an enrolled worker (a stolen desktop)")
    kr.add_argument("name", help="the worker's name")
    kr.add_argument("--key", help="revoke this public key (Z85) instead of the names on record")
    ksub.add_parser("list", help="the workers enrolled from this desktop")
    k.set_defaults(run=_keys)
    return parser


def _show_warning(
    message: Warning | str, category: type[Warning], *_: object, **__: object
) -> None:
    # A workflow warning (unknown key...) is for the user, not a Python traceback line.
    print(f"bgrid: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    quiet = args.quiet_before + args.quiet_after
    verbose = args.verbose_before + args.verbose_after
    if quiet:
        level = logging.ERROR
        warnings.simplefilter("ignore")
    else:
        level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
        if args.command == "worker":
            level = min(level, logging.INFO)  # a daemon's log says what it serves
    from bonjourgrid.worker.service import configure_logging

    configure_logging(level)  # under systemd, without the time: the journal adds it
    try:
        return int(args.run(args))
    except BonjourGridError as err:
        print(f"bgrid: error: {err}", file=sys.stderr)
        return err.exit_code
    except Interrupted as err:
        print(f"bgrid: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("bgrid: interrupted by SIGINT", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
