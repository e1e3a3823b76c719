"""Reference workflow: one big file of R bytes read whole by every one of M tasks, each
writing a small result after a few seconds of work (think: aligning reads against one
genome)."""

from __future__ import annotations

from pathlib import Path

from workflows import Workflow, random_file, write_yaml


def build(
    root: Path,
    n_tasks: int,
    size: int,
    workers: int,
    compute_s: float = 4.0,
    name: str = "reference",
) -> Workflow:
    """Generate the big file and the workflow file in `root` (a fresh submit directory)."""
    root.mkdir(parents=True, exist_ok=True)
    big = "ref/big.bin"
    random_file(root / big, size)
    tasks: dict[str, object] = {}
    finals = []
    for j in range(n_tasks):
        out = f"res/{j}.txt"
        tasks[f"scan_{j}"] = {
            # the sleep stands for the analysis: long enough that the big file is worth
            # spreading to every peer rather than running every task where it first lands
            "command": f"mkdir -p res && sha256sum {big} | sed 's/$/ {j}/' > {out}"
            f" && sleep {compute_s:g}",
            "inputs": [big],
            "outputs": [out],
        }
        finals.append(out)
    path = root / f"{name}.yaml"
    write_yaml(path, name, workers, tasks)
    return Workflow(name, path, size, tuple(finals), big_file_bytes=size)
