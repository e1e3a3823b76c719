"""One DAGMan node's HTCondor submit description as bgrid tasks: one per proc of its cluster.

The submit file is read by HTCondor's own bindings (`htcondor2.Submit`): its keys, its macro
expansion (`Submit.expand`, with the node's VARS, the item data, $(Process) and DAGMan's $(JOB) set
as macros; $(Cluster) is 1: no schedd numbers the cluster)
and its queue statement (`getQArgs`, `itemdata`). None of that needs a schedd. The bindings
keep no line numbers, so a light scan of the text finds the line of each key for messages,
and refuses what is not a `key = value`, a comment or the one `queue` statement.

The path model. The DAG's directory is the submit directory (the workflow root). As with
condor_submit run by DAGMan, the node's DIR is the submitting directory: `executable` is
relative to it, `initialdir` too, and the job's files (`transfer_input_files`, `input`,
`output`, `error`, `log`) are relative to the initialdir. HTCondor runs the job in an empty
scratch directory holding its inputs by basename, and brings `transfer_output_files` back
to the initialdir by basename. Here the task's sandbox mirrors the submit directory: every
input sits at its path there, and the command
  1. enters the initialdir (`cd`), where each output's basename is its declared path;
  2. links each input there by its basename when it lives elsewhere (a symlink);
  3. copies a transferred executable to `condor_exec.exe` (HTCondor's own name) and makes
     the copy executable: a staged file is a read-only copy without its exec bit, and the
     cache's entry is never touched. With `transfer_executable = false` the absolute path
     runs as it is on the peer (a system tool such as /bin/echo);
  4. runs it with the arguments (quoted for /bin/sh, never expanded by it), stdin from
     `input`; an output named with a directory (`sub/x`) is moved to its basename after.

Submit keys (case does not matter). Supported:
  executable, transfer_executable  as above; an absolute path outside the DAG's directory
                                   needs transfer_executable = false (it then runs in place)
  arguments                old syntax (whitespace-split, \\" a quote) and new syntax (inside
                           double quotes: '...' groups, '' and "" escape)
  environment              old (A=1;B=2) and new ("A=1 B='x y'") syntax -> the task's env
  transfer_input_files     comma-separated files; a URL becomes a URL input; a directory
                           (trailing /) is refused
  transfer_output_files    comma-separated; each comes back as initialdir/basename. Unset: no
                           file comes back but output/error (bgrid moves declared files only)
  should_transfer_files    YES or IF_NEEDED; NO (a shared file system) is refused
  when_to_transfer_output  ON_EXIT or ON_SUCCESS; ON_EXIT_OR_EVICT is refused
  initialdir               relative to the node's DIR, inside the DAG's directory
  output, error            the task's stdout/stderr keys (copied there when it ends)
  input                    staged, and fed to stdin
  log                      accepted: the job's journal is the event log
  request_cpus, request_memory, request_disk   the task's `require` (cpus>=N, ram>=MiB,
                           disk>=MiB; a bare request_memory is MiB, a bare request_disk KiB)
  universe                 vanilla only
  queue                    queue [N]; queue [N] x,y in (...); queue ... from FILE or from (...);
                           queue ... matching PATTERN. N procs (N > 1) are N tasks.
                           `from COMMAND |` is refused: it would run a command while reading.
Accepted with no effect (mail, labels and ClassAd attributes a schedd would use):
  notification, notify_user, batch_name, description, accounting_group,
  accounting_group_user, stream_output, stream_error, +Attr, MY.Attr;
  and any key used as a macro ($(key)) elsewhere in the file: a user's macro.
Refused with file, line and key: DAGMan's per-run macros $(RETRY), $(DAG_STATUS) and
$(FAILED_COUNT) in a submit file; a VARS name the file neither uses as $(name) nor is a key
above; anything else (requirements, rank, getenv, on_exit_*,
periodic_*, request_gpus, max_retries, ...); statements other than `key = value` and one
`queue` (include, if, ...); keys after the queue statement; a second queue statement.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import htcondor2

from bonjourgrid.dag.urls import is_url
from bonjourgrid.errors import DagError

__all__ = ["CondorProc", "SubmitVar", "parse_arguments", "parse_environment", "submit_procs"]

_SUPPORTED_KEYS = frozenset(
    {
        "executable", "transfer_executable", "arguments", "environment",
        "transfer_input_files", "transfer_output_files", "should_transfer_files",
        "when_to_transfer_output", "initialdir", "output", "error", "input", "log",
        "request_cpus", "request_memory", "request_disk", "universe",
    }
)  # fmt: skip
# What to write instead of a refused key that users often have.
_REFUSED_KEY_HINTS = {
    "requirements": "peers are matched on request_cpus, request_memory and request_disk",
    "getenv": "name the variables the job needs in `environment`",
    "preserve_relative_paths": "bgrid brings outputs back by basename, as HTCondor's default",
    "max_retries": "write RETRY node N in the DAG file",
    "priority": "write PRIORITY node N in the DAG file",
}
# Accepted with no effect: they ask a schedd for mail, labels or ClassAd attributes.
_HARMLESS_KEYS = frozenset(
    {
        "notification", "notify_user", "batch_name", "description", "accounting_group",
        "accounting_group_user", "stream_output", "stream_error",
    }
)  # fmt: skip
_KEY_LINE = re.compile(r"\s*([A-Za-z_+][\w.+-]*)\s*=(.*)\Z", re.DOTALL)
_QUEUE_LINE = re.compile(r"\s*queue\b(.*)\Z", re.IGNORECASE | re.DOTALL)
# `queue [N] [vars] from [slice] FILE` and `queue [N] [vars] matching [files|dirs] PATTERN...`:
# the variables are words and commas, so an `in (...)` list holding those words is not one
_QUEUE_FROM_FILE = re.compile(
    r"(\s*(?:\d+\s+)?[\w\s,]*?\bfrom\s+(?:\[[^\]]*\]\s*)?)([^(\s].*)\Z", re.IGNORECASE
)
_QUEUE_MATCHING = re.compile(
    r"(\s*(?:\d+\s+)?[\w\s,]*?\bmatching\s+(?:(?:files|dirs)\s+)?)(.+)\Z", re.IGNORECASE
)
_MACRO_USE = re.compile(r"\$\(([A-Za-z_][\w.]*)")
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*\Z", re.IGNORECASE)
_UNIT_BYTES = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
# DAGMan's macros that change from one run of a node to the next (and $(JOB), which does not)
_PER_RUN_MACROS = ("retry", "dag_status", "failed_count")
EXEC_COPY = "condor_exec.exe"  # HTCondor's name for the job's transferred executable
_BLANKS = " \t"  # what separates arguments for HTCondor (not every Unicode space)


@dataclass(frozen=True)
class SubmitVar:
    """One DAGMan VARS macro; `prepend` ones are defaults the submit file may override."""

    name: str
    value: str
    prepend: bool = True
    where: str = ""  # the VARS line, file:line


@dataclass(frozen=True)
class CondorProc:
    """One proc of a node's cluster as a task's parts; paths relative to the DAG's directory."""

    command: str
    inputs: list[str | dict[str, str]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    require: str | None = None
    stdout: str | None = None
    stderr: str | None = None


@dataclass
class _Scan:
    """What the text scan found: each key's line (lower-case key), the queue line, macros used."""

    lines: dict[str, int] = field(default_factory=dict)
    queue_line: int | None = None
    used_macros: dict[str, int] = field(default_factory=dict)  # lower-case name -> first line


def _fail(where: str, line: int | None, construct: str, message: str) -> DagError:
    return DagError(f"{where}:{line if line is not None else 1}: {construct}: {message}")


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) with backslash continuations joined."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        if raw.rstrip().endswith("\\") and not raw.lstrip().startswith("#"):
            pending.append(raw.rstrip()[:-1])
            continue
        pending.append(raw)
        yield start, " ".join(pending)
        pending = []
    if pending:
        yield start, " ".join(pending)


