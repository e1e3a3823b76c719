"""`bgrid service`: the systemd user unit of the worker, and log lines for the journal."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bonjourgrid.cli import main
from bonjourgrid.worker.service import JournalFormatter, logs_to_journal, systemd_unit


def test_the_unit_runs_this_interpreter_and_restarts_on_failure() -> None:
    unit = systemd_unit(["--always-idle", "--activity-command", "echo $((5*60)) 50%"])
    lines = unit.splitlines()
    assert f"ExecStart={sys.executable} -m bonjourgrid.cli worker --always-idle " in unit
    # systemd would expand $ and % itself, and split on the spaces
    assert any(line.endswith('--activity-command "echo $$((5*60)) 50%%"') for line in lines)
    assert "Restart=on-failure" in lines
    assert "WantedBy=default.target" in lines


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze here")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    path = tmp_path / "bgrid-worker.service"
    path.write_text(systemd_unit(["--always-idle"]))
    # (system mode: --user needs a user session, which tests do not have; the syntax is one)
    out = subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "bgrid-worker.service" not in out.stderr, out.stderr  # no line was ignored


def test_service_install_writes_the_user_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert main(["service", "install", "--", "--cpus", "2"]) == 0
    unit = (tmp_path / "systemd" / "user" / "bgrid-worker.service").read_text()
    assert "worker --cpus 2\n" in unit
    assert "systemctl --user enable --now bgrid-worker" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a flag `bgrid worker` does not know stops it
        main(["service", "print", "--", "--no-such-flag"])


def test_log_lines_to_the_journal_carry_a_priority_and_no_time(tmp_path: Path) -> None:
    err = tmp_path / "stderr"
    with err.open("w") as stream:
        st = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        code = (
            "import logging; from bonjourgrid.worker.service import configure_logging; "
            "configure_logging(logging.INFO); logging.getLogger('bgrid.x').warning('peer lost'); "
            "logging.getLogger('bgrid.y').info('serving')"
        )
        subprocess.run([sys.executable, "-c", code], stderr=stream, env=env, check=True)
    assert err.read_text().splitlines() == ["<4>bgrid.x: peer lost", "<6>bgrid.y: serving"]


def test_elsewhere_log_lines_keep_their_time(tmp_path: Path) -> None:
    with (tmp_path / "f").open("w") as stream:
        assert not logs_to_journal(stream)  # no JOURNAL_STREAM, or another file's
    record = logging.LogRecord("bgrid", logging.ERROR, __file__, 1, "a\nb", None, None)
    assert JournalFormatter().format(record) == "<3>bgrid: a\n<3>b"
