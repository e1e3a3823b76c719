"""URL inputs in a workflow and the submit settings (bgrid.toml): what a user writes and is told."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bonjourgrid.cli import build_parser
from bonjourgrid.coordinator.copies import SpeculationSettings
from bonjourgrid.coordinator.prefetch import DataOptions, PrefetchSettings
from bonjourgrid.coordinator.submit import data_options, read_config, schedule_options
from bonjourgrid.dag import workflow_from_mapping
from bonjourgrid.dag.urls import file_url_path, is_url, url_input_path
from bonjourgrid.errors import ConfigError, DagError


def task(command: str = "true", **fields: Any) -> dict[str, Any]:
    return {"command": command, **fields}


def load(root: Path | str = "/nonexistent", **tasks: object) -> Any:
    return workflow_from_mapping({"name": "t", "tasks": tasks}, root, source="wf.yaml")


def dag_error(root: Path | str = "/nonexistent", **tasks: object) -> str:
    with pytest.raises(DagError) as caught:
        load(root, **tasks)
    return str(caught.value)


# ---------------------------------------------------------------------------------------------
# URL inputs: the name a task sees


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("https://example.org/data/genome.fa", "genome.fa"),
        ("http://example.org:8080/a/b/table.csv?version=3#top", "table.csv"),
        ("https://example.org/files/my%20data%2Bmore.txt", "my data+more.txt"),
        ("file:///srv/shared/ref.fa", "ref.fa"),
        ("file://localhost/srv/shared/ref.fa", "ref.fa"),
        ("HTTPS://EXAMPLE.ORG/X.TXT", "X.TXT"),
    ],
)
def test_a_url_input_is_seen_at_its_last_path_segment(url: str, path: str) -> None:
    assert is_url(url)
    assert url_input_path(url) == path


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://example.org/", "does not end in a file name; name the file: {url: "),
        ("https://example.org", "does not end in a file name"),
        ("https://example.org/a/..", "does not end in a file name"),
        ("https://example.org/%2E%2E", "does not end in a file name"),
        ("https://example.org/a%2Fb", "encoded '/'"),
        ("https://example.org/~x", "cannot be a file name"),
        ("ftp://example.org/x.txt", "ftp:// URLs cannot be inputs; use http://, https://"),
        ("s3://bucket/x.txt", "s3:// URLs cannot be inputs"),
        ("file://otherhost/x.txt", "names host 'otherhost'"),
        ("https:///x.txt", "has no host"),
        ("https://example.org:http/x", "is not a valid URL"),
    ],
)
def test_a_url_without_a_usable_name_or_scheme_says_what_to_do(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        url_input_path(url)
    assert problem in str(caught.value)


def test_paths_that_merely_contain_a_colon_are_paths() -> None:
    assert not is_url("a:b.txt") and not is_url("dir/x://y") and not is_url("1http://x/y")
    assert file_url_path("file:///srv/a%20b/c.txt") == Path("/srv/a b/c.txt")


def test_url_inputs_become_sandbox_paths_and_workflow_urls() -> None:
    wf = load(
        fetch=task(
            inputs=[
                "https://example.org/data/genome.fa",
                {"url": "https://example.org/v2/genome.fa", "path": "ref/genome-v2.fa"},
                {"url": "http://example.org/x/reads.fq"},
            ],
            outputs=["out.txt"],
        ),
        again=task(inputs=["https://example.org/data/genome.fa", "genome.fa"], outputs=["o2"]),
    )
    assert wf.tasks["fetch"].inputs == ("genome.fa", "ref/genome-v2.fa", "reads.fq")
    # the URL and the plain path name one file: a task listing both sees it once
    assert wf.tasks["again"].inputs == ("genome.fa",)
    assert wf.urls == {
        "genome.fa": "https://example.org/data/genome.fa",
        "ref/genome-v2.fa": "https://example.org/v2/genome.fa",
        "reads.fq": "http://example.org/x/reads.fq",
    }
    assert wf.source_inputs() == ["genome.fa", "reads.fq", "ref/genome-v2.fa"]
    assert wf.graph.number_of_edges() == 0


def test_a_workflow_without_urls_has_none() -> None:
    assert load(a=task(outputs=["x"]), b=task(inputs=["x"], outputs=["y"])).urls == {}


def test_a_url_input_is_not_looked_for_in_the_submit_directory(tmp_path: Path) -> None:
    wf = load(tmp_path, a=task(inputs=["https://example.org/big.bin", "big.bin"], outputs=["o"]))
    assert wf.urls == {"big.bin": "https://example.org/big.bin"}


def test_two_urls_under_one_name_is_an_error_naming_both_tasks() -> None:
    message = dag_error(
        a=task(inputs=["https://one.example/data.csv"], outputs=["x"]),
        b=task(inputs=["https://two.example/data.csv"], outputs=["y"]),
    )
    assert "task 'b': inputs[0]: 'data.csv' would be both https://one.example/data.csv" in message
    assert "(task 'a') and https://two.example/data.csv" in message
    assert "{url: URL, path: NAME}" in message


def test_a_url_path_that_a_task_writes_is_an_error_naming_both_tasks() -> None:
    message = dag_error(
        make=task(outputs=["data.csv"]),
        use=task(inputs=["https://example.org/data.csv"], outputs=["y"]),
    )
    assert "task 'make' writes 'data.csv', which task 'use' reads from" in message
    assert "https://example.org/data.csv; rename the output" in message


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ({"url": "https://example.org/x", "name": "y"}, "unknown keys ['name']; an input mapping"),
        ({"path": "y"}, "url None is not a URL"),
        ({"url": "data/x.csv", "path": "y"}, "url 'data/x.csv' is not a URL"),
        ({"url": "ftp://h/x", "path": "y"}, "ftp:// URLs cannot be inputs"),
        ({"url": "https://h/x", "path": "../y"}, "escapes the task directory"),
        ("https://example.org/", "name the file"),
    ],
)
def test_bad_url_inputs_name_the_task_and_item(item: object, problem: str) -> None:
    message = dag_error(a=task(inputs=["ok.txt", item], outputs=["o"]))
    assert "task 'a': inputs[1]: " in message and problem in message


def test_a_url_cannot_be_an_output() -> None:
    message = dag_error(a=task(outputs=["https://example.org/x.txt"]))
    assert (
        "task 'a': outputs[0]: 'https://example.org/x.txt' is a URL; outputs are files" in message
    )


def test_a_file_url_must_name_a_file(tmp_path: Path) -> None:
    (tmp_path / "here.txt").write_text("x")
    here = (tmp_path / "here.txt").as_uri()
    assert load(tmp_path, a=task(inputs=[here], outputs=["o"])).urls == {"here.txt": here}
    message = dag_error(tmp_path, a=task(inputs=[(tmp_path / "gone.txt").as_uri()], outputs=["o"]))
    assert f"task 'a': input {(tmp_path / 'gone.txt').as_uri()} is not a file" in message
    message = dag_error(tmp_path, a=task(inputs=[{"url": tmp_path.as_uri(), "path": "d"}]))
    assert "is a directory" in message


# ---------------------------------------------------------------------------------------------
# Submit settings: flags, then bgrid.toml, then the user's config.toml


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(submit directory, user config file) with no config in either."""
    return tmp_path / "job", tmp_path / "home" / "config.toml"