def _scan(text: str, where: str) -> _Scan:
    scan = _Scan()
    inline_items = False  # inside `queue ... from (` ... `)`
    for number, line in _logical_lines(text):
        stripped = line.strip()
        if inline_items:
            inline_items = stripped != ")"
            continue
        if not stripped or stripped.startswith("#"):
            continue
        if queue := _QUEUE_LINE.match(line):
            if scan.queue_line is not None:
                raise _fail(
                    where, number, "queue",
                    f"a second queue statement (the first is on line {scan.queue_line}); "
                    "a DAG node is one cluster: give each cluster its own node",
                )  # fmt: skip
            scan.queue_line = number
            inline_items = queue.group(1).rstrip().endswith("(")
            continue
        key = _KEY_LINE.match(line)
        if key is None:
            word = stripped.split()[0]
            raise _fail(
                where, number, word,
                "not a `key = value` line, a comment or a queue statement; "
                "bgrid reads no submit-file statements (include, if, ...): write the keys out",
            )  # fmt: skip
        if scan.queue_line is not None:
            raise _fail(
                where, number, key.group(1),
                "a key after the queue statement would start a second cluster; "
                "move it before `queue`",
            )  # fmt: skip
        scan.lines.setdefault(key.group(1).lower(), number)
        for name in _MACRO_USE.findall(key.group(2)):
            scan.used_macros.setdefault(name.lower(), number)
    return scan


