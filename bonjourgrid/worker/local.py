"""The embedded grid: N worker daemons on loopback with a throwaway key (like Dask's LocalCluster).

`bgrid submit --local N` runs on it, so the first workflow works on a fresh laptop with
nothing configured. The daemons are real processes running the real `bgrid worker`, bound
to 127.0.0.1 and advertised only there.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

from bonjourgrid.credentials import issue, write_identity
from bonjourgrid.keys import GridKey, ephemeral_grid_key, write_grid_key
from bonjourgrid.worker.reaper import PARENT_PID_ENV

LOOPBACK = "127.0.0.1"
_STOP_S = 5.0


class LocalGrid:
    """N `bgrid worker` processes on 127.0.0.1, stopped and cleaned up on exit."""

    def __init__(self, n_workers: int, cpus_each: int | None = None) -> None:
        self.n_workers = n_workers
        self.cpus_each = cpus_each or max(1, (os.cpu_count() or 1) // n_workers)
        self.grid: GridKey = ephemeral_grid_key()
        # 32 random bits in every name: two local grids on one host never claim the same one,
        # so a name probe on loopback is a formality (advertise.py keeps it short there).
        self.tag = secrets.token_hex(4)
        self.names = [f"local-{self.tag}-{i + 1}" for i in range(n_workers)]
        self._dir = Path(tempfile.mkdtemp(prefix="bgrid-local-"))
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> LocalGrid:
        config = self._dir / "config"
        write_grid_key(GridKey(self.grid.public, None), config / "bonjourgrid")
        # The workers stop when this process dies, even by kill -9 (PR_SET_PDEATHSIG).
        env = {**os.environ, "XDG_CONFIG_HOME": str(config), PARENT_PID_ENV: str(os.getpid())}
        try:
            for name in self.names:
                # Enrolled like any desktop: coordinators admit only credentialed peers.
                credential = config / f"{name}.cred"
                write_identity(issue(self.grid, name), credential)
                log = open(self._dir / f"{name}.log", "wb")
                self._procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "bonjourgrid.cli",
                            "worker",
                            "--name",
                            name,
                            "--interface",
                            LOOPBACK,
                            "--always-idle",
                            "--credential",
                            str(credential),
                            "--cpus",
                            str(self.cpus_each),
                            "--cache-dir",
                            str(self._dir / "cache" / name),
                        ],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
                log.close()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def logs(self) -> str:
        """What the workers printed, for the user when something went wrong."""
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')}"
            for p in sorted(self._dir.glob("*.log"))
        )

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        with contextlib.suppress(OSError):
            shutil.rmtree(self._dir)