def test_no_config_means_the_defaults(dirs: tuple[Path, Path]) -> None:
    submit_dir, user = dirs
    assert data_options(submit_dir, user_config=user) == DataOptions()
    assert DataOptions().prefetch.policy == "lookahead"


def test_flags_win_then_bgrid_toml_then_the_user_config_key_by_key(
    dirs: tuple[Path, Path],
) -> None:
    submit_dir, user = dirs
    write(
        user,
        '[prefetch]\npolicy = "eager"\ndepth = 5\nmax_bytes = 1000\n'
        "broadcast_min_consumers = 9\n[submit]\nfetch_all = true\n",
    )
    write(submit_dir / "bgrid.toml", '[prefetch]\ndepth = 3\nmax_bytes = "2GiB"\n')
    assert data_options(submit_dir, user_config=user) == DataOptions(
        PrefetchSettings(policy="eager", depth=3, max_bytes=2 * 1024**3, broadcast_min_consumers=9),
        fetch_all=True,
    )
    flagged = data_options(
        submit_dir, prefetch="critical-path", depth=0, fetch_all=False, user_config=user
    )
    assert flagged.prefetch.policy == "critical-path" and flagged.prefetch.depth == 0
    assert flagged.fetch_all is False and flagged.prefetch.max_bytes == 2 * 1024**3


