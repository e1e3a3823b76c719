"""What `bgrid submit` shows while it runs: a live display on a terminal, lines in a pipe.

The coordinator feeds a `Display` two things and nothing else: a `Snapshot` (counts, what
each peer runs now, bytes moved, elapsed time) every REFRESH_S from its event loop, and the
`Note`s of the changes worth a line (task started, done, failed or retried; peer joined,
lost or released), which `notes_of` reads off an event and the instructions it gave. The
scheduler never waits for the display: a snapshot costs a few counters and one entry per
peer, and rendering happens at most 1/REFRESH_S times a second whatever the task rate.

Which display (`choose_display`):
- stdout is a terminal: `LiveDisplay`, one rich panel redrawn in place (a bar with
  done/running/failed/total, bytes moved, elapsed and ETA; a table of what each peer runs
  now); peers joining or lost and failed tasks scroll above it.
- stdout is not a terminal (a pipe, a file, CI): `LineDisplay`, plain lines. A workflow of
  up to LINE_PER_TASK_MAX tasks gets one line per change; a bigger one gets one summary line
  every LINE_INTERVAL_S plus the lines of peers and failures (a 100,000-task log of starts
  and ends would bury what matters).
- `--quiet`: nothing but errors and the final summary. `--json`: stdout carries the JSON
  report only; the live display goes to stderr when stderr is a terminal, else nothing.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Protocol

from bonjourgrid.coordinator import model
from bonjourgrid.units import format_size

# rich (some 50 modules) is imported where a live panel is drawn, not by every submit: a
# submit in a pipe or with --quiet reaches its first task that much sooner.
if TYPE_CHECKING:
    from rich.console import Console, RenderableType

REFRESH_S = 0.25  # how often the live display (and the line display's clock) is fed
LINE_PER_TASK_MAX = 100  # tasks; above, the line display writes a summary per interval
LINE_INTERVAL_S = 5.0
MAX_PEER_ROWS = 12  # peers listed in the live display; the others are counted


@dataclass(frozen=True)
class PeerNow:
    name: str
    cpus: int
    running: tuple[str, ...]  # task names, sorted


@dataclass(frozen=True)
class Snapshot:
    """The job as the user sees it, at one moment."""

    job: str
    phase: str
    elapsed_s: float
    total: int
    done: int
    running: int
    failed: int
    skipped: int
    kept: int  # done in an earlier run (--resume): not part of this run's rate
    peers: tuple[PeerNow, ...]
    bytes_moved: int

    @property
    def eta_s(self) -> float | None:
        """Seconds left at this run's pace so far; None before a task ended."""
        ended = self.done - self.kept + self.failed
        left = self.total - self.done - self.failed - self.skipped
        if ended <= 0 or self.elapsed_s <= 0:
            return None
        return left * self.elapsed_s / ended


@dataclass(frozen=True)
class Note:
    """One change worth a line."""

    what: str  # started | done | failed | retry | joined | lost | released
    subject: str  # a task or a peer
    peer: str = ""
    detail: str = ""

    @property
    def about_peer(self) -> bool:
        return self.what in ("joined", "lost", "released")

    def text(self) -> str:
        if self.about_peer:
            return f"peer {self.subject} {self.what}" + (f": {self.detail}" if self.detail else "")
        where = f" on {self.peer}" if self.peer else ""
        return f"task {self.subject} {self.what}{where}" + (
            f": {self.detail}" if self.detail else ""
        )


def notes_of(
    event: model.Event, instructions: Sequence[model.Instruction], tasks: dict[str, model.TaskState]
) -> list[Note]:
    """The notes of one event the core handled and the instructions it gave."""
    notes = []
    match event:
        case model.PeerJoined(peer=peer, cpus=cpus):
            notes.append(Note("joined", peer, detail=f"{cpus} cpu(s)"))
        case model.PeerLost(peer=peer, reason=reason):
            notes.append(Note("lost", peer, detail=reason))
        case model.RunStarted(peer=peer, task=task, attempt=attempt):
            state = tasks.get(task)
            if state is not None and state.acked and state.attempts == attempt:
                notes.append(Note("started", task, peer, _attempt(attempt)))
        case model.TaskReported(peer=peer, task=task, exit_code=code, error=error) if (
            code != 0 or error
        ):
            state = tasks.get(task)
            if state is not None and state.script != "post" and state.status in _AGAIN:
                notes.append(Note("retry", task, peer, error or f"exit code {code}"))
        case model.ScriptEnded(task=task, script=script, exit_code=code, error=error) if (
            code != 0 or error
        ):
            state = tasks.get(task)  # a pre_skip is done: its TaskDone says so
            if state is not None and state.status in _AGAIN:
                notes.append(Note("retry", task, "", error or f"{script} script exited {code}"))
    for instruction in instructions:
        match instruction:
            case model.TaskDone(task=task, peer=done_on):
                if not tasks[task].resumed:
                    notes.append(Note("done", task, done_on or ""))
            case model.TaskFailed(task=task, error=error, attempts=attempts):
                notes.append(Note("failed", task, detail=f"{error} ({attempts} attempt(s))"))
            case model.Release(peer=peer):
                notes.append(Note("released", peer))
    return notes


_AGAIN = (model.TaskStatus.READY, model.TaskStatus.WAITING)  # a failed attempt, retried


def _attempt(attempt: int) -> str:
    return "" if attempt == 1 else f"attempt {attempt}"


