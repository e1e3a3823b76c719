"""Read a workflow file (YAML or JSON) and validate all of it before any peer is touched.

A `.dag` file (HTCondor DAGMan) is first translated into the same mapping by dag/dagman.py,
then validated here like any other, so every check and message stays in one place.

Validation runs in three passes, each reporting every problem it finds in one DagError:
1. shape and types of every field, paths normalized and kept inside the task directory;
2. file flow: one writer per file, every input written by a task, present in the submit
   directory or named by a URL, `after` names existing tasks;
3. no cycle (networkx, linear time; the cycle is only searched for once one is known to exist).
An unknown key is an error (a typo such as `input:` must not drop a task's inputs unnoticed),
reported once per key with a suggestion. Top-level keys that start with `x-` are the user's
own (YAML anchors for merge keys, as in Docker Compose) and are skipped.

A task's `pre` and `post` scripts run on the coordinator's host (coordinator/scripts.py):
an input that no task writes, absent from the submit directory, is not an error when every
task that reads it has a pre (`Workflow.pre_made`: the pre may write it; hashed after it).
`stdout`/`stderr` name submit-directory copies of a task's last attempt's streams: each
must be a path of its own (no output, input or other copy).

An input may be a URL (http, https, file) or `{url: URL, path: NAME}`: the task sees it at
NAME, by default the URL path's last segment. `TaskSpec.inputs` holds only such paths, and
`Workflow.urls` says which of them come from a URL, so everything downstream stays path-based.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from itertools import pairwise
from pathlib import Path
from types import MappingProxyType
from typing import Any

import networkx as nx

from bonjourgrid.dag.model import (
    NO_MAPPING,
    RANKS,
    AbortOn,
    GridSpec,
    TaskSpec,
    Workflow,
    normalize_path,
)
from bonjourgrid.dag.parse import gc_paused, parse_json, parse_yaml
from bonjourgrid.dag.urls import UrlInputs, is_url
from bonjourgrid.dag.wfformat import WfFormatOptions, is_wfformat, wfformat_to_mapping
from bonjourgrid.errors import DagError, RequirementError
from bonjourgrid.requirements import Requirement
from bonjourgrid.wire import MAX_STRING
from bonjourgrid.worker.limits import LIMIT_KEYS, check_cpu_s, check_memory, check_wall_s

__all__ = [
    "load_workflow",
    "parse_worker_range",
    "workflow_from_mapping",
]

_TASK_NAME = re.compile(r"[A-Za-z0-9_.+-]+\Z")  # '+': DAGMan's splice separator
_MAX_TASK_NAME = 200  # characters; a task name becomes a directory name on the peers
_JOB_NAME = re.compile(r"\w[\w .-]*\Z")
_MAX_JOB_NAME_BYTES = 63  # the job is advertised as a DNS-SD instance name: one DNS label
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_WORKERS = re.compile(r"\s*(\d*)\s*(?:\.\.\s*(\d*))?\s*\Z")
_MAX_PROBLEMS_SHOWN = 20
MAX_QUORUM = 9  # agreeing runs a task may ask for (up to 2 x 9 - 1 runs on distinct peers)
_MAX_CYCLE_SHOWN = 12  # tasks
_MAX_SUGGESTION_POOL = 5000  # beyond this, a "did you mean" search would cost more than it helps

_TOP_KEYS = ("name", "grid", "defaults", "categories", "tasks")
_GRID_KEYS = ("workers", "require", "max_cost", "rank")
_DEFAULT_KEYS = (
    "retries", "require", "env", "keep", "limits", "priority", "category", "retry_unless_exit",
    "quorum",
)  # fmt: skip
_TASK_KEYS = (
    "command", "inputs", "outputs", "after", "retries", "require", "env", "keep", "limits",
    "priority", "category", "retry_unless_exit", "abort_on", "final", "noop",
    "pre", "post", "script_dir", "pre_skip", "stdout", "stderr", "quorum",
)  # fmt: skip
_CATEGORY_KEYS = ("max_running",)
_ABORT_KEYS = ("exit", "status")
_KEY_SETS: dict[tuple[str, ...], frozenset[str]] = {
    keys: frozenset(keys)
    for keys in (
        _TOP_KEYS, _GRID_KEYS, _DEFAULT_KEYS, _TASK_KEYS, LIMIT_KEYS, _CATEGORY_KEYS, _ABORT_KEYS
    )
}  # fmt: skip
_CATEGORY_NAME = _TASK_NAME


class _Problems:
    """Collects every problem of one pass, so a user fixes them all in one round."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []
        self.unknown: dict[tuple[str, str], list[str]] = defaultdict(list)

    def add(self, problem: str) -> None:
        self.items.append(problem)

    @property
    def few(self) -> bool:
        """True while extra effort on messages (suggestions) is still going to be shown."""
        return len(self.items) < _MAX_PROBLEMS_SHOWN

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            raise DagError(f"{self.source}: {self.items[0]}")
        shown = "\n  - ".join(self.items[:_MAX_PROBLEMS_SHOWN])
        more = len(self.items) - _MAX_PROBLEMS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise DagError(f"{self.source} has {len(self.items)} problems:\n  - {shown}{tail}")

    def note_unknown(self, raw: Mapping[Any, Any], known: tuple[str, ...], where: str) -> None:
        if raw.keys() <= _KEY_SETS[known]:
            return
        for key in raw:
            if key not in known:
                self.unknown[(str(key), ", ".join(known))].append(where)

    def add_unknown(self) -> None:
        """One problem per unknown key, however many tasks repeat it."""
        for (key, known), places in self.unknown.items():
            close = difflib.get_close_matches(key, known.split(", "), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {known}"
            where = places[0] if len(places) == 1 else f"{places[0]} and {len(places) - 1} more"
            self.add(f"unknown key {key!r} in {where}; {hint}")


def _suggest(word: str, pool: Mapping[str, object] | list[str], problems: _Problems) -> str:
    if not problems.few or len(pool) > _MAX_SUGGESTION_POOL:
        return ""
    close = difflib.get_close_matches(word, list(pool), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---------------------------------------------------------------------------------------------
# Reading the file


def load_workflow(path: str | Path, *, wfformat: WfFormatOptions | None = None) -> Workflow:
    """Read and validate a .yaml/.yml/.json/.dag workflow; its directory is the submit directory.

    A .dag file is an HTCondor DAGMan DAG with its submit files (dag/dagman.py). A .json file
    holding a WfCommons WfFormat instance is read by dag/wfformat.py, run as `wfformat` says
    (default: every task a stand-in, see there).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".dag":  # HTCondor DAGMan, with its submit files
        try:  # htcondor2 is loaded only for a DAG, and is an optional dependency
            from bonjourgrid.dag.dagman import dagman_mapping
        except ModuleNotFoundError as err:
            if not (err.name or "").startswith("htcondor"):
                raise
            raise DagError(
                f"{path}: reading a DAGMan file needs HTCondor's Python bindings; "
                "install them with: pip install 'bonjourgrid[condor]'"
            ) from None

        with gc_paused():
            mapping, root = dagman_mapping(path)
            return workflow_from_mapping(mapping, root, source=path.name)
    if suffix not in (".yaml", ".yml", ".json"):
        raise DagError(
            f"{path}: unknown workflow file type {suffix or '(none)'!r}; "
            "write the workflow as .yaml, .yml, .json or an HTCondor DAGMan .dag"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DagError(f"{path}: no such workflow file; check the path") from None
    except IsADirectoryError:
        raise DagError(f"{path} is a directory; give the workflow file inside it") from None
    except UnicodeDecodeError as err:
        raise DagError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DagError(f"{path}: cannot read the workflow file: {err.strerror}") from None
    # A 100,000-task workflow is millions of objects, none in a cycle: the collector would
    # walk them over and over (a 3-4x slowdown) and find nothing to free.
    with gc_paused():
        data = parse_json(text, path.name) if suffix == ".json" else parse_yaml(text, path.name)
        root = path.resolve().parent
        if suffix == ".json" and is_wfformat(data):
            assert isinstance(data, Mapping)
            data = wfformat_to_mapping(data, root, path.name, wfformat)
        return workflow_from_mapping(data, root, source=path.name)


# ---------------------------------------------------------------------------------------------
# Validation


def workflow_from_mapping(
    data: object,
    root: str | Path,
    source: str = "<workflow>",
    *,
    check_sources: bool = True,
) -> Workflow:
    """Validate a decoded workflow; `check_sources=False` trusts that unproduced inputs exist."""
    root = Path(root)
    problems = _Problems(source)
    if data is None:
        raise DagError(f"{source}: the workflow is empty; it needs a `tasks:` mapping")
    if not isinstance(data, Mapping):
        raise DagError(
            f"{source}: the top level is a {type(data).__name__}, not a mapping; "
            "start the file with `name:` and `tasks:`"
        )
    own = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    problems.note_unknown(own, _TOP_KEYS, "the top level")
    name = _read_job_name(data.get("name"), source, problems)
    grid = _read_grid(data.get("grid"), problems)
    requirements: dict[str, None] = {}  # texts known to parse, so 100k equal ones parse once
    defaults = _read_defaults(data.get("defaults"), requirements, problems)
    urls = UrlInputs()
    raw_tasks = data.get("tasks")
    if not isinstance(raw_tasks, Mapping) or not raw_tasks:
        got = f"a {type(raw_tasks).__name__}" if raw_tasks else "missing or empty"
        problems.add(
            f"`tasks` is {got}; it must map each task name to its command, inputs and outputs"
        )
        raw_tasks = {}

    limits = _read_categories(data.get("categories"), problems)
    tasks: dict[str, TaskSpec] = {}
    for task_name, raw in raw_tasks.items():
        task = _read_task(task_name, raw, defaults, requirements, urls, problems)
        if task is not None:
            tasks[task.name] = task
    problems.add_unknown()
    problems.raise_if_any()
    categories = _categories(tasks, limits, problems)

    producer = _producers(tasks, problems)
    for problem in urls.problems(producer, check_sources) if urls.urls else ():
        problems.add(problem)
    pre_made: set[str] = set()
    graph = _build_graph(tasks, producer, root, check_sources, urls.urls, problems, pre_made)
    _check_final_stands_apart(tasks, graph, problems)
    _check_scripts(tasks, producer, root, check_sources, problems)
    problems.raise_if_any()
    _check_acyclic(graph, problems)
    problems.raise_if_any()
    return Workflow(
        name=name,
        root=root,
        tasks=tasks,
        graph=graph,
        producer=producer,
        grid=grid,
        urls=urls.urls,
        categories=categories,
        pre_made=frozenset(pre_made),
    )


def _read_job_name(value: object, source: str, problems: _Problems) -> str:
    if value is None:
        # default: the file's stem, made into a valid job name
        stem = re.sub(r"[^\w.-]+", "-", Path(source).stem).strip("-._ ") or "workflow"
        return stem.encode()[:_MAX_JOB_NAME_BYTES].decode(errors="ignore")
    if (
        not isinstance(value, str)
        or not _JOB_NAME.match(value)
        or len(value.encode()) > _MAX_JOB_NAME_BYTES
    ):
        problems.add(
            f"name {value!r} is not a job name: use letters, digits, spaces, '.', '_' or '-', "
            f"at most {_MAX_JOB_NAME_BYTES} bytes, starting with a letter or digit"
        )
        return "workflow"
    return value


def parse_worker_range(value: object) -> tuple[int | None, int | None]:
    """(min, max) from 4 (at most 4), "2..8", "2..", "..8" or {min: 2, max: 8}; else ValueError."""
    low: object
    high: object
    if isinstance(value, Mapping):
        extra = set(value) - {"min", "max"}
        if extra:
            raise ValueError(f"workers has unknown keys {sorted(map(str, extra))}; use min and max")
        low, high = value.get("min"), value.get("max")
    elif isinstance(value, int) and not isinstance(value, bool):
        low, high = None, value
    elif isinstance(value, str) and (match := _WORKERS.match(value)) and any(match.groups()):
        low_text, high_text = match.groups()
        if high_text is None and ".." not in value:
            low, high = None, int(low_text)
        else:
            low = int(low_text) if low_text else None
            high = int(high_text) if high_text else None
    else:
        raise ValueError(
            f"workers {value!r} is not a count or range; write 4, 1..8 or {{min: 1, max: 8}}"
        )
    for label, number in (("min", low), ("max", high)):
        if number is not None and (
            not isinstance(number, int) or isinstance(number, bool) or number < 0
        ):
            raise ValueError(f"workers {label} {number!r} must be a whole number >= 0")
    assert low is None or isinstance(low, int)
    assert high is None or isinstance(high, int)
    if high is not None and high < 1:
        raise ValueError("workers max must be at least 1")
    if low is not None and high is not None and low > high:
        raise ValueError(f"workers min {low} is larger than max {high}")
    return low, high


def _check_requirement(
    text: object, where: str, requirements: dict[str, None], problems: _Problems
) -> str | None:
    if text is None:
        return None
    if not isinstance(text, str):
        problems.add(f'{where}: require must be a string such as "ram>=4GiB and cpus>=2"')
        return None
    if text not in requirements:
        try:
            Requirement.parse(text)
        except RequirementError as err:
            problems.add(f"{where}: {err}")
            return None
        requirements[text] = None
    return text if text.strip() else None


def _read_grid(value: object, problems: _Problems) -> GridSpec:
    if value is None:
        return GridSpec()
    if not isinstance(value, Mapping):
        problems.add('`grid` must be a mapping such as {workers: 1..8, require: "ram>=2GiB"}')
        return GridSpec()
    problems.note_unknown(value, _GRID_KEYS, "grid")
    low = high = None
    if value.get("workers") is not None:
        try:
            low, high = parse_worker_range(value["workers"])
        except ValueError as err:
            problems.add(f"grid: {err}")
    require = _check_requirement(value.get("require"), "grid", {}, problems)
    max_cost = value.get("max_cost")
    if max_cost is not None and (
        not isinstance(max_cost, int | float)
        or isinstance(max_cost, bool)
        or not math.isfinite(max_cost)
        or max_cost < 0
    ):
        problems.add(f"grid: max_cost {max_cost!r} must be a number >= 0 (price per CPU-hour)")
        max_cost = None
    rank = value.get("rank")
    if rank is not None and rank not in RANKS:
        problems.add(f"grid: rank {rank!r} is not one of {', '.join(RANKS)}")
        rank = None
    return GridSpec(
        workers_min=low,
        workers_max=high,
        require=require,
        max_cost=float(max_cost) if max_cost is not None else None,
        rank=rank,
    )


def _read_defaults(
    value: object, requirements: dict[str, None], problems: _Problems
) -> dict[str, Any]:
    """The validated `defaults:` section, checked once rather than once per task."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add('`defaults` must be a mapping such as {retries: 2, require: "ram>=1GiB"}')
        return {}
    problems.note_unknown(value, _DEFAULT_KEYS, "defaults")
    defaults: dict[str, Any] = {}
    if value.get("retries") is not None:
        defaults["retries"] = _check_retries(value["retries"], "defaults", problems)
    if value.get("keep") is not None:
        defaults["keep"] = _check_keep(value["keep"], "defaults", problems)
    defaults["require"] = _check_requirement(
        value.get("require"), "defaults", requirements, problems
    )
    defaults["env"] = _read_env(value.get("env"), "defaults", problems)
    limits = _read_limits(value.get("limits"), "defaults", problems)
    defaults["limits"] = {key: v for key, v in limits.items() if v is not None}
    node = defaults["node"] = {}  # the node keys every task gets, unless it sets its own
    for key, check in _NODE_DEFAULTS:
        if value.get(key) is not None:
            node[key] = check(value[key], "defaults", problems)
    return defaults


def _check_retries(value: object, where: str, problems: _Problems) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        problems.add(f"{where}: retries {value!r} must be a whole number >= 0")
        return 0
    return value


def _check_keep(value: object, where: str, problems: _Problems) -> bool:
    if not isinstance(value, bool):
        problems.add(f"{where}: keep {value!r} must be true or false")
        return False
    return value


def _read_task(
    name: object,
    raw: object,
    defaults: Mapping[str, Any],
    requirements: dict[str, None],
    urls: UrlInputs,
    problems: _Problems,
) -> TaskSpec | None:
    if not isinstance(name, str) or not _TASK_NAME.match(name) or name in (".", ".."):
        problems.add(
            f"task name {name!r} is not valid: use letters, digits, '.', '_', '+' or '-' "
            "(quote numbers)"
        )
        return None
    if len(name) > _MAX_TASK_NAME:
        problems.add(f"task name {name[:40]!r}... is longer than {_MAX_TASK_NAME} characters")
        return None
    where = f"task {name!r}"
    if not isinstance(raw, dict | Mapping):  # dict first: the common case, checked cheaply
        problems.add(f"{where} must be a mapping with at least `command:`")
        return None
    problems.note_unknown(raw, _TASK_KEYS, where)
    count = len(problems.items)

    # Most tasks set no node key: one set operation says so.
    node: Mapping[str, Any] = defaults.get("node", NO_MAPPING)
    noop = False
    if not _NODE_KEY_SET.isdisjoint(raw):
        own = dict(node)
        for key, check in _NODE_KEYS:
            if raw.get(key) is not None:
                own[key] = check(raw[key], where, problems)
        node = own
        noop = _check_flag(raw.get("noop", False), where, "noop", problems)
    command = raw.get("command")
    if noop and command is None:
        command = ""  # nothing runs: a noop task needs no command
    elif not isinstance(command, str) or not command.strip():
        got = "has no command" if command is None else f"command {command!r} is not a string"
        problems.add(f"{where} {got}; write the shell command as one string")
    else:
        _check_wire_string(
            command, f"{where}: command", "put the script in an input file and run that", problems
        )
    inputs = _read_paths(raw.get("inputs"), where, "inputs", problems, urls)
    outputs = _read_paths(raw.get("outputs"), where, "outputs", problems)
    both = () if set(inputs).isdisjoint(outputs) else sorted(set(inputs) & set(outputs))
    for path in both[:3]:
        problems.add(
            f"{where}: {path!r} is both an input and an output; write the result to a new path"
        )
    after = _read_names(raw.get("after"), where, problems)
    # a task's own value replaces the default; env is merged, the task's variables winning
    retries = defaults.get("retries", 0)
    if "retries" in raw:
        retries = _check_retries(raw["retries"], where, problems)
    require = defaults.get("require")
    if "require" in raw:
        require = _check_requirement(raw["require"], where, requirements, problems)
    keep = defaults.get("keep", False)
    if "keep" in raw:
        keep = _check_keep(raw["keep"], where, problems)
    env = defaults.get("env", {})
    if raw.get("env") is not None:
        env = {**env, **_read_env(raw["env"], where, problems)}
    limits = defaults.get("limits", {})
    if raw.get("limits") is not None:
        merged = {**limits, **_read_limits(raw["limits"], where, problems)}
        limits = {key: v for key, v in merged.items() if v is not None}  # None lifts a default
    if noop and outputs:
        problems.add(
            f"{where}: a noop task runs nothing, so it cannot write outputs "
            f"({outputs[0]!r}); drop `outputs` or `noop`"
        )
    scripts = _read_scripts(raw, where, problems) if _SCRIPT_KEYS & raw.keys() else {}
    if len(problems.items) > count:
        return None
    assert isinstance(command, str)
    return TaskSpec(
        name=name,
        command=command,
        inputs=inputs,
        outputs=outputs,
        after=after,
        retries=retries,
        require=require,
        env=MappingProxyType(env) if env else NO_MAPPING,
        keep=keep,
        limits=MappingProxyType(limits) if limits else NO_MAPPING,
        noop=noop,
        **node,
        **scripts,
    )


def _check_int(value: object, where: str, key: str, problems: _Problems) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        problems.add(f"{where}: {key} {value!r} must be a whole number")
        return 0
    return value


def _check_quorum(value: object, where: str, problems: _Problems) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_QUORUM:
        problems.add(
            f"{where}: quorum {value!r} must be a whole number from 1 (one run, the opt-out of "
            f"a non-deterministic task) to {MAX_QUORUM}"
        )
        return 1
    return value


def _check_priority(value: object, where: str, problems: _Problems) -> int:
    return _check_int(value, where, "priority", problems)


def _check_category(value: object, where: str, problems: _Problems) -> str | None:
    if not isinstance(value, str) or not _CATEGORY_NAME.match(value):
        problems.add(
            f"{where}: category {value!r} is not a name: use letters, digits, '.', '_' or '-'"
        )
        return None
    return value


def _check_unless_exit(value: object, where: str, problems: _Problems) -> int | None:
    code = _check_int(value, where, "retry_unless_exit", problems)
    if value.__class__ is int and code == 0:
        problems.add(f"{where}: retry_unless_exit 0 is a success, never a failed attempt")
    return code


def _check_flag(value: object, where: str, key: str, problems: _Problems) -> bool:
    if not isinstance(value, bool):
        problems.add(f"{where}: {key} {value!r} must be true or false")
        return False
    return value


def _check_final_flag(value: object, where: str, problems: _Problems) -> bool:
    return _check_flag(value, where, "final", problems)


def _check_abort_on(value: object, where: str, problems: _Problems) -> AbortOn | None:
    """`abort_on: {exit: 3, status: 1}`; the status defaults to the exit code."""
    if not isinstance(value, Mapping) or "exit" not in value:
        problems.add(
            f"{where}: abort_on must be a mapping such as {{exit: 3, status: 1}} "
            "(the exit code that stops the job, and the status bgrid submit ends with)"
        )
        return None
    problems.note_unknown(value, _ABORT_KEYS, f"{where} abort_on")
    count = len(problems.items)
    code = _check_int(value["exit"], where, "abort_on exit", problems)
    status = code if value.get("status") is None else value["status"]
    if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status <= 255:
        problems.add(f"{where}: abort_on status {status!r} must be an exit status, 0 to 255")
    if len(problems.items) > count:
        return None
    assert isinstance(status, int)
    return AbortOn(code, status)


# What `defaults:` may set for every task, and every node key a task may set (model.py).
_NODE_DEFAULTS: tuple[tuple[str, Callable[[object, str, _Problems], Any]], ...] = (
    ("priority", _check_priority),
    ("category", _check_category),
    ("retry_unless_exit", _check_unless_exit),
    ("quorum", _check_quorum),
)
_NODE_KEYS = (*_NODE_DEFAULTS, ("abort_on", _check_abort_on), ("final", _check_final_flag))
_NODE_KEY_SET = frozenset([*(key for key, _ in _NODE_KEYS), "noop"])


def _read_categories(value: object, problems: _Problems) -> dict[str, int | None]:
    """The top-level `categories: {NAME: {max_running: N}}`; None: no limit."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add("`categories` must be a mapping such as {download: {max_running: 2}}")
        return {}
    limits: dict[str, int | None] = {}
    for name, raw in value.items():
        where = f"categories: {name!r}"
        if _check_category(name, "categories", problems) is None:
            continue
        if raw is None:
            limits[name] = None
            continue
        if not isinstance(raw, Mapping):
            problems.add(f"{where} must be a mapping such as {{max_running: 2}}")
            continue
        problems.note_unknown(raw, _CATEGORY_KEYS, where)
        cap = raw.get("max_running")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            problems.add(f"{where}: max_running {cap!r} must be a whole number >= 1")
            continue
        limits[name] = cap
    return limits


def _categories(
    tasks: Mapping[str, TaskSpec], limits: Mapping[str, int | None], problems: _Problems
) -> dict[str, int | None]:
    """Every category a task names, with its limit (None: not listed, so unlimited). A
    listed category that no task names is a typo until shown otherwise: its limit would
    hold nothing back."""
    named = {task.category for task in tasks.values() if task.category is not None}
    for name in limits:
        if name not in named:
            hint = _suggest(name, sorted(named), problems)
            problems.add(
                f"categories: {name!r} is named by no task{hint}; "
                "set `category:` on its tasks or remove it"
            )
    return {name: limits.get(name) for name in sorted(named)}


def _check_final_stands_apart(
    tasks: Mapping[str, TaskSpec], graph: nx.DiGraph, problems: _Problems
) -> None:
    """At most one final task, standing apart from the DAG: it runs once all else ended."""
    finals = [name for name, task in tasks.items() if task.final]
    for extra in finals[1:]:
        problems.add(
            f"task {extra!r} is final, and so is {finals[0]!r}; a workflow has at most one "
            "final task"
        )
    for name in finals[:1]:
        for before in graph.predecessors(name):
            files = graph.edges[before, name]["files"]
            why = f"reads {files[0]!r} from {before!r}" if files else f"runs after {before!r}"
            problems.add(
                f"task {name!r} is final: it runs after every other task anyway, so it "
                f"cannot depend on one (it {why}); remove that dependency"
            )
        for after in graph.successors(name):
            files = graph.edges[name, after]["files"]
            why = f"reads {files[0]!r} from it" if files else "runs after it"
            problems.add(
                f"task {name!r} is final: it runs last, so no task can depend on it "
                f"({after!r} {why}); remove that dependency"
            )
        if tasks[name].abort_on is not None:
            problems.add(
                f"task {name!r} is final: nothing is left to abort when it runs; drop its abort_on"
            )


_SCRIPT_KEYS = frozenset(("pre", "post", "script_dir", "pre_skip", "stdout", "stderr"))


def _read_scripts(raw: Mapping[Any, Any], where: str, problems: _Problems) -> dict[str, Any]:
    """`pre`, `post`, `script_dir`, `pre_skip`, `stdout`, `stderr` of one task, checked."""
    scripts: dict[str, Any] = {}
    for key in ("pre", "post"):
        value = raw.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            problems.add(f"{where}: {key} {value!r} must be a shell command, as one string")
        elif "\0" in value:
            problems.add(f"{where}: {key} contains a NUL character, which no shell can run")
        else:
            scripts[key] = value
    script_dir = raw.get("script_dir")
    if script_dir is not None:
        try:
            normal = "." if script_dir in (".", "./") else normalize_path(script_dir)
            scripts["script_dir"] = normal
        except ValueError as err:
            problems.add(f"{where}: script_dir: {err}")
    pre_skip = raw.get("pre_skip")
    if pre_skip is not None:
        if not isinstance(pre_skip, int) or isinstance(pre_skip, bool) or not 1 <= pre_skip <= 255:
            problems.add(f"{where}: pre_skip {pre_skip!r} must be an exit code from 1 to 255")
        elif "pre" not in scripts:
            problems.add(f"{where}: pre_skip needs a pre script (`pre:`) whose exit code it is")
        else:
            scripts["pre_skip"] = pre_skip
    for key in ("stdout", "stderr"):
        if raw.get(key) is None:
            continue
        try:
            scripts[key] = normalize_path(raw[key])
        except ValueError as err:
            problems.add(f"{where}: {key}: {err}")
    return scripts


def _check_scripts(
    tasks: Mapping[str, TaskSpec],
    producer: Mapping[str, str],
    root: Path,
    check_sources: bool,
    problems: _Problems,
) -> None:
    """Script directories exist; a stdout/stderr copy overwrites no other file of the job."""
    copies: dict[str, str] = {}  # path -> "task 'a': stdout"
    inputs: set[str] | None = None
    for name, task in tasks.items():
        if check_sources and (task.pre or task.post) and not (root / task.script_dir).is_dir():
            problems.add(
                f"task {name!r}: script_dir {task.script_dir!r} is not a directory in {root}; "
                "create it, or fix the path"
            )
        for key in ("stdout", "stderr"):
            path = getattr(task, key)
            if path is None:
                continue
            what = f"task {name!r}: {key} {path!r}"
            if inputs is None:  # built once, and only for a workflow that copies logs
                inputs = {p for t in tasks.values() for p in t.inputs}
            if path in producer:
                problems.add(f"{what} is also an output of task {producer[path]!r}; rename one")
            elif path in inputs:
                problems.add(f"{what} is an input of the workflow; copying to it would replace it")
            elif path in copies:
                problems.add(f"{what} is also {copies[path]}; each copy needs its own path")
            else:
                copies[path] = f"the {key} of task {name!r}"


def _as_list(value: object, where: str, what: str, problems: _Problems) -> list[object]:
    if isinstance(value, list):
        return value
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, tuple):
        return list(value)
    problems.add(f"{where} must be a list of {what}, not {type(value).__name__}")
    return []


def _read_paths(
    value: object, task: str, key: str, problems: _Problems, urls: UrlInputs | None = None
) -> tuple[str, ...]:
    """Normalized paths; with `urls` (inputs), URL items too, recorded there."""
    paths: dict[str, None] = {}  # ordered set: a path listed twice counts once
    for index, item in enumerate(_as_list(value, f"{task}: {key}", "paths", problems)):
        try:
            if item.__class__ is str and "://" not in item:
                # The common case, checked cheaply. Interned: a file is named by its writer
                # and by each reader, and the coordinator keeps every name for the whole job.
                paths[sys.intern(normalize_path(item))] = None
            elif urls is not None and (isinstance(item, Mapping) or is_url(str(item))):
                paths[urls.add(item, task)] = None
            elif isinstance(item, str) and is_url(item):
                raise ValueError(
                    f"{item!r} is a URL; {key} are files in the task directory, write a path"
                )
            else:
                paths[normalize_path(item)] = None
        except ValueError as err:
            problems.add(f"{task}: {key}[{index}]: {err}")
    return tuple(paths)


def _read_names(value: object, where: str, problems: _Problems) -> tuple[str, ...]:
    names: dict[str, None] = {}
    for item in _as_list(value, f"{where}: after", "task names", problems):
        if isinstance(item, str):
            names[item] = None
        else:
            problems.add(f"{where}: after: {item!r} is not a task name; quote it")
    return tuple(names)


def _read_env(value: object, where: str, problems: _Problems) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add(f"{where}: env must be a mapping of variable names to values")
        return {}
    env: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            problems.add(
                f"{where}: env name {key!r} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"
            )
        elif len(key) > MAX_STRING:
            problems.add(f"{where}: env name {key[:40]}... is over {MAX_STRING // 1024} KiB")
        elif isinstance(item, str):
            if _check_wire_string(
                item, f"{where}: env {key}", "pass it in an input file instead", problems
            ):
                env[key] = item
        elif isinstance(item, int | float) and not isinstance(item, bool):
            env[key] = str(item)
        else:
            problems.add(f"{where}: env {key} = {item!r} must be a string; quote it")
    return env


def _check_wire_string(text: str, what: str, instead: str, problems: _Problems) -> bool:
    """Whether a worker would take `text` (no NUL, within the wire's string limit); else noted."""
    # A worker refuses both at its boundary: caught here, the user hears it before any run.
    if "\0" in text:
        problems.add(f"{what} contains a NUL character, which no process can receive; remove it")
        return False
    if len(text) * 4 > MAX_STRING and len(text.encode("utf-8", "surrogatepass")) > MAX_STRING:
        problems.add(
            f"{what} is {len(text.encode('utf-8', 'surrogatepass'))} bytes, over the "
            f"{MAX_STRING // 1024} KiB a worker takes; {instead}"
        )
        return False
    return True


def _read_limits(value: object, where: str, problems: _Problems) -> dict[str, int | None]:
    """`limits:` as cpu_s, wall_s (whole seconds) and memory (bytes); None lifts a default."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add(f"{where}: limits must be a mapping such as {{cpu_s: 600, memory: 2GiB}}")
        return {}
    problems.note_unknown(value, LIMIT_KEYS, f"{where} limits")
    limits: dict[str, int | None] = {}
    for key, check in (("cpu_s", check_cpu_s), ("memory", check_memory), ("wall_s", check_wall_s)):
        if key not in value:
            continue
        try:
            limits[key] = None if value[key] is None else check(value[key])
        except ValueError as err:
            problems.add(f"{where}: limits: {err}")
    return limits


def _producers(tasks: Mapping[str, TaskSpec], problems: _Problems) -> dict[str, str]:
    producer: dict[str, str] = {}
    for name, task in tasks.items():
        for path in task.outputs:
            first = producer.setdefault(path, name)
            if first != name:
                problems.add(
                    f"task {name!r}: output {path!r} is also written by task {first!r}; "
                    "a file must have one writer, so rename one of them"
                )
    return producer


def _build_graph(
    tasks: Mapping[str, TaskSpec],
    producer: Mapping[str, str],
    root: Path,
    check_sources: bool,
    urls: Mapping[str, str],
    problems: _Problems,
    pre_made: set[str],
) -> nx.DiGraph:
    """The task graph; `pre_made` gets the absent inputs that each reader's pre may make."""
    files: dict[tuple[str, str], list[str]] = {}  # edge -> the files it carries
    # source path -> present, so a shared input is stat'ed once; a URL input is not looked for
    checked: dict[str, bool] = dict.fromkeys(urls, True)
    for name, task in tasks.items():
        for path in task.inputs:
            writer = producer.get(path)
            if writer is not None:
                files.setdefault((writer, name), []).append(path)
            elif check_sources:
                present = checked.get(path)
                if present is None:
                    present = checked[path] = (root / path).is_file()
                if not present and task.pre is not None and not (root / path).is_dir():
                    pre_made.add(path)  # its pre may write it: hashed after the pre ends
                elif not present:
                    problems.add(_missing_input(name, path, root, producer, problems))
        for before in task.after:
            if before in tasks:
                files.setdefault((before, name), [])
            else:
                hint = _suggest(before, tasks, problems)
                problems.add(f"task {name!r}: after names unknown task {before!r}{hint}")
    graph = nx.DiGraph()
    graph.add_nodes_from(tasks)
    graph.add_edges_from((u, v, {"files": carried}) for (u, v), carried in files.items())
    return graph


def _missing_input(
    task: str, path: str, root: Path, producer: Mapping[str, str], problems: _Problems
) -> str:
    if (root / path).is_dir():
        return (
            f"task {task!r}: input {path!r} is a directory in {root}; "
            "list the files inside it one by one"
        )
    hint = _suggest(path, producer, problems)
    return (
        f"task {task!r}: input {path!r} is not written by any task{hint} and is not a file in "
        f"{root}; add the file there or list it in the outputs of the task that makes it"
    )


def _check_acyclic(graph: nx.DiGraph, problems: _Problems) -> None:
    if nx.is_directed_acyclic_graph(graph):
        return
    names = _shortest_cycle(graph)
    edges = list(pairwise(names))
    if len(edges) > _MAX_CYCLE_SHOWN:  # a 100,000-task loop must not make a 1 MB message
        names = [*names[: _MAX_CYCLE_SHOWN - 2], "...", *names[-2:]]
    reasons = []
    for u, v in edges[:_MAX_CYCLE_SHOWN]:
        files = graph.edges[u, v]["files"]
        reasons.append(f"{v} reads {files[0]!r} from {u}" if files else f"{v} runs after {u}")
    more = "; ..." if len(edges) > _MAX_CYCLE_SHOWN else ""
    who = "a task depends on itself" if len(edges) == 1 else f"{len(edges)} tasks form a cycle"
    problems.add(
        f"{who}: {' -> '.join(names)} "
        f"({'; '.join(reasons)}{more}); remove one of these dependencies"
    )


def _shortest_cycle(graph: nx.DiGraph) -> list[str]:
    """One cycle as [a, b, ..., a]; linear time (nx.find_cycle takes seconds on long loops)."""
    for node in nx.nodes_with_selfloops(graph):
        return [node, node]
    looped = next(c for c in nx.strongly_connected_components(graph) if len(c) > 1)
    start = next(iter(looped))
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:  # breadth-first inside the component: the loop back to start is the shortest
        node = queue.popleft()
        for succ in graph.successors(node):
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if succ in looped and succ not in parent:
                parent[succ] = node
                queue.append(succ)
    raise AssertionError("a strongly connected component always holds a cycle")
