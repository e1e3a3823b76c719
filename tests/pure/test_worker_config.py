"""worker.toml: read with tomllib, checked with messages naming the key; flags win over it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bonjourgrid.cli import build_parser
from bonjourgrid.errors import ConfigError
from bonjourgrid.worker.config import worker_config_path, worker_settings
from bonjourgrid.worker.idle import IDLE_AFTER_S, MAX_LOAD

FILE = """
[worker]
name = "lab-12"
cpus = 2
ram = "4GiB"
cost = 0.5
cache_dir = "cache"

[idle]
idle_minutes = 5
max_load = 0.5
activity_file = "~/active"
always_idle = true
vacate_after = 120
"""


def flags(*argv: str) -> dict[str, Any]:
    """What the `bgrid worker` parser hands to the settings, for these flags."""
    return vars(build_parser().parse_args(["worker", *argv]))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    return path


def test_without_a_file_or_flags_the_defaults_are_htcondors(tmp_path: Path) -> None:
    s = worker_settings(flags(), write(tmp_path, ""))
    assert s.idle.idle_after_s == IDLE_AFTER_S == 900.0
    assert s.idle.max_load == MAX_LOAD == 0.3
    assert s.idle.activity_file is None and s.idle.activity_command is None
    assert not s.always_idle and s.cost == 0.0 and s.name is None and s.cpus is None
    assert s.vacate_after_s == 600.0  # suspended tasks wait 10 minutes for the owner to go


def test_the_file_is_read_and_relative_paths_are_from_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    s = worker_settings(flags(), write(tmp_path, FILE))
    assert (s.name, s.cpus, s.ram_mib, s.cost) == ("lab-12", 2, 4096, 0.5)
    assert s.cache_dir == tmp_path / "cache"
    assert s.idle.idle_after_s == 300.0 and s.idle.max_load == 0.5
    assert s.idle.activity_file == tmp_path / "home" / "active"
    assert s.always_idle and s.vacate_after_s == 120.0


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    given = flags(
        "--name", "x", "--idle-minutes", "0.5", "--max-load", "1", "--no-always-idle",
        "--activity-command", "echo 3", "--cost", "0", "--vacate-after", "0",
    )  # fmt: skip
    s = worker_settings(given, write(tmp_path, FILE))
    assert s.name == "x" and s.cost == 0.0 and s.cpus == 2  # cpus: from the file
    assert s.idle.idle_after_s == 30.0 and s.idle.max_load == 1.0
    assert s.idle.activity_command == "echo 3"
    assert not s.always_idle and s.vacate_after_s == 0.0  # 0: vacate at once


def test_the_default_file_lives_in_the_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert worker_config_path() == tmp_path / "bonjourgrid" / "worker.toml"
    (tmp_path / "bonjourgrid").mkdir()
    worker_config_path().write_text("[idle]\nidle_minutes = 1\n")
    assert worker_settings(flags()).idle.idle_after_s == 60.0


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[idle]\nmax_load = 30\n", r"\[idle\] max_load 30: a fraction of the CPUs in \(0, 1\]"),
        ("[idle]\nmax_load = true\n", r"\[idle\] max_load = True: expected a int or float"),
        ("[idle]\nidle_minutes = -1\n", "idle_minutes -1: minutes .* 0 or more"),
        ("[worker]\ncpus = 0\n", "cpus 0: a worker needs at least 1 task slot"),
        ("[idle]\nvacate_after = -5\n", "vacate_after -5: seconds the owner may stay"),
        ('[worker]\nram = "lots"\n', "ram: 'lots' is not a size"),
        ("[worker]\ncost = -1\n", "cost -1: cost is a price per CPU-hour"),
        ("[worker\n", "cannot read the worker config"),
    ],
)
def test_a_bad_value_names_the_file_and_key(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=words) as err:
        worker_settings(flags(), path)
    assert str(path) in str(err.value)


def test_a_bad_flag_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--max-load 0\.0: a fraction"):
        worker_settings(flags("--max-load", "0"), write(tmp_path, ""))
    with pytest.raises(ConfigError, match="--cpus 0"):
        worker_settings(flags("--cpus", "0"), write(tmp_path, ""))


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (
            "[idle]\nidle_minute = 3\n",
            "unknown key 'idle_minute' in [idle]; did you mean 'idle_minutes'?",
        ),
        ("[wroker]\nname = 'a'\n", "unknown table [wroker]; did you mean 'worker'?"),
    ],
)
def test_an_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path, text: str, said: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        worker_settings(flags(), path)
    assert str(err.value) == f"{path}: {said}"


def test_a_named_config_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        worker_settings(flags(), tmp_path / "nope.toml")
