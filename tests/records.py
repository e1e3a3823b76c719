"""Records that tests advertise or judge: one idle peer, changed field by field."""

from __future__ import annotations

import dataclasses
from typing import Any

from bonjourgrid.discovery.txt import INSECURE_GRID, PeerRecord

_IDLE = PeerRecord(
    name="peer",
    addresses=("127.0.0.1",),
    port=9,
    state="idle",
    job=None,
    cpus=1,
    ram=1024,
    disk=1024,
    cost=0.0,
    arch="x86_64",
    os="linux",
    mw=("native",),
    key="",
    grid=INSECURE_GRID,
)


def idle_peer(name: str, **fields: Any) -> PeerRecord:
    """An idle peer called `name` (an insecure one on 127.0.0.1 unless `fields` say else)."""
    return dataclasses.replace(_IDLE, name=name, **fields)
