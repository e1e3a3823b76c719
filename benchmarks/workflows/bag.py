"""Transfer-bound bag of tasks: N independent tasks, each reading its own input of S bytes
and computing for C seconds. With the coordinator's 100 Mbit/s link shared by every peer,
moving one wave of inputs takes about as long as computing it: prefetching the next wave
while this one computes is what `lookahead` is for (think: a parameter sweep over
per-sample data files)."""

from __future__ import annotations

from pathlib import Path

from workflows import Workflow, random_file, write_yaml


def build(
    root: Path, n_tasks: int, size: int, compute_s: float, workers: int, name: str = "bag"
) -> Workflow:
    """Generate the inputs and the workflow file in `root` (a fresh submit directory)."""
    root.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, object] = {}
    finals = []
    for j in range(n_tasks):
        src, out = f"in/{j}.bin", f"out/{j}.txt"
        random_file(root / src, size)
        tasks[f"sample_{j}"] = {
            # the digest is the "result"; the sleep stands for the analysis (no CPU: the
            # benchmark machine's two cores must not decide the makespan)
            "command": f"mkdir -p out && sha256sum {src} > {out} && sleep {compute_s:g}",
            "inputs": [src],
            "outputs": [out],
        }
        finals.append(out)
    path = root / f"{name}.yaml"
    write_yaml(path, name, workers, tasks)
    return Workflow(name, path, n_tasks * size, tuple(finals))
