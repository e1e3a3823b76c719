"""The shipped example workflows run: each command, in its own sandbox, makes what it promises."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from bonjourgrid.dag import Workflow, load_workflow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "dags"


def run_locally(wf: Workflow, work: Path) -> Path:
    """Run every task as a peer would: a sandbox holding only its inputs; returns the outputs."""
    made = work / "made"  # every task output, at its relative path
    for name in wf.topological_order():
        task = wf.tasks[name]
        sandbox = work / "sandbox" / name
        sandbox.mkdir(parents=True)
        for path in task.inputs:
            source = made / path if path in wf.producer else wf.root / path
            (sandbox / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, sandbox / path)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(sandbox), **task.env}
        result = subprocess.run(
            ["sh", "-c", task.command],
            cwd=sandbox,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, f"task {name} exited {result.returncode}: {result.stderr}"
        assert result.stderr == "", f"task {name} complained: {result.stderr}"
        for path in task.outputs:
            assert (sandbox / path).is_file(), f"task {name} did not write {path}"
            (made / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sandbox / path, made / path)
    return made


def test_hello(tmp_path: Path) -> None:
    made = run_locally(load_workflow(EXAMPLES / "hello.yaml"), tmp_path)
    assert (made / "greeting.txt").read_text() == "Hello, world!\n"
    assert (made / "hello.txt").read_text() == "HELLO, WORLD!\n-- sent by BonjourGrid\n"


def test_diamond(tmp_path: Path) -> None:
    made = run_locally(load_workflow(EXAMPLES / "diamond.yaml"), tmp_path)
    assert (made / "diamond.txt").read_text().splitlines() == [
        "count 100",
        "sum 5050",
        "squares 338350",
        "evens 50",
        "min 1",
        "max 100",
    ]


def test_wordcount_agrees_with_python(tmp_path: Path) -> None:
    wf = load_workflow(EXAMPLES / "wordcount" / "wordcount.yaml")
    made = run_locally(wf, tmp_path)
    words = Counter(
        word.lower()
        for path in sorted((wf.root / "text").glob("part-*.txt"))
        for word in re.findall(r"[A-Za-z]+", path.read_text())
    )
    ranked = sorted(words.items(), key=lambda item: (-item[1], item[0]))
    assert (made / "totals.txt").read_text().splitlines() == [f"{n} {w}" for w, n in ranked]
    report = (made / "wordcount.txt").read_text().splitlines()
    assert report[:3] == [f"words: {sum(words.values())}", f"distinct: {len(words)}", "top 20:"]
    assert report[3:] == [f"{n} {w}" for w, n in ranked[:20]]
    assert report[3] == f"{words['the']} the"
    assert sum(words.values()) > 1500


@pytest.mark.parametrize("part", [1, 2, 3, 4])
def test_wordcount_parts_are_a_few_kilobytes(part: int) -> None:
    size = (EXAMPLES / "wordcount" / "text" / f"part-{part}.txt").stat().st_size
    assert 2000 <= size <= 8000


def test_montage_levels_the_tiles_and_adds_them_into_a_mosaic(tmp_path: Path) -> None:
    wf = load_workflow(EXAMPLES / "montage" / "montage.yaml")
    made = run_locally(wf, tmp_path)

    def mean(path: Path) -> float:
        values = [float(v) for v in path.read_text().split()]
        return sum(values) / len(values)

    # after background correction every tile has the first one's mean level
    means = [mean(made / "corr" / f"{k}.txt") for k in (1, 2, 3, 4)]
    assert max(means) - min(means) < 0.01
    mosaic = (made / "mosaic.txt").read_text().splitlines()
    assert len(mosaic) == 4 and all(len(row.split()) == 24 for row in mosaic)
    assert len((made / "mosaic_small.txt").read_text().splitlines()) == 4
    assert sorted(wf.final_outputs()) == ["mosaic_small.txt"]


def test_condor_j8(tmp_path: Path) -> None:
    """The seed's Condor DAG: its staged job.sh has no exec bit in a sandbox, and runs."""
    made = run_locally(load_workflow(EXAMPLES / "condor-j8" / "j8.dag"), tmp_path)
    values = {n: int((made / f"j{n}.out").read_text()) for n in range(1, 8)}
    assert values == {1: 1, 2: 3, 3: 4, 4: 7, 5: 8, 6: 10, 7: 22}
    assert (made / "results" / "j8.out").read_text() == "40\n"