class Display(Protocol):
    def start(self) -> None: ...

    def note(self, note: Note, snapshot: Snapshot) -> None: ...

    def update(self, snapshot: Snapshot) -> None: ...

    def stop(self) -> None: ...


def choose_display(quiet: bool, json: bool) -> Display | None:
    """The display for this terminal and these flags (the module's docstring says which)."""
    if quiet:
        return None
    if json:
        return LiveDisplay(sys.stderr) if sys.stderr.isatty() else None
    return LiveDisplay(sys.stdout) if sys.stdout.isatty() else LineDisplay(sys.stdout)


def _clock(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _counts(s: Snapshot) -> str:
    return (
        f"{s.done}/{s.total} done, {s.running} running, {s.failed} failed"
        + (f", {s.skipped} skipped" if s.skipped else "")
        + f"; {len(s.peers)} peer(s); {format_size(s.bytes_moved)} moved"
    )


class LineDisplay:
    """Plain lines, for a pipe or a file: `[  12.3s] task t1 done on w0 (3/200 done)`."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._last_line_s = 0.0
        self._per_task = True

    def start(self) -> None:
        pass

    def _write(self, at_s: float, text: str) -> None:
        try:
            self.stream.write(f"[{at_s:7.1f}s] {text}\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not stop the job
            pass

    def note(self, note: Note, snapshot: Snapshot) -> None:
        self._per_task = snapshot.total <= LINE_PER_TASK_MAX
        if not self._per_task and note.what in ("started", "done", "retry"):
            return  # a big run: its summary lines say it
        text = note.text()
        if note.what == "done":
            text += f" ({snapshot.done}/{snapshot.total} done)"
        self._write(snapshot.elapsed_s, text)

    def update(self, snapshot: Snapshot) -> None:
        self._per_task = snapshot.total <= LINE_PER_TASK_MAX
        if self._per_task or snapshot.elapsed_s - self._last_line_s < LINE_INTERVAL_S:
            return
        self._last_line_s = snapshot.elapsed_s
        eta = snapshot.eta_s
        self._write(
            snapshot.elapsed_s,
            _counts(snapshot) + (f"; ETA {_clock(eta)}" if eta is not None else ""),
        )

    def stop(self) -> None:
        pass


class LiveDisplay:
    """One rich panel redrawn in place; notes of peers and failures scroll above it."""

    def __init__(self, stream: IO[str]) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self.console = Console(file=stream)
        self.live = Live(
            Text(""),
            console=self.console,
            auto_refresh=False,  # redrawn from the coordinator's loop: no thread of its own
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._moved: list[tuple[logging.StreamHandler[IO[str]], IO[str]]] = []

    def start(self) -> None:
        self.live.start()
        # Log lines (a lost peer's warning) go above the panel, not through it.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (
                sys.stderr,
                sys.stdout,
            ):
                self._moved.append((handler, handler.stream))
                handler.setStream(_Above(self.console))

    def note(self, note: Note, snapshot: Snapshot) -> None:
        if note.what in ("failed", "retry", "lost", "joined"):
            from rich.text import Text

            style = {"failed": "red", "retry": "yellow", "lost": "yellow"}.get(note.what, "")
            self.console.print(Text(f"{_clock(snapshot.elapsed_s)} {note.text()}", style=style))

    def update(self, snapshot: Snapshot) -> None:
        self.live.update(render(snapshot), refresh=True)

    def stop(self) -> None:
        for handler, stream in self._moved:
            handler.setStream(stream)
        self._moved.clear()
        self.live.stop()


class _Above:
    """A text stream that prints through a rich console (above its live panel)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def write(self, text: str) -> int:
        if text.strip():
            from rich.text import Text

            self.console.print(Text(text.rstrip("\n")))
        return len(text)

    def flush(self) -> None:
        pass


def render(s: Snapshot) -> RenderableType:
    """The live panel of one snapshot."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    eta = s.eta_s
    finished = s.done + s.failed + s.skipped
    head = Text.assemble(
        ("bgrid ", "bold"),
        (s.job, "bold cyan"),
        f"  {s.phase}  ",
        f"elapsed {_clock(s.elapsed_s)}",
        f"  ETA {_clock(eta)}" if eta is not None and finished < s.total else "",
    )
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=max(1, s.total), completed=finished, width=30),
        Text.assemble(
            (f"{s.done}/{s.total} done", "green"),
            f", {s.running} running, ",
            (f"{s.failed} failed", "red" if s.failed else ""),
            f", {s.skipped} skipped" if s.skipped else "",
            f", {format_size(s.bytes_moved)} moved",
        ),
    )
    peers = Table(box=None, padding=(0, 2), show_edge=False)
    peers.add_column("peer", style="cyan", no_wrap=True)
    peers.add_column("cpus", justify="right")
    peers.add_column("running now", overflow="ellipsis", no_wrap=True)
    for peer in s.peers[:MAX_PEER_ROWS]:
        peers.add_row(peer.name, str(peer.cpus), ", ".join(peer.running) or "-")
    parts: list[RenderableType] = [head, bar]
    if s.peers:
        parts.append(peers)
    if len(s.peers) > MAX_PEER_ROWS:
        parts.append(Text(f"... and {len(s.peers) - MAX_PEER_ROWS} more peer(s)"))
    elif not s.peers:
        parts.append(Text("no peer held", style="dim"))
    return Group(*parts)
