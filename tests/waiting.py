"""The one way tests wait: poll a condition until a deadline, then fail saying what.

A deadline is a safety net, never a measurement: figures belong to benchmarks/.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

POLL_S = 0.02


What = str | Callable[[], str]  # a callable is asked at the deadline (a log read then)


def wait_until(until: Callable[[], object], deadline_s: float, what: What) -> float:
    """Seconds until `until()` held; the test fails, saying `what`, after `deadline_s`."""
    start = time.monotonic()
    while not until():
        if time.monotonic() - start >= deadline_s:
            _fail(what, deadline_s)
        time.sleep(POLL_S)
    return time.monotonic() - start


async def async_wait_until(until: Callable[[], object], deadline_s: float, what: What) -> float:
    """`wait_until` for a coroutine: the event loop goes on while it waits."""
    start = time.monotonic()
    while not until():
        if time.monotonic() - start >= deadline_s:
            _fail(what, deadline_s)
        await asyncio.sleep(POLL_S)
    return time.monotonic() - start


def _fail(what: What, deadline_s: float) -> None:
    pytest.fail(f"{what() if callable(what) else what}: not true after {deadline_s:g} s")
