"""`bgrid status --watch`: the table of the LAN's jobs, kept current until Ctrl-C.

One browser stays open for the whole watch (the job records update in place as their
coordinators advertise progress); every WATCH_S the table is made again and, on a terminal,
redrawn in place (rich.live); in a pipe it is written again under a time stamp.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import IO

from rich.console import Console
from rich.live import Live
from rich.text import Text

from bonjourgrid.discovery.advertise import InterfacesType, open_zeroconf
from bonjourgrid.discovery.browse import JobBrowser
from bonjourgrid.discovery.txt import JobRecord

WATCH_S = 1.0  # between two tables


async def watch_jobs(
    interfaces: InterfacesType,
    table: Callable[[list[JobRecord]], Awaitable[str]],
    every_s: float = WATCH_S,
    stream: IO[str] | None = None,
) -> None:
    """Show `table(jobs)` for the jobs seen now, every `every_s`, until cancelled (Ctrl-C)."""
    out = stream or sys.stdout
    zc = open_zeroconf(interfaces)
    browser = JobBrowser(zc)
    live = (
        Live(Text("looking for jobs..."), console=Console(file=out), auto_refresh=False)
        if out.isatty()
        else None
    )
    try:
        await browser.start()
        if live is not None:
            live.start(refresh=True)
        while True:
            await asyncio.sleep(every_s)
            text = await table(browser.jobs())
            if live is not None:
                stamp = time.strftime("%H:%M:%S")
                live.update(Text(f"{text}\n\n{stamp}, every {every_s:g} s; Ctrl-C to stop"))
                live.refresh()
            else:
                out.write(f"--- {time.strftime('%H:%M:%S')}\n{text}\n")
                out.flush()
    finally:
        if live is not None:
            live.stop()
        await browser.stop()
        await zc.async_close()
