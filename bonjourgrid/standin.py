"""The stand-in a WfFormat task runs when its recorded program is not on the peers.

A WfFormat instance (WfCommons) mostly describes a past run: its programs (mProject,
blastall...) are not installed on the desktops of a grid. Like WfCommons' own WfBench, each
task then runs this script instead, which replays what the instance recorded:
1. it checks that every input is present (the file flow is real: a missing input fails the
   task, as the real program would); a task reading more files than one command can name
   (`--in-count=N`) checks that its sandbox holds N of them;
2. it burns CPU for the recorded runtime (already multiplied by the workflow's runtime scale):
   a busy loop on the process's CPU clock, not a sleep, so a peer is as busy as it was;
3. it writes each output at its recorded size (already multiplied by the size scale), filled
   with a line naming the file and the task, so no two outputs share a digest by accident.

The loader (bonjourgrid/dag/wfformat.py) stages this file into every task's sandbox as an
input. It runs under whatever Python 3 the worker's PATH offers (`[wfformat] python`), so it
uses the standard library only and no syntax newer than Python 3.6.

    python3 .bgrid-standin.py --task=ID [--program=NAME] [--cpu-seconds=S]
            [--in=PATH... | --in-count=N] [--out=PATH=BYTES]...
"""

import argparse
import os
import sys
import time

_CHUNK = 1 << 20  # bytes written at a time
_CLOCK_EVERY = 20000  # loop turns between two looks at the CPU clock (about a millisecond)


def burn_cpu(seconds: float) -> float:
    """Keep one core busy until this process has used `seconds` of CPU; the work done."""
    end = time.process_time() + seconds
    total = 0.0
    while time.process_time() < end:
        for turn in range(_CLOCK_EVERY):
            total += turn * 0.5
    return total


def write_output(path: str, size: int, task: str) -> None:
    """`size` bytes at `path` (its folders made), filled with a line naming it and the task."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    line = f"bgrid stand-in output {path} of task {task}\n".encode()
    block = line * (_CHUNK // len(line) + 1)
    with open(path, "wb") as out:
        left = size
        while left > 0:
            piece = block[: min(left, _CHUNK)]
            out.write(piece)
            left -= len(piece)


def files_here(leave_out: "set[str]") -> int:
    """How many regular files the working directory holds, in its folders too."""
    found = 0
    for folder, _, names in os.walk("."):
        for name in names:
            path = os.path.normpath(os.path.join(folder, name))
            found += path not in leave_out and os.path.isfile(path)
    return found


def _output(text: str) -> "tuple[str, int]":
    path, sep, size = text.rpartition("=")
    if not sep or not path or not size.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not PATH=BYTES")
    return path, int(size)


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(prog="bgrid-standin", description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, help="the task's id in the instance")
    parser.add_argument("--program", default="", help="the recorded program it stands in for")
    parser.add_argument("--cpu-seconds", type=float, default=0.0, help="CPU time to burn")
    parser.add_argument("--in", dest="inputs", action="append", default=[], metavar="PATH")
    parser.add_argument("--in-count", type=int, default=0, help="inputs too many to name")
    parser.add_argument(
        "--out", dest="outputs", action="append", default=[], type=_output, metavar="PATH=BYTES"
    )
    args = parser.parse_args(argv)
    who = f"stand-in for {args.program or 'task'} {args.task}"
    missing = [path for path in args.inputs if not os.path.isfile(path)]
    if missing:
        print(f"{who}: missing input(s): {', '.join(missing)}", file=sys.stderr)
        return 1
    if args.in_count:
        ours = {os.path.normpath(path) for path, _ in args.outputs}
        ours.add(os.path.basename(__file__))
        present = files_here(ours)
        if present < args.in_count:
            print(f"{who}: {args.in_count} inputs expected, {present} found", file=sys.stderr)
            return 1
    started = time.process_time()
    burn_cpu(max(args.cpu_seconds, 0.0))
    burnt = time.process_time() - started
    for path, size in args.outputs:
        write_output(path, size, args.task)
    print(
        f"{who}: read {len(args.inputs) or args.in_count} input(s), burnt {burnt:.3f} s of CPU,"
        f" wrote {len(args.outputs)} output(s), "
        f"{sum(size for _, size in args.outputs)} bytes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
