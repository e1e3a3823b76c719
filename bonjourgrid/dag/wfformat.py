"""WfCommons WfFormat instances (schema 1.4, 1.5 and 1.6) as native workflows.

A WfFormat instance is JSON with a top-level `schemaVersion` and `workflow`. Two layouts exist:
- 1.5 and 1.6 (what wfcommons 1.6 writes): `workflow.specification` holds the tasks (id, name,
  parents, children, inputFiles, outputFiles) and the files (id, sizeInBytes);
  `workflow.execution` holds what a run recorded: each task's runtimeInSeconds, command
  {program, arguments}, coreCount, machines, and the machines' descriptions.
- 1.4 (most WfInstances on record): `workflow.tasks`, each with its own `files`
  ({name, sizeInBytes, link: input|output}), runtimeInSeconds, command, cores, machine;
  `workflow.machines` beside them. Older versions are refused: WfFormat's own
  tools/wfcommons-migrate-instance.py brings them to 1.5.

Both become one list of `_Task`s, then the native mapping, which `workflow_from_mapping` checks
like any workflow (one writer per file, every input produced or present, no cycle), so every
rule and message stays in one place. A task's WfFormat id is its task name (characters a task
name cannot hold become '_'); its files are paths in its sandbox (an absolute file id, as
traces write them, loses its leading '/'); `parents` and `children` become `after` (the file
flow adds its own edges).

What a task runs (`WfFormatOptions.programs`):
- "stand-in" (the default): an instance mostly describes a past run whose programs are not on
  the peers, so each task runs `bonjourgrid/standin.py` instead, as WfCommons' WfBench does:
  it checks its inputs, burns the recorded runtime times `runtime_scale` of CPU and writes
  each output at its recorded size times `size_scale`. The script is staged into each sandbox
  as a `file://` URL input. Inputs that no task writes and that the submit directory does not
  hold (the instance only names them) are written by one extra task, `bgrid-wfformat-inputs`
  (or `-2`, `-3`... when one command cannot name them all), the same way, so the whole file
  flow runs. A command names the inputs its stand-in checks; a task reading thousands of
  files (a big Montage's mAdd) gets their count instead (a worker takes commands of at most
  64 KiB); outputs are always named with their sizes, so a task writing more than fit in
  one command is refused by the loader, naming it.
- "recorded": `command.program` and its arguments (command-line fragments, joined with spaces
  as WfCommons' translators do), run with the worker's PATH; every source input must then be
  in the submit directory.

What the run recorded is kept where a user sees it: each task's env carries WFFORMAT_ID,
WFFORMAT_NAME, WFFORMAT_RUNTIME_S, WFFORMAT_CORES and WFFORMAT_MACHINES (the task can read
them, and `bgrid convert` shows them per task, being part of the task); the instance's own
facts (its name, version, makespan, machine descriptions) go in the mapping's top-level
`x-wfformat` key, for whoever reads `wfformat_to_mapping`; the loader skips it.

Every problem names the file and the JSON path where it is (`workflow.specification.tasks[3]
.parents[0]`), all of them in one DagError.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonjourgrid import standin
from bonjourgrid.dag.model import normalize_path
from bonjourgrid.errors import ConfigError, DagError
from bonjourgrid.wire import MAX_STRING

__all__ = [
    "INPUTS_TASK",
    "PROGRAMS",
    "SCHEMA_VERSIONS",
    "STANDIN_PATH",
    "WfFormatOptions",
    "is_wfformat",
    "wfformat_to_mapping",
]

SCHEMA_VERSIONS = ("1.4", "1.5", "1.6")
PROGRAMS = ("stand-in", "recorded")  # values of WfFormatOptions.programs
STANDIN_PATH = ".bgrid-standin.py"  # where a task finds the stand-in in its sandbox
STANDIN_URL = Path(standin.__file__).resolve().as_uri()
INPUTS_TASK = "bgrid-wfformat-inputs"  # writes the source inputs nobody has, in stand-in mode
_TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
_NOT_IN_TASK_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_NOT_IN_JOB_NAME = re.compile(r"[^\w .-]+")
_MAX_JOB_NAME_BYTES = 63  # as the loader's: the job's DNS-SD instance name is one DNS label
_MAX_PROBLEMS_SHOWN = 20
_COMMAND_BUDGET = MAX_STRING - 1024  # bytes of a stand-in command: a worker takes MAX_STRING


@dataclass(frozen=True)
class WfFormatOptions:
    """How a WfFormat instance runs: `[wfformat]` in bgrid.toml (see README)."""

    programs: str = "stand-in"  # or "recorded": run command.program itself
    # A recorded second becomes this many seconds of CPU: Montage's 58 tasks record 25 hours
    # of work, which a first run should show in seconds; 1.0 replays the run's real length.
    runtime_scale: float = 0.001
    size_scale: float = 1.0  # outputs (and made-up source inputs) at their recorded size
    python: str = "python3"  # the interpreter that runs the stand-in, found on the worker's PATH

    def __post_init__(self) -> None:
        if self.programs not in PROGRAMS:
            raise ConfigError(
                f"[wfformat] programs = {self.programs!r}: choose {' or '.join(PROGRAMS)}"
            )
        for key in ("runtime_scale", "size_scale"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"[wfformat] {key} = {value!r}: give a number")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"[wfformat] {key} = {value!r}: give a number, 0 or more")
        if not self.python.strip():
            raise ConfigError("[wfformat] python is empty: name a Python 3 interpreter")


def is_wfformat(data: object) -> bool:
    """Whether decoded JSON is a WfFormat instance rather than a native workflow."""
    return isinstance(data, Mapping) and "workflow" in data and "schemaVersion" in data


@dataclass
class _Task:
    """One WfFormat task, whichever layout it came from."""

    id: str
    where: str  # its JSON path, for messages
    name: str = ""  # WfFormat's (category) name: mProject, blastall...
    parents: list[tuple[str, str]] = field(default_factory=list)  # (id, JSON path)
    children: list[tuple[str, str]] = field(default_factory=list)
    inputs: list[tuple[str, str]] = field(default_factory=list)  # (file id, JSON path)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    runtime_s: float | None = None
    program: str | None = None
    arguments: list[str] = field(default_factory=list)
    cores: float | None = None
    machines: list[str] = field(default_factory=list)


class _Problems:
    """Every problem of one instance, each at its JSON path, raised as one DagError."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []

    def add(self, where: str, problem: str) -> None:
        self.items.append(f"{where}: {problem}")

    def raise_if_any(self) -> None:
        if len(self.items) == 1:
            raise DagError(f"{self.source}: {self.items[0]}")
        if self.items:
            shown = "\n  - ".join(self.items[:_MAX_PROBLEMS_SHOWN])
            more = len(self.items) - _MAX_PROBLEMS_SHOWN
            tail = f"\n  ... and {more} more" if more > 0 else ""
            raise DagError(
                f"{self.source} (WfFormat) has {len(self.items)} problems:\n  - {shown}{tail}"
            )

    # typed reads: each returns the value, or a neutral one after noting the problem

    def mapping(self, value: object, where: str) -> Mapping[str, Any]:
        if isinstance(value, Mapping):
            return value
        self.add(where, f"must be an object, not {_kind(value)}")
        return {}

    def items_of(self, value: object, where: str, *, required: bool = False) -> list[Any]:
        if isinstance(value, list) and (value or not required):
            return value
        if value is None and not required:
            return []
        self.add(
            where, "must be a non-empty list" if required else f"must be a list, not {_kind(value)}"
        )
        return []

    def text(self, value: object, where: str, *, required: bool = True) -> str | None:
        if isinstance(value, str) and value:
            return value
        if value is None and not required:
            return None
        self.add(where, f"must be a non-empty string, not {_kind(value)}")
        return None

    def texts(self, value: object, where: str) -> list[tuple[str, str]]:
        found = []
        for index, item in enumerate(self.items_of(value, where)):
            text = self.text(item, f"{where}[{index}]")
            if text is not None:
                found.append((text, f"{where}[{index}]"))
        return found

    def number(self, value: object, where: str) -> float | None:
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            self.add(where, f"must be a number, not {_kind(value)}")
            return None
        if value < 0:
            self.add(where, f"must be 0 or more, not {value}")
            return None
        return float(value)


