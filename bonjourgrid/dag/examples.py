"""The example workflows shipped inside the package (`bgrid examples DIR`), so that they run
after a plain `pip install`: the workflow files and their inputs, never what a run of them
left beside them (outputs, `.bgrid/`)."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from bonjourgrid.dag.loader import load_workflow
from bonjourgrid.errors import ConfigError

_SKIPPED_DIRS = {".bgrid", "__pycache__"}


def examples_root() -> Path:
    """The directory holding the examples (bonjourgrid/examples; examples/dags in the repo)."""
    return Path(str(resources.files("bonjourgrid") / "examples"))


def copy_examples(dest: Path, force: bool = False) -> list[Path]:
    """Copy the examples into `dest` (made if missing); the copied files, relative."""
    root = examples_root()
    if dest.exists() and any(dest.iterdir()) and not force:
        raise ConfigError(f"{dest} is not empty: give an empty or new directory, or --force")
    made: set[Path] = set()
    for workflow in (*root.rglob("*.yaml"), *root.rglob("*.dag")):
        wf = load_workflow(workflow)
        made |= {(wf.root / path).relative_to(root) for path in wf.producer}
    copied = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or relative in made or _SKIPPED_DIRS & set(relative.parts):
            continue
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / relative)
        copied.append(relative)
    return copied
