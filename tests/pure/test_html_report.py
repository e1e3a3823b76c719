"""The HTML report: drawn from the JSON report alone, escaped, self-contained."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bonjourgrid.cli import main
from bonjourgrid.coordinator.html_report import render_html
from bonjourgrid.coordinator.report import attempt_history, write_report

EVIL = "<script>alert('x')</script>&\"'"


def a_report() -> dict[str, Any]:
    def task(peer: str | None, start: float | None, status: str = "done", **more: Any) -> Any:
        end = None if start is None else start + 1.0
        return {
            "status": status,
            "peer": peer,
            "start": start,
            "end": end,
            "attempts": 1 if peer else 0,
            "exit_code": 0 if status == "done" else None,
            "fetch_s": 0.2,
            "run_s": 0.7,
            "bytes_fetched": 10,
            **more,
        }

    return {
        "job": "demo-123456",
        "workflow": "demo",
        "status": "failed",
        "reason": "1 task failed",
        "makespan_s": 4.0,
        "tasks": {
            "a": task("p1", 0.5),
            "b": task("p1", 1.0),  # overlaps a on p1: a second lane
            EVIL: task(
                f"p2{EVIL}",
                2.0,
                "failed",
                attempts=2,
                error=f"exited 3 {EVIL}",
                stderr_tail=f"boom {EVIL}",
                history=[
                    {
                        "t": 1.5,
                        "what": f"running -> ready: exit code 3 {EVIL}",
                        "peer": "p1",
                        "attempt": 1,
                        "start": 0.2,
                    },
                    {  # the last attempt: the task's own bar, not drawn twice
                        "t": 3.0,
                        "what": "running -> failed: exit code 3; no retries left",
                        "peer": f"p2{EVIL}",
                        "attempt": 2,
                        "start": 2.0,
                    },
                ],
            ),
            "c": task(None, None, "skipped"),
        },
        "edges": [["a", EVIL], ["b", EVIL], [EVIL, "c"]],
        "peers": [{"name": "p1", "cpus": 2, "ram": 1024, "cost": 0.0}],
        "bytes": {
            "from_coordinator": 2048,
            "peer_to_peer": 512,
            "cache_hits": 0,
            "to_submitter": 100,
        },
        "time": {"data_wait_s": 0.6, "compute_s": 2.1},
        "prefetch": "lookahead",
    }


def test_the_page_holds_every_section_and_one_gantt_row_per_peer() -> None:
    page = render_html(a_report())
    for section in ("gantt", "dag", "bytes", "retries", "tasks"):
        assert f"id='{section}'" in page
    assert page.count("class='gantt-row'") == 2  # p1 and p2; c never ran
    assert page.count("class='dag-node'") == 4
    assert page.count("class='dag-edge'") == 3
    assert page.count("class='bytes-row'") == 4
    assert page.count("class='retry-row'") == 1
    assert page.count("class='gantt-attempt'") == 1  # the first failed attempt, on p1
    assert "data-status='failed'" in page and "data-status='skipped'" in page


def test_every_string_from_the_report_is_escaped() -> None:
    page = render_html(a_report())
    assert "<script" not in page
    assert "alert(&#x27;x&#x27;)" in page
    assert "&lt;script&gt;" in page


def test_the_page_fetches_nothing() -> None:
    page = render_html(a_report())
    assert not re.search(r"\b(src|href)\s*=", page)
    assert "@import" not in page and "url(http" not in page
    # the only URL is the SVG namespace, which is a name, never fetched
    assert set(re.findall(r"https?://[^'\" ]+", page)) == {"http://www.w3.org/2000/svg"}


def test_a_report_without_edges_or_runs_still_draws() -> None:
    report = a_report()
    del report["edges"]
    report["tasks"] = {"x": {"status": "waiting", "peer": None, "start": None, "end": None}}
    page = render_html(report)
    assert "No task ran" in page and "has no edges" in page


def test_history_keeps_the_attempts_that_did_not_end_well() -> None:
    story = [
        (0.0, "waiting -> ready: no dependencies"),
        (0.1, "ready -> running: placed on p1 (attempt 1)"),
        (0.5, "running -> ready: exited 1 on p1; retry 1 of 2 after 1 s"),
        (1.6, "ready -> running: placed on p2 (attempt 2)"),
        (1.9, "running -> collecting: exited 0 on p2"),
        (2.0, "collecting -> done: outputs collected"),
    ]
    assert attempt_history(story) == [
        {
            "t": 0.5,
            "what": "running -> ready: exited 1 on p1; retry 1 of 2 after 1 s",
            "peer": "p1",
            "attempt": 1,
            "start": 0.1,
        }
    ]


def test_a_report_file_ending_in_html_is_a_page(tmp_path: Path) -> None:
    write_report(tmp_path / "run.html", a_report())
    write_report(tmp_path / "run.json", a_report())
    assert (tmp_path / "run.html").read_text().startswith("<!DOCTYPE html>")
    assert json.loads((tmp_path / "run.json").read_text())["job"] == "demo-123456"


def test_bgrid_report_draws_a_json_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run.json").write_text(json.dumps(a_report()))
    assert main(["report", str(tmp_path / "run.json")]) == 0
    assert "id='gantt'" in (tmp_path / "run.html").read_text()
    assert main(["report", str(tmp_path / "run.json"), "-o", str(tmp_path / "x.html")]) == 0
    assert (tmp_path / "x.html").exists()
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["report", str(tmp_path / "bad.json")]) == 2
    assert "is not a bgrid report" in capsys.readouterr().err