def _kind(value: object) -> str:
    return "missing" if value is None else f"{type(value).__name__} {value!r}"[:80]


# ---------------------------------------------------------------------------------------------
# The two layouts


def _read_specification(
    workflow: Mapping[str, Any], problems: _Problems
) -> tuple[list[_Task], dict[str, int]]:
    """1.5/1.6: the tasks and file sizes of `workflow.specification`, then `execution`'s facts."""
    spec = problems.mapping(workflow.get("specification"), "workflow.specification")
    tasks: list[_Task] = []
    for index, raw in enumerate(
        problems.items_of(spec.get("tasks"), "workflow.specification.tasks", required=True)
    ):
        where = f"workflow.specification.tasks[{index}]"
        raw = problems.mapping(raw, where)
        task_id = problems.text(raw.get("id"), f"{where}.id")
        if task_id is None:
            continue
        task = _Task(task_id, where, name=str(raw.get("name") or task_id))
        task.parents = problems.texts(raw.get("parents"), f"{where}.parents")
        task.children = problems.texts(raw.get("children"), f"{where}.children")
        task.inputs = problems.texts(raw.get("inputFiles"), f"{where}.inputFiles")
        task.outputs = problems.texts(raw.get("outputFiles"), f"{where}.outputFiles")
        tasks.append(task)
    sizes: dict[str, int] = {}
    for index, raw in enumerate(
        problems.items_of(spec.get("files"), "workflow.specification.files")
    ):
        where = f"workflow.specification.files[{index}]"
        raw = problems.mapping(raw, where)
        file_id = problems.text(raw.get("id"), f"{where}.id")
        size = _size(raw.get("sizeInBytes"), f"{where}.sizeInBytes", problems)
        if file_id is not None and size is not None:
            sizes.setdefault(file_id, size)  # as wfcommons: the first size given wins

    execution = workflow.get("execution")
    if execution is None:
        return tasks, sizes
    execution = problems.mapping(execution, "workflow.execution")
    by_id = {task.id: task for task in tasks}
    for index, raw in enumerate(
        problems.items_of(execution.get("tasks"), "workflow.execution.tasks")
    ):
        where = f"workflow.execution.tasks[{index}]"
        raw = problems.mapping(raw, where)
        task_id = problems.text(raw.get("id"), f"{where}.id")
        if task_id is None:
            continue
        found = by_id.get(task_id)
        if found is None:
            problems.add(
                f"{where}.id", f"{task_id!r} is not a task of workflow.specification.tasks"
            )
            continue
        found.runtime_s = problems.number(raw.get("runtimeInSeconds"), f"{where}.runtimeInSeconds")
        found.cores = problems.number(raw.get("coreCount"), f"{where}.coreCount")
        found.machines = [
            name for name, _ in problems.texts(raw.get("machines"), f"{where}.machines")
        ]
        _read_command(raw.get("command"), f"{where}.command", found, problems)
    return tasks, sizes


