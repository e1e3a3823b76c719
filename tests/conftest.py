"""Fixtures shared by every tier: shrunk timing constants and zmq contexts torn down for sure."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import zmq.asyncio

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
