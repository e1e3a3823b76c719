"""Sizes mean one thing everywhere: K, M, G, T (with B, iB or nothing) are powers of 1024."""

from __future__ import annotations

from pathlib import Path

import pytest

from bonjourgrid.cli import build_parser
from bonjourgrid.coordinator.submit import data_options
from bonjourgrid.requirements import Requirement
from bonjourgrid.units import parse_size
from bonjourgrid.worker.config import worker_settings
from bonjourgrid.worker.limits import check_memory

GIB = 1024**3


@pytest.mark.parametrize("unit", ["G", "GB", "Gi", "GiB", "g", "gb", "gib"])
def test_every_spelling_of_a_gigabyte_is_a_gibibyte(unit: str) -> None:
    assert parse_size(f"4{unit}") == 4 * GIB


@pytest.mark.parametrize(
    ("text", "size"),
    [("1K", 1024), ("1KB", 1024), ("1M", 1024**2), ("1MB", 1024**2), ("1T", 1024**4)],
)
def test_k_m_t_are_powers_of_1024(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_every_place_that_reads_a_size_reads_4g_as_4_gib(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[worker]\nram = "4G"\ncache_size = "4GB"\n')
    argv = ["worker", "--ram", "4G"]
    from_flag = worker_settings(vars(build_parser().parse_args(argv)), config)
    from_file = worker_settings(vars(build_parser().parse_args(["worker"])), config)
    assert from_flag.ram_mib == from_file.ram_mib == 4096
    assert from_file.cache_size == 4 * GIB
    (tmp_path / "bgrid.toml").write_text('[prefetch]\nmax_bytes = "4G"\n')
    user = tmp_path / "none.toml"
    assert data_options(tmp_path, user_config=user).prefetch.max_bytes == 4 * GIB
    assert check_memory("4G") == 4 * GIB  # a workflow's limits: {memory: 4G}
    assert Requirement.parse("ram>=4G and ram<=4G").matches({"ram": "4096"})