def _read_flat(
    workflow: Mapping[str, Any], problems: _Problems
) -> tuple[list[_Task], dict[str, int]]:
    """1.4: `workflow.tasks`, each with its own files, runtime, command and machine."""
    tasks: list[_Task] = []
    sizes: dict[str, int] = {}
    by_name: dict[str, list[str]] = {}  # 1.4 names a task's parents by its name
    for index, raw in enumerate(
        problems.items_of(workflow.get("tasks"), "workflow.tasks", required=True)
    ):
        where = f"workflow.tasks[{index}]"
        raw = problems.mapping(raw, where)
        name = problems.text(raw.get("name"), f"{where}.name")
        task_id = problems.text(raw.get("id"), f"{where}.id", required=False) or name
        if task_id is None:
            continue
        task = _Task(task_id, where, name=str(raw.get("category") or name))
        by_name.setdefault(name or task_id, []).append(task_id)
        task.parents = problems.texts(raw.get("parents"), f"{where}.parents")
        task.children = problems.texts(raw.get("children"), f"{where}.children")
        for number, item in enumerate(problems.items_of(raw.get("files"), f"{where}.files")):
            at = f"{where}.files[{number}]"
            item = problems.mapping(item, at)
            file_id = problems.text(item.get("name"), f"{at}.name")
            size = _size(item.get("sizeInBytes", item.get("size")), f"{at}.sizeInBytes", problems)
            link = item.get("link")
            if link not in ("input", "output"):
                problems.add(f"{at}.link", f'must be "input" or "output", not {_kind(link)}')
            elif file_id is not None:
                (task.inputs if link == "input" else task.outputs).append((file_id, at))
                if size is not None:
                    sizes.setdefault(file_id, size)
        task.runtime_s = problems.number(
            raw.get("runtimeInSeconds", raw.get("runtime")), f"{where}.runtimeInSeconds"
        )
        task.cores = problems.number(raw.get("cores"), f"{where}.cores")
        machine = problems.text(raw.get("machine"), f"{where}.machine", required=False)
        task.machines = [machine] if machine else []
        _read_command(raw.get("command"), f"{where}.command", task, problems)
        tasks.append(task)
    _refer_by_id(tasks, by_name)
    return tasks, sizes


