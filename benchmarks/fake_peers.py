"""What silent fake peers cost a submit: its wall time facing 0 vs N fakes on a real LAN.

Needs root (network namespaces, `tests/lan/netns.py`). Three hosts: one submits, one runs a
real worker (cost 0, 1 cpu), one advertises N fake idle peers of the grid over mDNS
(`tests/lan/fakes.py`: cost 0, 64 cpus, so they rank first; half on a port that accepts and
never answers, half on a closed port). Each round submits a one-task workflow (`echo`) and
times the `bgrid submit` process from start to exit, `--repeats` times without fakes, then
as many with them. The extra delay is the difference of the medians.

    sudo .venv/bin/python benchmarks/fake_peers.py --fakes 2000 --json fake_peers.json

Goal (security issue, "denial of service without a key"): N <= 2,000 peers that never answer
delay a submit by at most one reservation timeout (`RESERVE_TIMEOUT_S`, 2 s).
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent)]  # tests/lan/, bonjourgrid/

from bonjourgrid.coordinator.peers import RESERVE_TIMEOUT_S  # noqa: E402
from tests.lan.fakes import advertise_fake_peers  # noqa: E402
from tests.lan.netns import Host, Lan, lan_available  # noqa: E402

_SUBMIT_TIMEOUT_S = 600.0


def bgrid(*args: str) -> list[str]:
    return [sys.executable, "-m", "bonjourgrid.cli", *args]


def timed_submit(host: Host, workflow: Path) -> tuple[float, int]:
    """The submit's wall time (s), and how many candidates its first recruitment weighed."""
    started = time.monotonic()
    done = host.run(bgrid("-v", "submit", str(workflow)), timeout=_SUBMIT_TIMEOUT_S)
    took = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"submit exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    weighed = re.search(r"recruiting from (\d+) candidate", done.stderr)
    return took, int(weighed.group(1)) if weighed else -1


def listed_peers(host: Host) -> int:
    done = host.run(bgrid("peers", "--json", "--wait", "2"), timeout=120)
    return len(json.loads(done.stdout)) if done.returncode == 0 else -1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fakes", type=int, default=2000, help="fake peers (default 2000)")
    ap.add_argument("--repeats", type=int, default=3, help="submits per case (default 3)")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    args = ap.parse_args()
    reason = lan_available()
    if reason is not None:
        raise SystemExit(f"cannot build a test LAN: {reason}")
    with tempfile.TemporaryDirectory(prefix="bgrid-fakes-") as tmp, Lan(3, Path(tmp)) as lan:
        submitter, worker, attacker = lan.hosts
        if submitter.run(bgrid("keys", "init"), timeout=60).returncode != 0:
            raise SystemExit("bgrid keys init failed")
        key_dir = Path(submitter.env["XDG_CONFIG_HOME"]) / "bonjourgrid"
        Path(worker.env["XDG_CONFIG_HOME"], "bonjourgrid").mkdir(parents=True, exist_ok=True)
        for f in key_dir.iterdir():
            Path(worker.env["XDG_CONFIG_HOME"], "bonjourgrid", f.name).write_bytes(f.read_bytes())
        name = f"real-{secrets.token_hex(2)}"
        worker.popen(bgrid("worker", "--name", name, "--cpus", "1", "--always-idle"))
        workflow = Path(tmp) / "wf" / "wf.yaml"
        workflow.parent.mkdir()
        workflow.write_text(
            "name: fakes\ntasks:\n  t: {command: 'echo ok > out', outputs: [out]}\n"
        )
        deadline = time.monotonic() + 30
        while listed_peers(submitter) < 1:
            if time.monotonic() > deadline:
                raise SystemExit("the real worker was never listed")
        runs_without = [timed_submit(submitter, workflow) for _ in range(args.repeats)]
        # Enrolled fakes (credentials of the grid): the probe/reserve path, the worst case.
        fakes = advertise_fake_peers(attacker, args.fakes, secrets.token_hex(2), key_dir)
        seen = listed_peers(submitter)
        runs_facing = [timed_submit(submitter, workflow) for _ in range(args.repeats)]
        fakes.stop()
    without = [round(t, 2) for t, _ in runs_without]
    facing = [round(t, 2) for t, _ in runs_facing]
    weighed = [n for _, n in runs_facing]
    extra = statistics.median(facing) - statistics.median(without)
    print(f"submit wall time, median of {args.repeats} (s):")
    print(f"  0 fake peers      {statistics.median(without):6.2f}   {without}")
    print(f"  {args.fakes} fake peers {statistics.median(facing):6.2f}   {facing}")
    print(f"  peers listed with the fakes: {seen} (bgrid peers --wait 2)")
    print(f"  candidates each submit facing the fakes weighed: {weighed}")
    verdict = "PASS" if extra <= RESERVE_TIMEOUT_S else "FAIL"
    print(f"extra delay: {extra:.2f} s (goal <= {RESERVE_TIMEOUT_S:g} s): {verdict}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "fakes": args.fakes,
                    "without_s": without,
                    "facing_s": facing,
                    "listed": seen,
                    "weighed": weighed,
                    "extra_s": extra,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
