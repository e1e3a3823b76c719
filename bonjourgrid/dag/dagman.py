"""HTCondor DAGMan input: a `.dag` file and its submit files as the native workflow mapping.

`dagman_mapping(path)` reads the DAG (its INCLUDEs and SPLICEs too), reads each node's submit
file through HTCondor's bindings (dag/condor_submit.py), and returns the mapping that
`workflow_from_mapping` validates, with the DAG's directory as the submit directory. Every
check on tasks and files stays there; this module only translates, and refuses, with file,
line and construct, what it does not translate. Nothing is silently dropped.

Reading a DAG file. HTCondor's bindings have no DAG reader, so lines are parsed here, as
DAGMan reads them: one command per line (a trailing backslash continues it), `#` starts a
comment line, keywords in any case, node names as written. Relative paths (INCLUDE, SPLICE,
JOB files and DIRs) start from the DAG file's directory, as with `condor_submit_dag
-usedagdir`. A file is read in two passes: its nodes first (JOB, FINAL, SPLICE, and
INCLUDEd files, in the same scope), then the commands that refer to them, in file order, so a
command may come before the JOB it names, and the last command setting a node's property
wins, as in DAGMan. Submit files see DAGMan's $(JOB).
`ALL_NODES` means the JOB nodes of that file and its INCLUDEs (not splices, not FINAL).

A SPLICE's nodes are named `SPLICE+NODE` (nested: `OUTER+INNER+NODE`), as DAGMan names them.
A splice as a PARENT means its final nodes (those without children in it), as a CHILD its
first nodes. A node of a cluster of N procs (N > 1) becomes N tasks NODE.0 .. NODE.N-1; edges
to and from the node apply to each.

DAG commands (keywords in any case). Supported:
  JOB name file [DIR d] [NOOP]   a task per proc; DIR is the node's submitting directory;
                                 NOOP -> `noop: true` (its submit file is not read)
  PARENT p ... CHILD c ...       `after`, every parent to every child (nodes or splices)
  VARS node [PREPEND|APPEND] k="v" ...   macros of the node's submit file (PREPEND, the
                                 default, lets the file override); $(JOB) in a value is the
                                 node's name; a name the file does not use is refused
  RETRY node n [UNLESS-EXIT v]   `retries`, `retry_unless_exit` (each proc of a cluster;
                                 UNLESS-EXIT 0 means none, as in DAGMan)
  SCRIPT PRE|POST node exe args  `pre`/`post` with `script_dir` = the node's DIR; $JOB and
                                 $MAX_RETRIES are filled in, $RETRY, $RETURN,
                                 $PRE_SCRIPT_RETURN, $DAG_STATUS, $FAILED_COUNT become the
                                 BGRID_* env vars; one-proc nodes only
  PRE_SKIP node v                `pre_skip`
  ABORT-DAG-ON node v [RETURN s] `abort_on: {exit: v, status: s}`
  PRIORITY node p                `priority`
  CATEGORY node c; MAXJOBS c n   `category`; top-level `categories: {c: {max_running: n}}`
                                 (+c in a splice is local to it, as in DAGMan)
  FINAL name file [DIR d] [NOOP] `final: true` (one proc; not in a splice; no edges, RETRY,
                                 ABORT-DAG-ON, PRIORITY or CATEGORY, as in DAGMan)
  INCLUDE file                   read in place, in the same scope
  SPLICE name file [DIR d]       nodes `name+node`; the file and its paths relative to DIR
  ALL_NODES                      as the node of VARS, RETRY, SCRIPT, PRE_SKIP, ABORT-DAG-ON,
                                 PRIORITY, CATEGORY: the file's JOB nodes
Accepted with no effect (pictures, status files and attributes of DAGMan's own job; bgrid's
journal, `bgrid status` and the report tell the same): DOT, NODE_STATUS_FILE, JOBSTATE_LOG,
SET_JOB_ATTR, SAVE_POINT_FILE.
Refused with file, line and construct: JOB ... DONE and DONE (rerun with --resume instead),
VARS values with $(RETRY), SCRIPT DEFER / DEBUG / HOLD, other script macros ($JOBID, ...),
CONFIG, ENV, SUBDAG EXTERNAL (write it as a SPLICE), SERVICE, PROVISIONER,
SUBMIT-DESCRIPTION, CONNECT, PIN_IN, PIN_OUT, REJECT, and any other word.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonjourgrid.dag.condor_submit import SubmitVar, submit_procs
from bonjourgrid.errors import DagError

__all__ = ["dagman_mapping"]

_SPLICE_SEPARATOR = "+"
_ALL_NODES = "ALL_NODES"
_MAX_INCLUDE_DEPTH = 32  # INCLUDE and SPLICE nesting; a loop of includes is an error
# Accepted with no effect (see the module docstring for why).
_HARMLESS = frozenset(
    {"DOT", "NODE_STATUS_FILE", "JOBSTATE_LOG", "SET_JOB_ATTR", "SAVE_POINT_FILE"}
)
_REFUSED = {
    "CONFIG": "a DAGMan configuration changes DAGMan's own knobs; bgrid has none of them",
    "ENV": "it sets DAGMan's own environment; put variables in the submit files' environment",
    "SUBDAG": "a nested DAGMan is not run; write it as SPLICE name file",
    "SERVICE": "a service node runs beside the DAG; bgrid has no such node",
    "PROVISIONER": "a provisioner node is not supported; bgrid recruits its own peers",
    "SUBMIT-DESCRIPTION": "inline submit descriptions are not read; write a .sub file",
    "CONNECT": "splice connections are not supported; use PARENT ... CHILD ...",
    "PIN_IN": "splice pins are not supported; use PARENT ... CHILD ...",
    "PIN_OUT": "splice pins are not supported; use PARENT ... CHILD ...",
    "REJECT": "the DAG file marks itself as not to be run",
    "DONE": "a node marked done is not supported; rerun with `bgrid submit --resume`, which "
    "skips the tasks that are done",
}
_SECOND_PASS = frozenset(
    {"PARENT", "VARS", "RETRY", "SCRIPT", "PRE_SKIP", "ABORT-DAG-ON", "PRIORITY", "CATEGORY",
     "MAXJOBS"}
)  # fmt: skip
# DAGMan's script macros -> what the shell gets (None: the node's own value, filled in).
_SCRIPT_MACROS: dict[str, str | None] = {
    "JOB": None,
    "MAX_RETRIES": None,
    "RETRY": '"$BGRID_RETRY"',
    "RETURN": '"$BGRID_RETURN"',
    "PRE_SCRIPT_RETURN": '"$BGRID_PRE_RETURN"',
    "DAG_STATUS": '"$BGRID_DAG_STATUS"',
    "FAILED_COUNT": '"$BGRID_FAILED_COUNT"',
}
_NOT_ON_FINAL = frozenset({"RETRY", "ABORT-DAG-ON", "PRIORITY", "CATEGORY"})  # as DAGMan
_OTHER_SCRIPT_MACROS = frozenset(
    {"JOBID", "CLUSTERID", "JOB_COUNT", "SUCCESS", "NODE_COUNT", "QUEUED_COUNT", "DONE_COUNT",
     "FUTILE_COUNT", "JOB_ABORT_COUNT"}
)  # fmt: skip
_SCRIPT_MACRO = re.compile(r"\$([A-Z_]+)")
_VAR = re.compile(r'\s*([A-Za-z_+][\w.+]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, command) as DAGMan's reader gives them: blank lines and `#`
    comment lines skipped, a line ending in a backslash continued on the next (a comment
    line inside a continued command is skipped and does not end it)."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        joined = " ".join(pending).strip()
        pending = []
        if joined:
            yield start, joined
    if pending and " ".join(pending).strip():
        yield start, " ".join(pending).strip()


@dataclass
class _Node:
    name: str  # full name, splice prefixes included
    where: str  # file:line of its JOB line
    submit: Path | None  # None for NOOP
    directory: Path
    final: bool = False
    variables: list[SubmitVar] = field(default_factory=list)
    parents: dict[str, None] = field(default_factory=dict)  # node names, ordered
    keys: dict[str, Any] = field(default_factory=dict)  # native keys from DAG commands
    scripts: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # PRE/POST


@dataclass
class _Scope:
    """A DAG file and its INCLUDEs: node names are local to it; a splice is a nested scope."""

    prefix: str
    nodes: dict[str, _Node] = field(default_factory=dict)  # local name -> node
    splices: dict[str, _Scope] = field(default_factory=dict)
    own: list[str] = field(default_factory=list)  # JOB nodes, for ALL_NODES

    def all_nodes(self) -> list[_Node]:
        found = list(self.nodes.values())
        for splice in self.splices.values():
            found.extend(splice.all_nodes())
        return found


class _Reader:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.categories: dict[str, dict[str, int]] = {}
        self.finals: list[_Node] = []
        self.names: dict[str, str] = {}  # full node name -> where it was defined

    def where(self, path: Path, line: int) -> str:
        shown = os.path.relpath(path, self.root) if path.is_relative_to(self.root) else path
        return f"{shown}:{line}"

    def fail(self, path: Path, line: int, construct: str, message: str) -> DagError:
        return DagError(f"{self.where(path, line)}: {construct}: {message}")

    def read(self, path: Path, scope: _Scope, base: Path, depth: int = 0) -> None:
        """Reads one DAG file into `scope`; its relative paths start from `base`."""
        lines = self._lines(path, depth)
        second: list[tuple[int, list[str]]] = []
        for number, words in lines:
            keyword = words[0].upper()
            if keyword in ("JOB", "FINAL"):
                self._job(path, number, words, scope, base)
            elif keyword == "SPLICE":
                self._splice(path, number, words, scope, base, depth)
            elif keyword == "INCLUDE":
                if len(words) != 2:
                    raise self.fail(path, number, "INCLUDE", "write INCLUDE file")
                self.read(self._file(base, words[1]), scope, base, depth + 1)
            elif keyword in _SECOND_PASS:
                second.append((number, words))
            elif keyword in _HARMLESS:
                continue
            elif keyword in _REFUSED:
                raise self.fail(path, number, keyword, f"not supported: {_REFUSED[keyword]}")
            else:
                raise self.fail(path, number, words[0], "not a DAGMan command bgrid knows")
        for number, words in second:
            self._command(path, number, words, scope)

    def _lines(self, path: Path, depth: int) -> list[tuple[int, list[str]]]:
        if depth > _MAX_INCLUDE_DEPTH:
            raise DagError(
                f"{path}: INCLUDE/SPLICE nested over {_MAX_INCLUDE_DEPTH} deep (a loop?)"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DagError(f"{path}: no such DAG file; check the path") from None
        except (OSError, UnicodeDecodeError) as err:
            raise DagError(f"{path}: cannot read the DAG file: {err}") from None
        lines = []
        for number, line in _logical_lines(text):
            keyword = line.split()[0].upper()
            if keyword in ("VARS", "SCRIPT"):
                lines.append((number, [*line.split(None, 2)]))  # values keep their spaces
            else:
                lines.append((number, line.split()))
        return lines

    def _file(self, base: Path, name: str) -> Path:
        return Path(os.path.normpath(base / name))

    def _job(self, path: Path, number: int, words: list[str], scope: _Scope, base: Path) -> None:
        keyword = words[0].upper()
        if len(words) < 3:
            raise self.fail(path, number, keyword, f"write {keyword} name submit-file [DIR d]")
        local, submit_name, options = words[1], words[2], words[3:]
        directory, noop = base, False
        i = 0
        while i < len(options):
            option = options[i].upper()
            if option == "DIR" and i + 1 < len(options):
                directory = self._file(base, options[i + 1])
                i += 2
                continue
            if option == "NOOP":
                noop = True
            elif option == "DONE":
                raise self.fail(
                    path, number, f"{keyword} ... DONE",
                    "a node marked done is not supported; run the DAG and use "
                    "`bgrid submit --resume` to skip finished tasks",
                )  # fmt: skip
            else:
                raise self.fail(path, number, f"{keyword} option {options[i]}", "not supported")
            i += 1
        if local.upper() in ("PARENT", "CHILD", _ALL_NODES) or _SPLICE_SEPARATOR in local:
            raise self.fail(path, number, keyword, f"{local!r} cannot name a node")
        full = scope.prefix + local
        if full in self.names:
            raise self.fail(
                path, number, keyword, f"node {full!r} is already defined at {self.names[full]}"
            )
        where = self.where(path, number)
        self.names[full] = where
        try:
            directory.relative_to(self.root)
        except ValueError:
            raise self.fail(path, number, f"{keyword} DIR", "leaves the DAG's directory") from None
        node = _Node(full, where, None if noop else self._file(directory, submit_name), directory)
        if keyword == "FINAL":
            if scope.prefix:
                raise self.fail(path, number, "FINAL", "a splice cannot have a FINAL node")
            if self.finals:
                raise self.fail(
                    path, number, "FINAL", f"a second FINAL node ({self.finals[0].where})"
                )
            node.final = True
            self.finals.append(node)
        else:
            scope.own.append(local)
        if noop:
            node.keys["noop"] = True
        scope.nodes[local] = node

    def _splice(
        self, path: Path, number: int, words: list[str], scope: _Scope, base: Path, depth: int
    ) -> None:
        if len(words) not in (3, 5) or (len(words) == 5 and words[3].upper() != "DIR"):
            raise self.fail(path, number, "SPLICE", "write SPLICE name file [DIR directory]")
        name = words[1]
        if name in scope.splices or name in scope.nodes:
            raise self.fail(path, number, "SPLICE", f"{name!r} is already defined")
        splice_base = self._file(base, words[4]) if len(words) == 5 else base
        inner = _Scope(prefix=f"{scope.prefix}{name}{_SPLICE_SEPARATOR}")
        self.read(self._file(splice_base, words[2]), inner, splice_base, depth + 1)
        scope.splices[name] = inner

    # -- the commands that name nodes ----------------------------------------------------------

    def _targets(
        self, path: Path, number: int, keyword: str, name: str, scope: _Scope
    ) -> list[_Node]:
        if name == _ALL_NODES:
            return [scope.nodes[local] for local in scope.own]
        node = scope.nodes.get(name)
        if node is None:
            raise self.fail(path, number, keyword, f"no node named {name!r} in this DAG")
        return [node]

    def _number(self, path: Path, number: int, keyword: str, text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise self.fail(path, number, keyword, f"{text!r} is not a whole number") from None

    def _command(self, path: Path, number: int, words: list[str], scope: _Scope) -> None:
        keyword = words[0].upper()
        if keyword == "PARENT":
            self._edges(path, number, words, scope)
            return
        if keyword == "MAXJOBS":
            if len(words) != 3:
                raise self.fail(path, number, keyword, "write MAXJOBS category count")
            limit = self._number(path, number, keyword, words[2])
            self.categories[self._category(scope, words[1])] = {"max_running": limit}
            return
        if keyword == "SCRIPT":
            self._script(path, number, words, scope)
            return
        if len(words) < 2:
            raise self.fail(path, number, keyword, "names no node")
        nodes = self._targets(path, number, keyword, words[1], scope)
        if keyword == "VARS":
            variables = self._vars(path, number, words[2] if len(words) > 2 else "")
            for node in nodes:
                node.variables.extend(
                    SubmitVar(
                        var.name, var.value.replace("$(JOB)", node.name), var.prepend, var.where
                    )
                    for var in variables
                )
            return
        rest = words[2:]
        if keyword in _NOT_ON_FINAL and any(node.final for node in nodes):
            raise self.fail(path, number, keyword, "DAGMan does not allow it on the FINAL node")
        for node in nodes:
            if keyword == "RETRY":
                self._retry(path, number, rest, node)
            elif keyword == "PRE_SKIP" and len(rest) == 1:
                node.keys["pre_skip"] = self._number(path, number, keyword, rest[0])
            elif keyword == "PRIORITY" and len(rest) == 1:
                node.keys["priority"] = self._number(path, number, keyword, rest[0])
            elif keyword == "CATEGORY" and len(rest) == 1:
                node.keys["category"] = self._category(scope, rest[0])
            elif keyword == "ABORT-DAG-ON" and len(rest) in (1, 3):
                abort = {"exit": self._number(path, number, keyword, rest[0])}
                if len(rest) == 3:
                    if rest[1].upper() != "RETURN":
                        raise self.fail(path, number, keyword, "write ABORT-DAG-ON node v RETURN s")
                    abort["status"] = self._number(path, number, keyword, rest[2])
                    if not 0 <= abort["status"] <= 255:
                        raise self.fail(path, number, keyword, "RETURN must be within 0..255")
                node.keys["abort_on"] = abort
            else:
                raise self.fail(path, number, keyword, "wrong number of values for this command")

    def _category(self, scope: _Scope, name: str) -> str:
        # DAGMan: a category named +NAME inside a splice is local to that splice
        if name.startswith(_SPLICE_SEPARATOR):
            return scope.prefix + name[1:]
        return name

    def _retry(self, path: Path, number: int, rest: list[str], node: _Node) -> None:
        if len(rest) not in (1, 3) or (len(rest) == 3 and rest[1].upper() != "UNLESS-EXIT"):
            raise self.fail(path, number, "RETRY", "write RETRY node count [UNLESS-EXIT value]")
        node.keys["retries"] = self._number(path, number, "RETRY", rest[0])
        if node.keys["retries"] < 0:
            raise self.fail(path, number, "RETRY", "a retry count cannot be negative")
        unless = self._number(path, number, "RETRY", rest[2]) if len(rest) == 3 else 0
        if unless:  # DAGMan reads UNLESS-EXIT 0 as no such value
            node.keys["retry_unless_exit"] = unless
        else:
            node.keys.pop("retry_unless_exit", None)

    def _edges(self, path: Path, number: int, words: list[str], scope: _Scope) -> None:
        upper = [word.upper() for word in words]
        if "CHILD" not in upper or upper.index("CHILD") in (1, len(words) - 1):
            raise self.fail(path, number, "PARENT", "write PARENT p1 p2 ... CHILD c1 c2 ...")
        split = upper.index("CHILD")
        parents = [
            node
            for name in words[1:split]
            for node in self._ends(path, number, name, scope, last=True)
        ]
        children = [
            node
            for name in words[split + 1 :]
            for node in self._ends(path, number, name, scope, last=False)
        ]
        for child in children:
            if child.final or any(parent.final for parent in parents):
                raise self.fail(path, number, "PARENT", "a FINAL node cannot have edges")
            child.parents.update(dict.fromkeys(parent.name for parent in parents))

    def _ends(self, path: Path, number: int, name: str, scope: _Scope, last: bool) -> list[_Node]:
        """A node, or a splice's last nodes (as a parent) or first nodes (as a child)."""
        if name in scope.nodes:
            return [scope.nodes[name]]
        splice = scope.splices.get(name)
        if splice is None:
            raise self.fail(path, number, "PARENT", f"no node or splice named {name!r} in this DAG")
        nodes = splice.all_nodes()
        inside = {node.name for node in nodes}  # edges from outside the splice do not count
        if last:
            has_child = {parent for node in nodes for parent in node.parents} & inside
            return [node for node in nodes if node.name not in has_child]
        return [node for node in nodes if inside.isdisjoint(node.parents)]

    def _vars(self, path: Path, number: int, text: str) -> list[SubmitVar]:
        prepend = True  # DAGMan's default (DAGMAN_DEFAULT_APPEND_VARS = False)
        first, _, rest = text.partition(" ")
        if first.upper() in ("PREPEND", "APPEND"):
            prepend, text = first.upper() == "PREPEND", rest
        variables = []
        position = 0
        while text[position:].strip():
            match = _VAR.match(text, position)
            if match is None:
                raise self.fail(
                    path, number, "VARS", f'expected name="value" at {text[position:]!r}'
                )
            name, value = match.group(1), re.sub(r"\\(.)", r"\1", match.group(2))
            if "$(RETRY)" in value:
                raise self.fail(
                    path, number, "VARS $(RETRY)", "a value cannot change per retry here"
                )
            if name.lower().startswith("queue"):
                raise self.fail(
                    path, number, "VARS", f"{name!r}: names starting with queue are reserved"
                )
            variables.append(SubmitVar(name, value, prepend, self.where(path, number)))
            position = match.end()
        if not variables:
            raise self.fail(path, number, "VARS", 'write VARS node name="value" ...')
        return variables

    def _script(self, path: Path, number: int, words: list[str], scope: _Scope) -> None:
        parts = (words[1] + " " + words[2]).split() if len(words) == 3 else []
        if parts and parts[0].upper() in ("DEFER", "DEBUG"):
            raise self.fail(path, number, f"SCRIPT {parts[0].upper()}", "not supported; remove it")
        if len(parts) < 3 or parts[0].upper() not in ("PRE", "POST", "HOLD"):
            raise self.fail(path, number, "SCRIPT", "write SCRIPT PRE|POST node executable [args]")
        when = parts[0].upper()
        if when == "HOLD":
            raise self.fail(path, number, "SCRIPT HOLD", "bgrid never holds a job")
        for node in self._targets(path, number, f"SCRIPT {when}", parts[1], scope):
            node.scripts[when.lower()] = (self.where(path, number), parts[2:])