def _refer_by_id(tasks: list[_Task], by_name: Mapping[str, list[str]]) -> None:
    """Make each reference to a task by its (unique) name a reference by its id."""
    ids = {task.id for task in tasks}
    for task in tasks:
        for refs in (task.parents, task.children):
            for index, (ref, where) in enumerate(refs):
                if ref not in ids and len(by_name.get(ref, ())) == 1:
                    refs[index] = (by_name[ref][0], where)


def _read_command(value: object, where: str, task: _Task, problems: _Problems) -> None:
    if value is None:
        return
    command = problems.mapping(value, where)
    task.program = problems.text(command.get("program"), f"{where}.program", required=False)
    task.arguments = [
        text for text, _ in problems.texts(command.get("arguments"), f"{where}.arguments")
    ]


def _size(value: object, where: str, problems: _Problems) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        problems.add(where, f"must be a whole number of bytes, not {_kind(value)}")
        return None
    if value < 0 or value != int(value):
        problems.add(where, f"must be a whole number of bytes, 0 or more, not {value}")
        return None
    return int(value)


# ---------------------------------------------------------------------------------------------
# The native mapping


def wfformat_to_mapping(
    data: Mapping[str, Any],
    root: str | Path,
    source: str = "<wfformat>",
    options: WfFormatOptions | None = None,
) -> dict[str, Any]:
    """The native workflow mapping of a WfFormat instance (see the module docstring)."""
    options = options or WfFormatOptions()
    problems = _Problems(source)
    version = data.get("schemaVersion")
    if version not in SCHEMA_VERSIONS:
        raise DagError(
            f"{source}: schemaVersion: WfFormat {version!r} is not read here; this reads "
            f"{', '.join(SCHEMA_VERSIONS)} (migrate an older instance with WfFormat's "
            "tools/wfcommons-migrate-instance.py)"
        )
    workflow = problems.mapping(data.get("workflow"), "workflow")
    if version == "1.4":
        tasks, sizes = _read_flat(workflow, problems)
    else:
        tasks, sizes = _read_specification(workflow, problems)
    problems.raise_if_any()

    names = _task_names(tasks, problems)
    problems.raise_if_any()  # what follows names tasks by their names
    paths = _file_paths(tasks, problems)
    after = _control_dependencies(tasks, names, problems)
    if options.programs == "stand-in":
        for task in tasks:
            for file_id, where in task.outputs:
                if file_id not in sizes:
                    problems.add(where, f"file {file_id!r} has no sizeInBytes in the instance")
    problems.raise_if_any()

    native: dict[str, Any] = {}
    for task in tasks:
        native[names[task.id]] = _native_task(task, paths, sizes, after[task.id], options, problems)
    problems.raise_if_any()
    if options.programs == "stand-in":
        made_up = _absent_sources(tasks, paths, Path(root))
        for name, made in _inputs_tasks(made_up, paths, sizes, options).items() if made_up else ():
            if name in native:
                raise DagError(f"{source}: a task is named {name!r}, a name bgrid needs")
            native[name] = made
    mapping: dict[str, Any] = {"tasks": native, "x-wfformat": _instance_facts(data, options)}
    job_name = _job_name(data.get("name"))
    if job_name:
        mapping = {"name": job_name, **mapping}
    return mapping