def _check_keys(scan: _Scan, where: str) -> None:
    for key, line in scan.lines.items():
        if (
            key in _SUPPORTED_KEYS
            or key in _HARMLESS_KEYS
            or key.startswith(("+", "my."))
            or key in scan.used_macros
        ):
            continue
        hint = _REFUSED_KEY_HINTS.get(key, "remove it")
        raise _fail(
            where, line, key,
            "this submit key is not supported by bgrid (the supported keys are listed "
            f"in bonjourgrid/dag/condor_submit.py and the README); {hint}",
        )  # fmt: skip


# -- arguments and environment --------------------------------------------------------------


def _split_new_syntax(text: str) -> list[str]:
    """Words of HTCondor's new syntax (inside the outer double quotes): whitespace separates,
    single quotes group, '' is a quote inside them, "" is a double quote anywhere."""
    words: list[str] = []
    word: list[str] = []
    in_word = quoted = False
    i = 0
    while i < len(text):
        char = text[i]
        if char == '"':
            if text[i + 1 : i + 2] != '"':
                raise ValueError('a lone double quote; write "" for a double quote')
            word.append('"')
            in_word = True
            i += 2
            continue
        if char == "'":
            if quoted and text[i + 1 : i + 2] == "'":
                word.append("'")
                i += 2
                continue
            quoted = not quoted
            in_word = True
        elif char in _BLANKS and not quoted:
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
        else:
            word.append(char)
            in_word = True
        i += 1
    if quoted:
        raise ValueError("a single quote is not closed")
    if in_word:
        words.append("".join(word))
    return words


def _new_syntax(value: str) -> str | None:
    """The text inside the outer double quotes when `value` uses the new syntax."""
    stripped = value.strip()
    if len(stripped) >= 2 and stripped[0] == '"' and stripped[-1] == '"':
        return stripped[1:-1]
    return None


def parse_arguments(value: str) -> list[str]:
    """argv from an `arguments` value, old or new syntax; ValueError when malformed."""
    inner = _new_syntax(value)
    if inner is not None:
        return _split_new_syntax(inner)
    if '"' in value.replace('\\"', ""):
        raise ValueError('the old syntax writes a double quote as \\"; or quote the whole value')
    words = re.split(f"[{_BLANKS}]+", value.replace('\\"', "\0").strip(_BLANKS))
    return [word.replace("\0", '"') for word in words if word]


def parse_environment(value: str) -> dict[str, str]:
    """NAME -> value from an `environment` value, old (`A=1;B=2`) or new syntax."""
    inner = _new_syntax(value)
    items = _split_new_syntax(inner) if inner is not None else value.split(";")
    env: dict[str, str] = {}
    for item in items:
        if not item.strip():
            continue
        name, equals, setting = (item.strip() if inner is None else item).partition("=")
        if not equals or not name:
            raise ValueError(f"{item!r} is not NAME=value")
        env[name] = setting
    return env


# -- the procs ------------------------------------------------------------------------------


def _size_mib(value: str, default_unit: int) -> int:
    """Whole MiB (rounded up) in an HTCondor request size; a bare number is in default_unit B."""
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(
            "write a number with an optional unit (K, M, G, T); expressions are not read"
        )
    unit = _UNIT_BYTES.get(match.group(2).upper(), default_unit)
    return max(1, math.ceil(float(match.group(1)) * unit / _UNIT_BYTES["M"]))


