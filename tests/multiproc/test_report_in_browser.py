"""The HTML report of a real run, opened in a real headless Chromium: what the user sees."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.multiproc.conftest import Grid

MONTAGE = Path(__file__).resolve().parents[2] / "examples" / "dags" / "montage"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Headless, offline, and with no state outside the test: the page must need nothing else.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no headless Chromium here (Debian: apt-get install chromium; .ci/run does)")


def browse(browser: str, page: Path, profile: Path, *flags: str) -> str:
    out = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.slow
def test_the_html_report_of_a_montage_run_shows_peers_dag_bytes_and_retries(
    tmp_path: Path, grid: Grid
) -> None:
    browser = chromium()
    work = tmp_path / "montage"
    shutil.copytree(MONTAGE, work)
    # One flaky task, so the page has a retry to explain.
    spec = yaml.safe_load((work / "montage.yaml").read_text())
    spec["tasks"]["concatfit"]["command"] = (
        '[ "$BGRID_ATTEMPT" -gt 1 ] || { echo "flaky on purpose" >&2; exit 3; }; '
        + spec["tasks"]["concatfit"]["command"]
    )
    (work / "montage.yaml").write_text(yaml.safe_dump(spec))
    out = grid.run(
        "submit",
        str(work / "montage.yaml"),
        "--local",
        "3",
        "--report",
        str(work / "run.html"),
        "--json",
        timeout=90,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["tasks"]["concatfit"]["attempts"] == 2
    assert report["tasks"]["concatfit"]["history"], report["tasks"]["concatfit"]

    page = work / "run.html"
    dom = browse(browser, page, tmp_path / "profile", "--dump-dom")
    peers = {t["peer"] for t in report["tasks"].values()}
    assert len(re.findall(r'class="gantt-row"', dom)) == len(peers)
    for peer in peers:
        assert f'data-peer="{peer}"' in dom
    assert len(re.findall(r'class="gantt-task"', dom)) == 15
    assert len(re.findall(r'class="dag-node" data-task="[^"]+" data-status="done"', dom)) == 15
    assert len(re.findall(r'class="dag-edge"', dom)) == len(report["edges"]) > 15
    assert 'id="bytes"' in dom and len(re.findall(r'class="bytes-row"', dom)) == 4
    assert re.search(r'class="retry-row" data-task="concatfit"', dom)
    assert re.search(r'class="gantt-attempt" data-task="concatfit"', dom)  # the failed one
    assert "exit code 3; retry 1/1" in dom  # the failed attempt, and why

    shot = tmp_path / "montage-report.png"
    browse(browser, page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,1000")
    assert shot.stat().st_size > 10_000, "the screenshot is (nearly) empty"
