"""`bgrid worker` as a systemd user service: the unit file, and log lines that read well in
the journal.

The unit runs the daemon with the interpreter that runs this `bgrid` (so a venv keeps
working), restarts it when it fails, and lets systemd stop it with SIGTERM: the daemon then
stops its tasks and leaves the grid. Under systemd, stderr is a journal stream
(`$JOURNAL_STREAM` names it): the journal stamps each line itself, so lines carry no time of
their own but a `<N>` syslog priority prefix, which journald turns into the line's level.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

UNIT_NAME = "bgrid-worker.service"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JOURNAL_FORMAT = "%(name)s: %(message)s"
# sd-daemon(3) priorities, which journald reads from a `<N>` prefix (SyslogLevelPrefix=yes)
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


def systemd_unit(worker_args: Sequence[str] = (), python: str | None = None) -> str:
    """The user unit that runs `bgrid worker WORKER_ARGS` with this interpreter."""
    command = [python or sys.executable, "-m", "bonjourgrid.cli", "worker", *worker_args]
    return f"""\
[Unit]
Description=BonjourGrid worker: offers this desktop to the grid while its owner is away
After=network-online.target

[Service]
Type=exec
ExecStart={" ".join(_systemd_quote(word) for word in command)}
Restart=on-failure
RestartSec=5
# SIGTERM: the daemon stops its tasks (grace, then SIGKILL) and leaves the grid
TimeoutStopSec=15
SyslogIdentifier=bgrid-worker
Environment=PYTHONUNBUFFERED=1

[Install]
WantedBy=default.target
"""


def user_unit_path() -> Path:
    """Where `systemctl --user` looks for units of this user."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user" / UNIT_NAME


def _systemd_quote(word: str) -> str:
    # systemd.service(5) "Command lines": specifiers (%) and variables ($) are expanded, and
    # words are split on spaces unless quoted; double quotes take C-style escapes.
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not any(c in word for c in " \t\"'\\;"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def logs_to_journal(stream: TextIO | None = None) -> bool:
    """True when `stream` (stderr) is the journal stream systemd handed this process."""
    stream = stream if stream is not None else sys.stderr
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    """`<priority>logger: message`, no time: journald adds it."""

    def __init__(self) -> None:
        super().__init__(_JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        priority = next(
            (
                p
                for level, p in sorted(_PRIORITIES.items(), reverse=True)
                if record.levelno >= level
            ),
            7,
        )
        text = super().format(record)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


def configure_logging(level: int) -> None:
    """Log to stderr: with the time on a terminal or in a file, without it in the journal."""
    handler = logging.StreamHandler()
    handler.setFormatter(JournalFormatter() if logs_to_journal() else logging.Formatter(_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