def _task_names(tasks: list[_Task], problems: _Problems) -> dict[str, str]:
    """Task id -> task name: the id, with what a task name cannot hold made '_'."""
    names: dict[str, str] = {}
    owner: dict[str, _Task] = {}
    for task in tasks:
        if task.id in names:
            problems.add(
                f"{task.where}.id", f"{task.id!r} is the id of {owner[names[task.id]].where} too"
            )
            continue
        name = task.id if _TASK_NAME.match(task.id) else _NOT_IN_TASK_NAME.sub("_", task.id)
        if name in (".", "..") or len(name) > 200:
            problems.add(
                f"{task.where}.id", f"{task.id!r} cannot name a task; give it a shorter name"
            )
            continue
        if name in owner:
            problems.add(
                f"{task.where}.id",
                f"{task.id!r} becomes task name {name!r}, as {owner[name].where} does; rename one",
            )
            continue
        names[task.id] = name
        owner[name] = task
    return names


def _file_paths(tasks: list[_Task], problems: _Problems) -> dict[str, str]:
    """File id -> its path in the sandbox: the id, normalized, without a leading '/'.

    Traces name files by where the past run kept them (`/nf-core/data/x.fastq.gz`, as
    WfFormat's 1.4 -> 1.5 migration wrote them): under the sandbox they keep that layout.
    """
    paths: dict[str, str] = {}
    first_id: dict[str, str] = {}  # path -> the file id that has it
    for task in tasks:
        for file_id, where in (*task.inputs, *task.outputs):
            if file_id in paths:
                continue
            try:
                path = normalize_path(file_id.lstrip("/") if file_id.startswith("/") else file_id)
            except ValueError as err:
                problems.add(where, f"file {err}")
                continue
            if path == STANDIN_PATH:
                problems.add(where, f"file {file_id!r} is where bgrid puts the stand-in script")
            elif first_id.setdefault(path, file_id) != file_id:
                problems.add(
                    where, f"files {first_id[path]!r} and {file_id!r} would both be {path!r}"
                )
            paths[file_id] = path
    return paths


def _control_dependencies(
    tasks: list[_Task], names: Mapping[str, str], problems: _Problems
) -> dict[str, list[str]]:
    """Task id -> the task names it runs after, from its parents and its parents' children."""
    after: dict[str, dict[str, None]] = {task.id: {} for task in tasks}
    for task in tasks:
        for parent, where in task.parents:
            if parent not in names:
                problems.add(where, f"parent {parent!r} is not the id of a task")
            elif parent != task.id:
                after[task.id][names[parent]] = None
        for child, where in task.children:
            if child not in names:
                problems.add(where, f"child {child!r} is not the id of a task")
            elif child != task.id:
                after[child][names[task.id]] = None
    return {task_id: list(before) for task_id, before in after.items()}


def _native_task(
    task: _Task,
    paths: Mapping[str, str],
    sizes: Mapping[str, int],
    after: list[str],
    options: WfFormatOptions,
    problems: _Problems,
) -> dict[str, Any]:
    inputs: list[object] = [paths[file_id] for file_id, _ in task.inputs]
    outputs = [paths[file_id] for file_id, _ in task.outputs]
    if options.programs == "recorded":
        if task.program is None:
            problems.add(
                task.where,
                f"task {task.id!r} has no recorded command.program to run; "
                'run it with [wfformat] programs = "stand-in"',
            )
        # Arguments are command-line fragments ("--percent-cpu 0.6" is one of them): joined
        # with spaces for the shell to split, as WfCommons' own translators (bash, makeflow) do.
        command = " ".join([shlex.quote(task.program or ""), *task.arguments])
    else:
        inputs.append({"url": STANDIN_URL, "path": STANDIN_PATH})
        command = _standin_command(
            task.id,
            task.program or task.name,
            (task.runtime_s or 0.0) * options.runtime_scale,
            [paths[file_id] for file_id, _ in task.inputs],
            [(paths[file_id], sizes[file_id]) for file_id, _ in task.outputs],
            options,
        )
    native: dict[str, Any] = {"command": command, "inputs": inputs, "outputs": outputs}
    if after:
        native["after"] = after
    env = {"WFFORMAT_ID": task.id, "WFFORMAT_NAME": task.name}
    if task.runtime_s is not None:
        env["WFFORMAT_RUNTIME_S"] = f"{task.runtime_s:g}"
    if task.cores is not None:
        env["WFFORMAT_CORES"] = f"{task.cores:g}"
    if task.machines:
        env["WFFORMAT_MACHINES"] = ",".join(task.machines)
    native["env"] = env
    return native


