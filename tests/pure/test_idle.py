"""The idle policy: input preempts at once, load is smoothed, unknown input leaves it to load."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from bonjourgrid.errors import ConfigError
from bonjourgrid.worker.idle import (
    ActivityCommand,
    ActivityFile,
    ActivitySample,
    IdlePolicy,
    IdleSettings,
    KeyboardInterrupts,
    OwnerMonitor,
    Terminals,
)

STEP = 0.2  # the daemon's sampling period


def feed(
    policy: IdlePolicy, loads: list[float], start: float = 0.0, idle: float | None = None
) -> list[bool]:
    """Decisions for one load sample every STEP seconds from `start`."""
    return [
        policy.decide(ActivitySample(idle, load), start + i * STEP) for i, load in enumerate(loads)
    ]


def test_recent_input_makes_the_owner_active_at_once_whatever_the_load() -> None:
    policy = IdlePolicy(idle_after_s=900, max_load=0.3)
    assert policy.decide(ActivitySample(0.1, 0.0), 0.0)
    assert "keyboard/mouse used 0.1 s ago" in policy.why


def test_input_older_than_the_idle_time_with_low_load_is_idle() -> None:
    policy = IdlePolicy(idle_after_s=900, max_load=0.3)
    assert policy.decide(ActivitySample(899.9, 0.1), 0.0)
    assert not policy.decide(ActivitySample(900.0, 0.1), 0.2)


def test_load_above_the_threshold_makes_the_owner_active_and_below_idle() -> None:
    policy = IdlePolicy(idle_after_s=900, max_load=0.3, load_window_s=2.0)
    assert all(feed(policy, [0.5] * 10, idle=1e6))
    assert "50% of the CPUs" in policy.why
    # Once the window holds only low figures the owner is away again.
    assert not feed(policy, [0.1] * 10, start=2.0, idle=1e6)[-1]


def test_unknown_input_leaves_the_decision_to_the_load() -> None:
    policy = IdlePolicy(idle_after_s=900, max_load=0.3)
    assert not policy.decide(ActivitySample(None, 0.1), 0.0)
    assert "input unknown" in policy.why
    busy = IdlePolicy(idle_after_s=900, max_load=0.3)
    assert busy.decide(ActivitySample(None, 0.9), 0.0)


def test_a_one_sample_spike_does_not_flap_the_peer() -> None:
    policy = IdlePolicy(idle_after_s=900, max_load=0.3)
    decisions = feed(policy, [0.15] * 60 + [1.0] + [0.15] * 20, idle=1e6)
    assert not any(decisions)


def test_hysteresis_busy_from_load_needs_the_load_clearly_below_the_bar() -> None:
    policy = IdlePolicy(idle_after_s=900, max_load=0.3, load_window_s=1.0)
    assert feed(policy, [0.6] * 5, idle=1e6)[-1]
    # 28% is under the bar but not clearly: still busy; 20% is clearly under.
    assert feed(policy, [0.28] * 10, start=1.0, idle=1e6)[-1]
    assert not feed(policy, [0.2] * 10, start=3.0, idle=1e6)[-1]
    # And from idle, 28% does not make the owner active.
    assert not feed(policy, [0.28] * 10, start=5.0, idle=1e6)[-1]


def test_max_load_one_ignores_load_and_idle_zero_ignores_input() -> None:
    policy = IdlePolicy(idle_after_s=0, max_load=1.0)
    assert not any(feed(policy, [1.0] * 10, idle=0.0))
    assert "other work" not in policy.why


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"max_load": 0.0}, "(0, 1]"),
        ({"max_load": 1.5}, "(0, 1]"),
        ({"idle_after_s": -1.0}, ">= 0"),
        ({"idle_after_s": float("nan")}, ">= 0"),
        ({"activity_command": "  "}, "empty"),
    ],
)
def test_settings_out_of_range_are_refused_with_the_reason(
    kwargs: dict[str, object], words: str
) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("]", r"\]")):
        IdleSettings(**kwargs)  # type: ignore[arg-type]


# -- the probes ------------------------------------------------------------------------------


def test_the_activity_file_mtime_is_the_last_owner_activity(tmp_path: Path) -> None:
    path = tmp_path / "active"
    source = ActivityFile(path)
    assert asyncio.run(source.idle_s(1000.0)) is None  # no file: unknown
    path.touch()
    os.utime(path, (900.0, 900.0))
    assert asyncio.run(source.idle_s(1000.0)) == pytest.approx(100.0)
    assert asyncio.run(source.idle_s(800.0)) == 0.0  # a clock step back is "just now"


def test_the_activity_command_prints_idle_seconds_and_a_bad_one_is_unknown() -> None:
    good = ActivityCommand("echo 42.5")
    assert asyncio.run(good.idle_s(0.0)) == pytest.approx(42.5)
    # Between runs the figure ages with the clock instead of forking again.
    assert asyncio.run(good.idle_s(0.5)) == pytest.approx(43.0)
    assert asyncio.run(ActivityCommand("echo soon").idle_s(0.0)) is None
    assert asyncio.run(ActivityCommand("exit 3").idle_s(0.0)) is None


def test_terminals_read_the_atime_not_the_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # utmp lists nobody: every virtual console and pts is watched (HTCondor's "bad utmp").
    monkeypatch.setattr(psutil, "users", list)
    (tmp_path / "pts").mkdir()
    tty, pts, other = tmp_path / "tty1", tmp_path / "pts" / "0", tmp_path / "ttyS0x"
    for path, (atime, mtime) in ((tty, (500.0, 990.0)), (pts, (700.0, 10.0)), (other, (999, 999))):
        path.touch()
        os.utime(path, (atime, mtime))
    source = Terminals(dev=tmp_path)
    # Output to a terminal (mtime) is not the owner typing: pts/0 was read 300 s ago.
    # Serial lines (ttyS*) are not terminals anyone types on.
    assert asyncio.run(source.idle_s(1000.0)) == pytest.approx(300.0)


def test_keyboard_interrupts_count_as_input_when_they_change(tmp_path: Path) -> None:
    table = tmp_path / "interrupts"
    line = "           CPU0       CPU1\n  1:   {}   {}   IO-APIC   1-edge      i8042\n"
    table.write_text(line.format(10, 5))
    source = KeyboardInterrupts(table)
    started = asyncio.run(source.idle_s(0.0))
    assert started is not None
    table.write_text(line.format(10, 6))
    now = 2e9
    assert asyncio.run(source.idle_s(now)) == 0.0
    assert asyncio.run(source.idle_s(now + 0.5)) == pytest.approx(0.5)  # read at most 1/s
    (tmp_path / "none").write_text("           CPU0\n  9:   3   IO-APIC   9-fasteoi   acpi\n")
    assert asyncio.run(KeyboardInterrupts(tmp_path / "none").idle_s(now)) is None


def test_the_monitor_takes_the_most_recent_input_of_its_sources(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.touch()
    new.touch()
    os.utime(old, (0.0, 0.0))
    monitor = OwnerMonitor(
        IdleSettings(idle_after_s=60, max_load=1.0),
        sources=[ActivityFile(old), ActivityFile(new), ActivityFile(tmp_path / "missing")],
    )
    sample = asyncio.run(monitor.sample(0.0))
    assert sample.input_idle_s is not None and sample.input_idle_s < 60
    assert asyncio.run(monitor.owner_active(0.2))
    assert "ActivityFile" in monitor.describe() and "any load" in monitor.describe()


def test_explicit_sources_replace_the_built_in_probes(tmp_path: Path) -> None:
    monitor = OwnerMonitor(IdleSettings(activity_file=tmp_path / "f", max_load=1.0))
    assert [type(s).__name__ for s in monitor.sources] == ["ActivityFile"]
    builtin = OwnerMonitor(IdleSettings(max_load=1.0))
    assert [type(s).__name__ for s in builtin.sources] == [
        "Terminals",
        "InputDevices",
        "KeyboardInterrupts",
    ]


def test_a_user_terminal_in_utmp_is_watched_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pts").mkdir()
    for name, atime in (("tty2", 990.0), ("pts/4", 400.0)):
        (tmp_path / name).touch()
        os.utime(tmp_path / name, (atime, atime))
    logins = [SimpleNamespace(name="ann", terminal=t) for t in ("pts/4", ":0")]  # ":0": X
    monkeypatch.setattr(psutil, "users", lambda: logins)
    assert asyncio.run(Terminals(dev=tmp_path).idle_s(1000.0)) == pytest.approx(600.0)


def test_load_is_tracked_while_input_decides() -> None:
    policy = IdlePolicy(idle_after_s=900, max_load=0.3, load_window_s=1.0)
    assert feed(policy, [0.6] * 10, idle=1e6)[-1]  # busy from load
    # The owner types while the load falls away, then comes back up to 28%...
    feed(policy, [0.1] * 10 + [0.28] * 10, start=2.0, idle=0.0)
    # ... and leaves: 28% is under the bar, and the old busy-from-load state is long gone.
    assert not policy.decide(ActivitySample(1e6, 0.28), 6.0)
