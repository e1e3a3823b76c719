"""The command line: no abbreviations, -v and -q anywhere."""

from __future__ import annotations

import pytest

from bonjourgrid.cli import build_parser


@pytest.mark.parametrize(
    "argv",
    [
        ["submit", "wf.yaml", "--worker", "2"],  # not --workers
        ["submit", "wf.yaml", "--req", "ram>=1G"],  # not --require
        ["worker", "--always"],  # not --always-idle
        ["keys", "init", "--forc"],  # not --force
        ["--verb", "peers"],  # not --verbose
    ],
)
def test_an_abbreviated_flag_is_an_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "verbose", "quiet"),
    [
        (["-v", "peers"], 1, 0),
        (["peers", "-v"], 1, 0),
        (["-v", "peers", "-v"], 2, 0),
        (["-q", "submit", "wf.yaml"], 0, 1),
        (["submit", "wf.yaml", "-q"], 0, 1),
        (["keys", "-q", "show"], 0, 1),
    ],
)
def test_verbose_and_quiet_are_read_before_and_after_the_command(
    argv: list[str], verbose: int, quiet: int
) -> None:
    args = build_parser().parse_args(argv)
    assert args.verbose_before + args.verbose_after == verbose
    assert args.quiet_before + args.quiet_after == quiet
