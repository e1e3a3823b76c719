"""Fixtures shared by every tier: shrunk timing constants, zmq contexts torn down for sure,
and two guards that every test passes through: no thread it started outlives it, and no
coroutine of an async test blocks the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import zmq.asyncio

THREADS_END_S = 5.0  # threads a test started have this long to end after it
# A stall this long means a coroutine blocked the loop (a sync call, a busy loop): generous,
# so that a loaded 2-core machine delaying a wake-up is not mistaken for one.
LOOP_BLOCKED_S = 2.0
_WATCH_S = 0.05

# Small enough that a dead source costs a test a fraction of a second, large enough that a
# live loopback source (CURVE handshake included) always answers first.
QUICK_CHUNK_TIMEOUT_S = 0.4


@pytest.fixture
def quick_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink the module timing constants that tests would otherwise wait out."""
    # Imported here so a broken module fails only the tests that use it, not collection.
    import zeroconf._core

    from bonjourgrid.cache import transfer
    from bonjourgrid.discovery import advertise
    from bonjourgrid.worker import daemon

    monkeypatch.setattr(transfer, "_CHUNK_TIMEOUT_S", QUICK_CHUNK_TIMEOUT_S)
    monkeypatch.setattr(daemon, "_TICK_S", 0.05)
    # Test services carry unique names: nobody else can own them, so probing is a formality.
    monkeypatch.setattr(advertise, "_NAME_PROBE_MS", 50)
    # Goodbyes go out 125 ms apart, a quarter second per daemon stopped; loopback needs no
    # spacing. A zeroconf internal: if it is renamed, tests only get slower.
    monkeypatch.setattr(zeroconf._core, "_UNREGISTER_TIME", 5, raising=False)


@pytest_asyncio.fixture
async def zctx() -> AsyncIterator[zmq.asyncio.Context]:
    """A zmq asyncio context; sockets left open in it are closed at teardown, on the loop."""
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread of its own running (an unclosed Zeroconf, a
    daemon or authenticator not stopped)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREADS_END_S

    def leaked() -> list[threading.Thread]:
        # asyncio's default executor ("asyncio_N") ends with its loop, torn down after us.
        return [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith("asyncio_")
        ]

    while threads := leaked():
        if time.monotonic() >= deadline:
            pytest.fail(f"the test left {len(threads)} thread(s) running: {threads}")
        time.sleep(0.05)


@pytest_asyncio.fixture(autouse=True)
async def loop_not_blocked() -> AsyncIterator[None]:
    """Fail an async test during which the event loop stalled for LOOP_BLOCKED_S or more."""
    loop = asyncio.get_running_loop()
    worst = 0.0

    async def watch() -> None:
        nonlocal worst
        while True:
            asked = loop.time()
            await asyncio.sleep(_WATCH_S)
            worst = max(worst, loop.time() - asked - _WATCH_S)

    watcher = asyncio.create_task(watch())
    yield
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    if worst >= LOOP_BLOCKED_S:
        pytest.fail(f"the event loop was blocked for {worst:.1f} s during the test")
