"""Three-stage pipeline: N inputs of S bytes -> stage1 doubles each (2S) -> stage2 transforms
(same size) -> stage3 reduces each to a small digest. Intermediates are 4x the inputs."""

from __future__ import annotations

from pathlib import Path

from workflows import Workflow, random_file, write_yaml


def build(root: Path, n_inputs: int, size: int, workers: int, name: str = "pipeline") -> Workflow:
    """Generate the inputs and the workflow file in `root` (a fresh submit directory)."""
    root.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, object] = {}
    finals = []
    for i in range(n_inputs):
        src, mid, xf, out = f"in/{i}.bin", f"mid/{i}.bin", f"xf/{i}.bin", f"out/{i}.sha"
        random_file(root / src, size)
        tasks[f"expand_{i}"] = {
            "command": f"mkdir -p mid && cat {src} {src} > {mid}",
            "inputs": [src],
            "outputs": [mid],
        }
        tasks[f"transform_{i}"] = {
            "command": f"mkdir -p xf && tr 'a-z' 'A-Z' < {mid} > {xf}",
            "inputs": [mid],
            "outputs": [xf],
        }
        tasks[f"reduce_{i}"] = {
            "command": f"mkdir -p out && sha256sum {xf} > {out}",
            "inputs": [xf],
            "outputs": [out],
        }
        finals.append(out)
    path = root / f"{name}.yaml"
    write_yaml(path, name, workers, tasks)
    return Workflow(name, path, n_inputs * size, tuple(finals))