def _bool(value: str) -> bool | None:
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "t", "y", "1"):
        return True
    if lowered in ("false", "no", "f", "n", "0"):
        return False
    return None


class _Paths:
    """Submit-side paths to the workflow's relative paths; refuses what leaves the root."""

    def __init__(self, root: Path, where: str, scan: _Scan) -> None:
        self.root = root
        self.where = where
        self.scan = scan

    def inside(self, full: Path, path: str, key: str) -> PurePosixPath:
        """`full` relative to the root ('.' for the root itself), or refused."""
        try:
            return PurePosixPath(Path(os.path.normpath(full)).relative_to(self.root).as_posix())
        except ValueError:
            raise _fail(
                self.where, self.scan.lines.get(key), key,
                f"{path!r} is outside the DAG's directory {self.root}; "
                "bgrid stages only files under it",
            ) from None  # fmt: skip

    def relative(self, base: Path, path: str, key: str) -> str:
        """The file `path` (relative to `base`) as a workflow path."""
        rel = self.inside(base / path, path, key)
        if str(rel) == ".":
            raise _fail(self.where, self.scan.lines.get(key), key, f"{path!r} names a directory")
        return str(rel)


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _queue_args(submit: htcondor2.Submit, directory: Path, where: str, line: int | None) -> bool:
    """Makes `from FILE` and `matching PATTERN` read relative to the submitting directory;
    True for `matching` (whose items then come back as absolute paths)."""
    args = submit.getQArgs() or ""
    if args.rstrip().endswith("|"):
        raise _fail(
            where, line, "queue ... from command |",
            "item data from a command would run that command while the DAG is read; "
            "write the items into a file and `queue ... from FILE`",
        )  # fmt: skip
    if match := _QUEUE_FROM_FILE.match(args):
        submit.setQArgs(match.group(1) + str(directory / match.group(2).strip()))
    elif match := _QUEUE_MATCHING.match(args):
        patterns = " ".join(str(directory / word) for word in match.group(2).split())
        submit.setQArgs(match.group(1) + patterns)
        return True
    return False


def _procs_macros(
    submit: htcondor2.Submit, directory: Path, where: str, line: int | None
) -> list[dict[str, str]]:
    """The macros that tell each proc apart: $(Process), $(Step), $(ItemIndex), item data."""
    matching = _queue_args(submit, directory, where, line)
    args = submit.getQArgs() or ""
    count_text = re.match(r"\s*(\d+)?", args)
    count = int(count_text.group(1)) if count_text and count_text.group(1) else 1
    try:
        raw_items = submit.itemdata()
    except (ValueError, RuntimeError, OSError) as err:
        raise _fail(where, line, "queue", f"cannot read the item data: {err}") from None
    items: list[dict[str, str]] = (
        [dict(item) for item in raw_items] if raw_items is not None else [{}]
    )
    prefix = str(directory) + os.sep
    if matching:  # the bindings give the absolute paths made above
        items = [
            {k: v[len(prefix) :] if v.startswith(prefix) else v for k, v in item.items()}
            for item in items
        ]
    procs: list[dict[str, str]] = []
    for index, item in enumerate(items):
        for step in range(count):
            process = str(len(procs))
            procs.append(
                {
                    **item,
                    "Process": process,
                    "ProcId": process,
                    "Step": str(step),
                    "ItemIndex": str(index),
                    "Row": str(index),
                }
            )
    if not procs:
        raise _fail(where, line, "queue", "queues no job (no item matched); a node needs one")
    return procs


