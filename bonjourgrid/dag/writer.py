"""A validated workflow back to the native mapping, and that mapping as YAML (`bgrid convert`).

Whatever format a workflow came in (YAML, JSON, and through `load_workflow` the other formats
it reads), what bgrid understood is a `Workflow` of `TaskSpec`s. `workflow_to_mapping` writes
it as the native mapping the loader reads: loading what it writes gives an equal workflow.
It writes every task in full (the loader has already merged `defaults:` into each task) and
leaves out every value that is its default, so the file says only what was given.

The task keys are one table, `TASK_KEYS`, in the order a reader expects them: a new key of
`TaskSpec` is written by adding its line there. Keys that other parts of the project add to
`TaskSpec` are listed already and read with `getattr`: until a `TaskSpec` has the attribute,
its default stands and nothing is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import yaml

from bonjourgrid.dag.model import TaskSpec, Workflow

__all__ = ["TASK_KEYS", "TaskKey", "workflow_to_mapping", "workflow_to_yaml"]


@dataclass(frozen=True)
class TaskKey:
    """One key of a task in the native format: read from `TaskSpec.<attr>`, left out at default."""

    key: str
    default: Any = None
    attr: str = ""  # the TaskSpec attribute; "" means the same name as the key
    write: Callable[[Any], Any] | None = None  # the value as the file says it; None: as is

    def value(self, task: TaskSpec) -> Any:
        return getattr(task, self.attr or self.key, self.default)


# The native task keys, in the order they are written. `command` and `inputs` are written by
# `_task_mapping` itself (a noop task has no command; URL inputs become {url, path}).
TASK_KEYS: tuple[TaskKey, ...] = (
    TaskKey("outputs", ()),
    TaskKey("after", ()),
    TaskKey("retries", 0),
    TaskKey("retry_unless_exit", None),  # nodes
    TaskKey("require", None),
    TaskKey("priority", 0),  # nodes
    TaskKey("category", None),  # nodes
    TaskKey("env", {}),
    TaskKey("limits", {}, write=lambda limits: _limits_mapping(limits)),
    TaskKey("keep", False),
    TaskKey("pre", None),  # scripts
    TaskKey("pre_skip", None),  # scripts
    TaskKey("post", None),  # scripts
    TaskKey("script_dir", "."),  # scripts
    TaskKey("stdout", None),  # scripts
    TaskKey("stderr", None),  # scripts
    TaskKey("abort_on", None),  # nodes
    TaskKey("final", False),  # nodes
    TaskKey("quorum", None),  # copies
)


def workflow_to_mapping(workflow: Workflow) -> dict[str, Any]:
    """The native mapping (name, grid, categories, tasks) that loads back into `workflow`."""
    mapping: dict[str, Any] = {"name": workflow.name}
    grid = _grid_mapping(workflow)
    if grid:
        mapping["grid"] = grid
    if workflow.categories:  # {NAME: limit}, None when the category has none
        mapping["categories"] = {
            name: {} if limit is None else {"max_running": limit}
            for name, limit in workflow.categories.items()
        }
    mapping["tasks"] = {
        name: _task_mapping(task, workflow.urls) for name, task in workflow.tasks.items()
    }
    return mapping


def workflow_to_yaml(workflow: Workflow, header: str = "") -> str:
    """`workflow` as a native YAML file; `header` (lines of text) goes on top as comments."""
    comments = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    text = yaml.dump(
        workflow_to_mapping(workflow),
        Dumper=_Dumper,
        sort_keys=False,  # the natural order: name, grid, tasks; command first in a task
        default_flow_style=None,  # short lists and mappings on one line: [a.txt, b.txt]
        allow_unicode=True,
        width=1 << 20,  # a command stays on its line, however long
    )
    return comments + text


_NOTHING: tuple[Any, ...] = (None, {}, [])  # never worth a line, whatever the default


def _task_mapping(task: TaskSpec, urls: Mapping[str, str]) -> dict[str, Any]:
    written: dict[str, Any] = {}
    if task.command or not getattr(task, "noop", False):
        written["command"] = task.command
    if getattr(task, "noop", False):
        written["noop"] = True
    if task.inputs:
        written["inputs"] = [
            {"url": urls[path], "path": path} if path in urls else path for path in task.inputs
        ]
    for key in TASK_KEYS:
        value = key.value(task)
        said = key.write(value) if key.write else _plain(value)
        if said != _plain(key.default) and said not in _NOTHING:
            written[key.key] = said
    return written


def _limits_mapping(limits: Mapping[str, int]) -> dict[str, Any]:
    """Limits as the file says them: memory as an exact size (a bare number would be MiB)."""
    written: dict[str, Any] = dict(limits)
    if "memory" in written:
        written["memory"] = _exact_size(written["memory"])
    return written


def _exact_size(n_bytes: int) -> str:
    """ "2GiB", "512MiB", or "1500B": the largest unit that says `n_bytes` exactly."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n_bytes % size == 0:
            return f"{n_bytes // size}{unit}"
    return f"{n_bytes}B"


def _grid_mapping(workflow: Workflow) -> dict[str, Any]:
    grid = workflow.grid
    written: dict[str, Any] = {}
    if grid.workers_min is not None or grid.workers_max is not None:
        low = "" if grid.workers_min is None else str(grid.workers_min)
        high = "" if grid.workers_max is None else str(grid.workers_max)
        written["workers"] = f"{low}..{high}"
    for key in ("require", "max_cost", "rank"):
        value = getattr(grid, key)
        if value is not None:
            written[key] = value
    return written


def _plain(value: Any) -> Any:
    """`value` as YAML-safe data: mappings as dicts, tuples as lists, dataclasses as mappings."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # a NamedTuple
        return {key: _plain(item) for key, item in value._asdict().items() if item is not None}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.asdict(value)
        return {key: _plain(item) for key, item in fields.items() if item is not None}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, PurePath):  # script_dir may be kept as a path
        return str(value)
    return value


class _Dumper(yaml.SafeDumper):
    """The safe dumper, with a multi-line command written as a literal block (`|`)."""


# Unicode line breaks other than \n: with allow_unicode, PyYAML writes them raw inside single
# quotes, and reads them back folded into a space; in double quotes they are escaped (\N...).
_UNICODE_BREAKS = frozenset("\x85\u2028\u2029")


def _str_representer(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style: str | None = None
    if not _UNICODE_BREAKS.isdisjoint(text):
        style = '"'
    elif "\n" in text and text == text.rstrip(" "):
        style = "|"
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str_representer)
