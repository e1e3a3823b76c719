"""`bgrid examples DIR`: the shipped examples come out of the package and run from there."""

from __future__ import annotations

import json
from pathlib import Path

from bonjourgrid.dag.examples import examples_root
from tests.multiproc.conftest import Grid

REPO_EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "dags"


def test_the_examples_are_copied_out_and_hello_runs(tmp_path: Path, grid: Grid) -> None:
    dest = tmp_path / "ex"
    out = grid.run("examples", str(dest), check=True)
    assert "hello.yaml" in out.stdout
    for path in ("hello.yaml", "name.txt", "montage/montage.yaml", "wordcount/text/part-1.txt"):
        assert (dest / path).is_file(), path
    assert not (dest / ".bgrid").exists() and not (dest / "hello.txt").exists()
    out = grid.run("submit", str(dest / "hello.yaml"), "--local", "2", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "succeeded"
    assert (dest / "hello.txt").read_text() == "HELLO, WORLD!\n-- sent by BonjourGrid\n"
    again = grid.run("examples", str(dest))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_the_repository_folder_is_the_package_data() -> None:
    assert REPO_EXAMPLES.resolve() == examples_root().resolve()