def submit_procs(
    submit_file: Path,
    root: Path,
    node_dir: Path,
    variables: Sequence[SubmitVar],
    where: str,
    node_name: str,
) -> list[CondorProc]:
    """The procs of the cluster that `submit_file` queues, with the node's VARS as macros."""
    try:
        text = submit_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DagError(f"{where}: cannot read the submit file {submit_file}: {err}") from None
    sub_where = (
        os.path.relpath(submit_file, root) if submit_file.is_relative_to(root) else str(submit_file)
    )
    scan = _scan(text, sub_where)
    _check_keys(scan, sub_where)
    for macro in _PER_RUN_MACROS:
        if macro in scan.used_macros:
            raise _fail(
                sub_where, scan.used_macros[macro], f"$({macro.upper()})",
                "DAGMan sets this macro anew for each run of the node; bgrid reads a submit "
                "file once, so it cannot be used here",
            )  # fmt: skip
    try:
        submit = htcondor2.Submit(text)
    except Exception as err:  # the bindings raise plain Exceptions of several kinds
        raise DagError(f"{sub_where}: HTCondor cannot parse this submit file: {err}") from None
    submit["JOB"] = node_name  # as DAGMan passes it: the node's full name
    for var in variables:
        name = var.name.lower()
        if (
            name not in scan.used_macros
            and name not in _SUPPORTED_KEYS | _HARMLESS_KEYS
            and not name.startswith(("+", "my."))
        ):
            # it could only act as a submit key bgrid does not read: refused, not dropped
            raise DagError(
                f"{var.where}: VARS {var.name}: {sub_where} does not use $({var.name}) and "
                "bgrid does not read it as a submit key; remove it"
            )
        if not var.prepend or name not in scan.lines:
            submit[var.name] = var.value
    proc_macros = _procs_macros(submit, node_dir, sub_where, scan.queue_line)
    paths = _Paths(root, sub_where, scan)
    procs = []
    for macros in proc_macros:
        for name, value in macros.items():
            submit[name] = value
        procs.append(_one_proc(submit, node_dir, paths))
    return procs


class _Keys:
    """One proc's expanded submit values, and refusals that name the key's line."""

    def __init__(self, submit: htcondor2.Submit, paths: _Paths) -> None:
        self.submit = submit
        self.paths = paths

    def value(self, key: str) -> str:
        return str(self.submit.expand(key)).strip() if key in self.paths.scan.lines else ""

    def refuse(self, key: str, message: str) -> DagError:
        return _fail(self.paths.where, self.paths.scan.lines.get(key), key, message)


class _Staging:
    """The command's preparation in the sandbox: enter the initialdir, link inputs there by
    basename (HTCondor's flat scratch directory), copy the executable."""

    def __init__(self, keys: _Keys, initial: Path) -> None:
        self.keys = keys
        self.initial = initial
        self.workdir = str(keys.paths.inside(initial, keys.value("initialdir"), "initialdir"))
        quoted = shlex.quote(self.workdir)
        # the sandbox holds only the task's files: the initialdir may not exist there yet
        self.steps = [] if self.workdir == "." else [f"mkdir -p -- {quoted} && cd -- {quoted}"]
        self.inputs: list[str | dict[str, str]] = []
        self.basenames: dict[str, str] = {}  # basename -> the path it came from

    def stage(self, path_text: str, key: str) -> str:
        """Declares one input; returns its name in the initialdir."""
        name = posixpath.basename(path_text.rstrip("/"))
        if path_text.endswith("/"):
            raise self.keys.refuse(key, f"{path_text!r} is a directory; list the files inside")
        if is_url(path_text):
            self.inputs.append(
                {"url": path_text, "path": posixpath.normpath(f"{self.workdir}/{name}")}
            )
        else:
            rel = self.keys.paths.relative(self.initial, path_text, key)
            self.inputs.append(rel)
            there = posixpath.relpath(rel, self.workdir)
            if there != name:
                self.steps.append(f"ln -sf -- {shlex.quote(there)} {shlex.quote(name)}")
        if self.basenames.setdefault(name, path_text) != path_text:
            raise self.keys.refuse(
                key, f"{path_text!r} and {self.basenames[name]!r} share the basename {name!r}"
            )
        return name

    def executable(self, node_dir: Path) -> str:
        """The program to run, as the shell should name it."""
        keys = self.keys
        executable = keys.value("executable")
        if not executable:
            raise _fail(keys.paths.where, None, "executable", "the submit file names none")
        transfer = _bool(keys.value("transfer_executable") or "true")
        if transfer is None:
            raise keys.refuse("transfer_executable", "write true or false")
        if not transfer:
            if not os.path.isabs(executable):
                raise keys.refuse(
                    "executable",
                    "with transfer_executable = false it must be an absolute path on the peers",
                )
            return shlex.quote(executable)
        if os.path.isabs(executable) and not Path(executable).is_relative_to(keys.paths.root):
            raise keys.refuse(
                "executable",
                f"{executable!r} is outside the DAG's directory; to run the peer's own "
                "program in place, add transfer_executable = false",
            )
        program = keys.paths.relative(node_dir, executable, "executable")  # not initialdir
        self.inputs.append(program)
        there = shlex.quote(posixpath.relpath(program, self.workdir))
        # a staged file has no exec bit: run a private copy, never chmod the staged one
        self.steps.append(f"cp -- {there} {EXEC_COPY} && chmod 700 {EXEC_COPY}")
        return f"./{EXEC_COPY}"