# -- from nodes to the native mapping --------------------------------------------------------


def _script_command(words: list[str], node: _Node, where: str) -> str:
    """A DAGMan script line as a shell command: words quoted, macros as the BGRID_* env."""
    if "/" not in words[0]:  # DAGMan runs the script by its path, never looked up in PATH
        words = ["./" + words[0], *words[1:]]
    pieces = []
    for word in words:
        out, last = [], 0
        for match in _SCRIPT_MACRO.finditer(word):
            macro = match.group(1)
            if macro in _OTHER_SCRIPT_MACROS:
                raise DagError(f"{where}: SCRIPT ${macro}: this script macro is not supported")
            if macro not in _SCRIPT_MACROS:
                continue
            out.append(shlex.quote(word[last : match.start()]) if match.start() > last else "")
            replacement = _SCRIPT_MACROS[macro]
            if replacement is None:
                value = node.name if macro == "JOB" else str(node.keys.get("retries", 0))
                replacement = shlex.quote(value)
            out.append(replacement)
            last = match.end()
        if last < len(word) or not out:
            out.append(shlex.quote(word[last:]))
        pieces.append("".join(out))
    return " ".join(pieces)


def _tasks_of(node: _Node, root: Path) -> dict[str, dict[str, Any]]:
    base: dict[str, Any] = dict(node.keys)
    if node.final:
        base["final"] = True
    directory = node.directory.relative_to(root).as_posix()
    for when, (where, words) in node.scripts.items():
        base[when] = _script_command(words, node, where)
        if directory != ".":
            base["script_dir"] = directory
    if node.submit is None:
        return {node.name: base}
    procs = submit_procs(node.submit, root, node.directory, node.variables, node.where, node.name)
    if len(procs) > 1 and (node.scripts or node.final or "pre_skip" in node.keys):
        raise DagError(
            f"{node.where}: JOB {node.name}: its submit file queues {len(procs)} procs; "
            "SCRIPT, PRE_SKIP and FINAL need a node of one proc (split the cluster into nodes)"
        )
    tasks = {}
    for index, proc in enumerate(procs):
        task: dict[str, Any] = {"command": proc.command, **base}
        for key, value in (
            ("inputs", proc.inputs), ("outputs", proc.outputs), ("env", proc.env),
            ("require", proc.require), ("stdout", proc.stdout), ("stderr", proc.stderr),
        ):  # fmt: skip
            if value:
                task[key] = value
        tasks[node.name if len(procs) == 1 else f"{node.name}.{index}"] = task
    return tasks


def dagman_mapping(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The native workflow mapping of a DAGMan file, and its submit directory (the DAG's)."""
    path = Path(path).resolve()
    root = path.parent
    reader = _Reader(root)
    top = _Scope(prefix="")
    reader.read(path, top, root)
    nodes = top.all_nodes()
    tasks_of = {node.name: _tasks_of(node, root) for node in nodes}
    tasks: dict[str, dict[str, Any]] = {}
    for node in nodes:
        after = [task for parent in node.parents for task in tasks_of[parent]]
        for name, task in tasks_of[node.name].items():
            if name in tasks:
                raise DagError(f"{node.where}: JOB {node.name}: task name {name!r} is taken twice")
            if after:
                task["after"] = after
            tasks[name] = task
    mapping: dict[str, Any] = {"tasks": tasks}
    # DAGMan lets MAXJOBS name a category no node is in; the native loader would refuse it
    # as a likely typo, so only the categories in use are carried over.
    used = {task["category"] for task in tasks.values() if "category" in task}
    categories = {name: limit for name, limit in reader.categories.items() if name in used}
    if categories:
        mapping["categories"] = categories
    return mapping, root