def test_the_user_config_lives_in_xdg_config_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    write(tmp_path / "xdg" / "bonjourgrid" / "config.toml", '[prefetch]\npolicy = "none"\n')
    assert data_options(tmp_path / "job").prefetch.policy == "none"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[prefech]\ndepth = 1\n", "unknown table [prefech] (did you mean 'prefetch'?)"),
        ("[grid]\nx = 1\n", "unknown table [grid] (known: prefetch, submit, schedule, wfformat)"),
        ("depth = 1\n", "unknown key 'depth'"),
        ("[prefetch]\ndepht = 1\n", "unknown key 'depht' in [prefetch] (did you mean 'depth'?)"),
        ("[submit]\nfetch_all = 1\n", "[submit] fetch_all = 1: expected true or false"),
        ("[prefetch]\ndepth = true\n", "[prefetch] depth = True: expected a whole number"),
        ("[prefetch]\ndepth = 1.5\n", "[prefetch] depth = 1.5: expected a whole number"),
        ("[prefetch]\npolicy = 3\n", "[prefetch] policy = 3: expected a string: none, lookahead"),
        ("[prefetch\n", "not valid TOML"),
    ],
)
def test_config_file_mistakes_name_the_file_and_key(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = write(tmp_path / "bgrid.toml", text)
    with pytest.raises(ConfigError) as caught:
        read_config(path)
    assert str(caught.value).startswith(str(path)) and problem in str(caught.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[prefetch]\npolicy = "lazy"\n', "[prefetch] policy = 'lazy': choose one of none, look"),
        ("[prefetch]\ndepth = -1\n", "[prefetch] depth = -1: give a whole number, 0 or more"),
        ('[prefetch]\nmax_bytes = "lots"\n', "[prefetch] max_bytes: 'lots' is not a size"),
        (
            "[prefetch]\nbroadcast_min_consumers = -2\n",
            "[prefetch] broadcast_min_consumers = -2: give",
        ),
    ],
)
def test_config_values_are_checked(dirs: tuple[Path, Path], text: str, problem: str) -> None:
    submit_dir, user = dirs
    write(submit_dir / "bgrid.toml", text)
    with pytest.raises(ConfigError) as caught:
        data_options(submit_dir, user_config=user)
    assert f"{submit_dir / 'bgrid.toml'}: {problem}" in str(caught.value)


def test_a_bad_flag_value_names_the_flag(dirs: tuple[Path, Path]) -> None:
    submit_dir, user = dirs
    with pytest.raises(ConfigError, match=r"^--prefetch-depth -1: give a whole number, 0 or more"):
        data_options(submit_dir, depth=-1, user_config=user)


def test_a_bad_user_config_is_an_error_even_when_bgrid_toml_is_fine(
    dirs: tuple[Path, Path],
) -> None:
    submit_dir, user = dirs
    write(user, "[prefetch]\nwhatever = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'whatever'"):
        data_options(submit_dir, user_config=user)


def test_submit_flags_parse() -> None:
    parser = build_parser()
    args = parser.parse_args(["submit", "wf.yaml"])
    assert (args.prefetch, args.prefetch_depth, args.fetch_all) == (None, None, None)
    args = parser.parse_args(
        ["submit", "wf.yaml", "--prefetch", "critical-path", "--prefetch-depth", "4", "--fetch-all"]
    )
    assert (args.prefetch, args.prefetch_depth, args.fetch_all) == ("critical-path", 4, True)
    assert parser.parse_args(["submit", "wf.yaml", "--no-fetch-all"]).fetch_all is False
    with pytest.raises(SystemExit):
        parser.parse_args(["submit", "wf.yaml", "--prefetch", "sometimes"])


def test_schedule_settings_set_when_a_straggler_gets_a_copy(tmp_path: Path) -> None:
    assert not schedule_options(tmp_path, user_config=tmp_path / "none.toml").enabled
    write(
        tmp_path / "bgrid.toml",
        "[schedule]\nspeculation_factor = 2.5\nspeculation_min_s = 10\n"
        "speculation_min_siblings = 4\n",
    )
    settings = schedule_options(tmp_path, user_config=tmp_path / "none.toml")
    assert settings == SpeculationSettings(factor=2.5, min_runtime_s=10.0, min_siblings=4)
    assert settings.threshold(2.0) == 10.0 and settings.threshold(8.0) == 20.0
    write(tmp_path / "bgrid.toml", "[schedule]\nspeculation_factor = 1\n")
    with pytest.raises(ConfigError, match=r"speculation_factor = 1: give 0 \(never\) or a factor"):
        schedule_options(tmp_path, user_config=tmp_path / "none.toml")