def _check_transfer_mode(keys: _Keys) -> None:
    universe = keys.value("universe").lower()
    if universe not in ("", "vanilla"):
        raise keys.refuse("universe", f"universe {universe!r}: bgrid runs vanilla jobs only")
    if keys.value("should_transfer_files").upper() == "NO":
        raise keys.refuse(
            "should_transfer_files",
            "NO asks for a shared file system, which bgrid peers do not have; use YES",
        )
    when = keys.value("when_to_transfer_output").upper()
    if when not in ("", "ON_EXIT", "ON_SUCCESS"):
        raise keys.refuse("when_to_transfer_output", f"{when} is not supported; use ON_EXIT")


def _one_proc(submit: htcondor2.Submit, node_dir: Path, paths: _Paths) -> CondorProc:
    keys = _Keys(submit, paths)
    _check_transfer_mode(keys)
    initial = Path(os.path.normpath(node_dir / keys.value("initialdir")))
    staging = _Staging(keys, initial)
    for item in _list(keys.value("transfer_input_files")):
        staging.stage(item, "transfer_input_files")
    run = [staging.executable(node_dir)]
    try:
        run.extend(shlex.quote(arg) for arg in parse_arguments(keys.value("arguments")))
    except ValueError as err:
        raise keys.refuse("arguments", str(err)) from None
    try:
        env = parse_environment(keys.value("environment"))
    except ValueError as err:
        raise keys.refuse("environment", str(err)) from None
    stdin = keys.value("input")
    if stdin and stdin != "/dev/null":
        run.append("< " + shlex.quote(staging.stage(stdin, "input")))
    outputs, moves = _outputs(keys, staging)
    command = " ".join(run)
    if moves:  # HTCondor brings sub/x back as x: move it there, keep the job's exit status
        command = f"{command}; rc=$?; {'; '.join(moves)}; exit $rc"
    elif staging.steps:
        command = "exec " + command
    streams = {}
    for key in ("output", "error"):
        path_text = keys.value(key)
        if path_text and path_text != "/dev/null":
            streams[key] = paths.relative(initial, path_text, key)
    return CondorProc(
        command=" && ".join([*staging.steps, command]),
        inputs=staging.inputs,
        outputs=outputs,
        env=env,
        require=_requirement(keys),
        stdout=streams.get("output"),
        stderr=streams.get("error"),
    )


def _outputs(keys: _Keys, staging: _Staging) -> tuple[list[str], list[str]]:
    """The declared outputs (initialdir/basename) and the moves that put them there."""
    outputs: list[str] = []
    moves: list[str] = []
    for item in _list(keys.value("transfer_output_files")):
        name = posixpath.basename(item.rstrip("/"))
        if name in staging.basenames:
            raise keys.refuse("transfer_output_files", f"{item!r} has the basename of an input")
        outputs.append(keys.paths.relative(staging.initial, name, "transfer_output_files"))
        if posixpath.normpath(item) != name:
            moves.append(f"mv -f -- {shlex.quote(item)} {shlex.quote(name)} 2>/dev/null")
    return outputs, moves


def _requirement(keys: _Keys) -> str | None:
    """request_cpus/memory/disk as a requirement expression (requirements.py's language)."""
    clauses = []
    cpus = keys.value("request_cpus")
    if cpus:
        if not cpus.isdigit():
            raise keys.refuse("request_cpus", f"{cpus!r} is not a whole number")
        if int(cpus) > 1:
            clauses.append(f"cpus>={int(cpus)}")
    for key, attribute, unit in (
        ("request_memory", "ram", 1024**2),
        ("request_disk", "disk", 1024),
    ):
        text = keys.value(key)
        if text:
            try:
                clauses.append(f"{attribute}>={_size_mib(text, unit)}")
            except ValueError as err:
                raise keys.refuse(key, f"{text!r}: {err}") from None
    return " and ".join(clauses) or None