def _standin_command(
    task_id: str,
    program: str,
    cpu_s: float,
    inputs: list[str],
    outputs: list[tuple[str, int]],
    options: WfFormatOptions,
) -> str:
    head = [options.python, STANDIN_PATH, f"--task={task_id}", f"--program={program}"]
    tail = [f"--out={path}={round(size * options.size_scale)}" for path, size in outputs]
    command = shlex.join(
        [*head, f"--cpu-seconds={cpu_s:.6g}", *(f"--in={p}" for p in inputs), *tail]
    )
    if len(command.encode()) > _COMMAND_BUDGET:
        # Thousands of inputs (a Montage mAdd) do not fit in one command: the stand-in then
        # counts the files staged in its sandbox, each of which the worker has checked.
        command = shlex.join(
            [*head, f"--cpu-seconds={cpu_s:.6g}", f"--in-count={len(inputs)}", *tail]
        )
    return command


def _absent_sources(tasks: list[_Task], paths: Mapping[str, str], root: Path) -> list[str]:
    """File ids read, written by no task and not in the submit directory, in reading order."""
    written = {file_id for task in tasks for file_id, _ in task.outputs}
    absent: dict[str, None] = {}
    present: dict[str, bool] = {}
    for task in tasks:
        for file_id, _ in task.inputs:
            if file_id in written or file_id in absent:
                continue
            if file_id not in present:
                present[file_id] = (root / paths[file_id]).is_file()
            if not present[file_id]:
                absent[file_id] = None
    return list(absent)


def _inputs_tasks(
    made_up: list[str], paths: Mapping[str, str], sizes: Mapping[str, int], options: WfFormatOptions
) -> dict[str, dict[str, Any]]:
    """The tasks that write the source inputs the instance only names, at their recorded size:
    `bgrid-wfformat-inputs`, then `-2`, `-3`... as many as their commands need to fit."""
    groups: list[list[tuple[str, int]]] = [[]]
    length = 0
    for file_id in made_up:
        path = paths[file_id]
        word = len(shlex.quote(f"--out={path}={sizes.get(file_id, 0)}").encode()) + 1
        if groups[-1] and length + word > _COMMAND_BUDGET // 2:  # room for the head and scaling
            groups.append([])
            length = 0
        groups[-1].append((path, sizes.get(file_id, 0)))
        length += word
    tasks: dict[str, dict[str, Any]] = {}
    for number, outputs in enumerate(groups, start=1):
        name = INPUTS_TASK if number == 1 else f"{INPUTS_TASK}-{number}"
        tasks[name] = {
            "command": _standin_command(name, "source inputs", 0.0, [], outputs, options),
            "inputs": [{"url": STANDIN_URL, "path": STANDIN_PATH}],
            "outputs": [path for path, _ in outputs],
        }
    return tasks


def _instance_facts(data: Mapping[str, Any], options: WfFormatOptions) -> dict[str, Any]:
    """What the instance says about itself and its run, and how bgrid runs it."""
    facts: dict[str, Any] = {
        key: data[key]
        for key in ("name", "schemaVersion", "description", "createdAt", "runtimeSystem")
        if key in data
    }
    workflow = data.get("workflow")
    execution = workflow.get("execution", workflow) if isinstance(workflow, Mapping) else {}
    if isinstance(execution, Mapping):
        for key in ("makespanInSeconds", "executedAt", "machines"):
            if key in execution:
                facts[key] = execution[key]
    facts["programs"] = options.programs
    if options.programs == "stand-in":
        facts["runtime_scale"] = options.runtime_scale
        facts["size_scale"] = options.size_scale
    return facts


def _job_name(value: object) -> str | None:
    """The instance's name as a job name (see the loader's rule), or None to use the file's."""
    if not isinstance(value, str):
        return None
    name = _NOT_IN_JOB_NAME.sub("-", value).strip("-._ ")
    name = name.encode()[:_MAX_JOB_NAME_BYTES].decode(errors="ignore").rstrip("-._ ")
    return name or None
