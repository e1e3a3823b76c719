"""Which middleware a worker advertises (`mw`), and how recruitment filters on it.

Detection is tested against directories this test fills with stand-in programs: the machine
running the tests may have slurmd and munged installed, or not.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from bonjourgrid.cli import build_parser
from bonjourgrid.coordinator.recruit import JobNeeds, explain_shortage, select_candidates
from bonjourgrid.discovery.txt import INSECURE_GRID
from bonjourgrid.errors import ConfigError
from bonjourgrid.requirements import Requirement
from bonjourgrid.worker.config import worker_settings
from bonjourgrid.worker.middleware import detect_middleware, search_path
from tests.records import idle_peer


def installed(tmp_path: Path, *programs: str) -> list[str]:
    """A directory holding executables named `programs` (and a non-executable `boinc`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for program in programs:
        path = bin_dir / program
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    (bin_dir / "boinc").write_text("not executable")
    return [str(bin_dir)]


@pytest.mark.parametrize(
    ("programs", "expected"),
    [
        ((), ("native",)),
        (("slurmd",), ("native",)),  # without munged, slurmd cannot join a cluster
        (("slurmd", "munged"), ("native", "slurm")),
        (("condor_master",), ("native", "condor")),
        (("condor_startd",), ("native", "condor")),
        (("boinc_client", "slurmd", "munged"), ("native", "slurm", "boinc")),
    ],
)
def test_middleware_is_detected_from_the_programs_installed(
    tmp_path: Path, programs: tuple[str, ...], expected: tuple[str, ...]
) -> None:
    assert detect_middleware(installed(tmp_path, *programs)) == expected


def test_the_system_sbin_directories_are_searched_after_path() -> None:
    assert search_path("/opt/bin:/usr/bin") == [
        "/opt/bin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/sbin",
        "/sbin",
    ]
    assert search_path("/usr/sbin")[:2] == ["/usr/sbin", "/usr/local/sbin"]


def flags(*argv: str) -> dict[str, Any]:
    return vars(build_parser().parse_args(["worker", *argv]))


def test_the_config_file_and_the_flag_override_detection(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text('[worker]\nmiddleware = ["condor", "slurm"]\n')
    assert worker_settings(flags(), path).middleware == ("native", "condor", "slurm")
    assert worker_settings(flags("--middleware", "Boinc, native"), path).middleware == (
        "native",
        "boinc",
    )
    path.write_text("[worker]\ncpus = 1\n")
    assert worker_settings(flags(), path).middleware is None  # none given: detect


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('middleware = "slurm"', None),  # one name as a string is accepted too
        ("middleware = [1]", "a list of middleware names"),
        ('middleware = ["no way"]', "'no way' is not a middleware name"),
        ("middleware = 3", "expected a list or str"),
    ],
)
def test_a_bad_middleware_list_says_what_is_wrong(
    tmp_path: Path, text: str, says: str | None
) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(f"[worker]\n{text}\n")
    if says is None:
        assert worker_settings(flags(), path).middleware == ("native", "slurm")
        return
    with pytest.raises(ConfigError, match=says):
        worker_settings(flags(), path)


# -- recruitment -----------------------------------------------------------------------------


def needs(middleware: str) -> JobNeeds:
    return JobNeeds(grid=INSECURE_GRID, require=Requirement.everything(), middleware=middleware)


def peers() -> list[Any]:
    base = idle_peer("native-only")
    return [
        base,
        dataclasses.replace(base, name="slurm-peer", mw=("native", "slurm")),
        dataclasses.replace(base, name="condor-peer", mw=("native", "condor")),
    ]


def test_a_job_recruits_only_peers_that_advertise_its_middleware() -> None:
    selection = select_candidates(peers(), needs("slurm"))
    assert [p.name for p in selection.candidates] == ["slurm-peer"]
    assert selection.rejected == {
        "native-only": "has no slurm (advertises: native)",
        "condor-peer": "has no slurm (advertises: native, condor)",
    }
    assert len(select_candidates(peers(), needs("native")).candidates) == 3


def test_the_shortage_message_says_what_the_peers_lack_and_what_to_do() -> None:
    selection = select_candidates(peers()[:1], needs("condor"))
    text = explain_shortage(peers()[:1], selection, needs("condor"), 0)
    assert "native-only: has no condor (advertises: native)" in text
    assert "bgrid worker --middleware condor" in text
