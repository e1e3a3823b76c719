"""The digest cache: an unchanged submit directory is not read again by the next submit."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pytest

from bonjourgrid.cache import digests
from bonjourgrid.cache.digests import DIGESTS_FILE, DigestCache
from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator.stage import stage_sources
from bonjourgrid.dag import workflow_from_mapping
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(20)

SETTLE_S = 0.05  # the racy window in these tests: a file this old has a stamp of its own


@pytest.fixture(autouse=True)
def short_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digests, "RACY_S", SETTLE_S)


def ref_of(data: bytes) -> FileRef:
    return FileRef(hashlib.sha256(data).hexdigest(), len(data))


def settled(path: Path) -> None:
    """Wait until the file's newest stamp is older than the racy window."""

    def old_enough() -> bool:
        st = path.stat()
        return time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLE_S * 2e9

    wait_until(old_enough, 5.0, f"{path} to be older than the racy window")


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    settled(path)
    return path


def test_an_unchanged_file_is_not_read_again(tmp_path: Path) -> None:
    data = write(tmp_path / "in.bin", b"x" * 5000)
    first = DigestCache(tmp_path / "digests.json")
    assert first.hash(data) == ref_of(b"x" * 5000)
    first.save()
    again = DigestCache(tmp_path / "digests.json")
    assert again.hash(data) == ref_of(b"x" * 5000)
    assert (again.hits, again.hashed) == (1, 0)


def test_a_file_rewritten_with_its_old_size_and_mtime_is_hashed_again(tmp_path: Path) -> None:
    """`cp -p` or `touch -d` can put the mtime back; the ctime still moves."""
    data = write(tmp_path / "in.bin", b"a" * 100)
    cache = DigestCache(tmp_path / "digests.json")
    cache.hash(data)
    cache.save()
    before = data.stat()
    data.write_bytes(b"b" * 100)
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert data.stat().st_size == before.st_size and data.stat().st_mtime_ns == before.st_mtime_ns
    again = DigestCache(tmp_path / "digests.json")
    assert again.hash(data) == ref_of(b"b" * 100)
    assert (again.hits, again.hashed) == (0, 1)


def test_a_file_replaced_by_another_is_hashed_again(tmp_path: Path) -> None:
    data = write(tmp_path / "in.bin", b"old")
    cache = DigestCache(tmp_path / "digests.json")
    cache.hash(data)
    cache.save()
    os.replace(write(tmp_path / "new.bin", b"new"), data)  # another inode at the same path
    assert DigestCache(tmp_path / "digests.json").hash(data) == ref_of(b"new")


def test_a_file_changed_a_moment_ago_is_not_remembered(tmp_path: Path) -> None:
    """Within one timestamp tick a second write would leave every stamp as it is."""
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"just written")
    cache = DigestCache(tmp_path / "digests.json")
    assert cache.hash(fresh) == ref_of(b"just written")
    cache.save()
    assert not (tmp_path / "digests.json").exists()


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"v": 1, "files": []}',
        '{"v": 1, "files": {"/x": [1, 2, 3, 4, 5, "not a digest"]}}',
        '{"v": 1, "files": {"/x": [1, -2, 3, 4, 5, "' + "0" * 64 + '"]}}',
        '{"v": 99, "files": {}}',
    ],
    ids=["garbage", "wrong-shape", "bad-digest", "negative", "other-version"],
)
def test_a_damaged_cache_is_ignored(tmp_path: Path, content: str) -> None:
    data = write(tmp_path / "in.bin", b"payload")
    (tmp_path / "digests.json").write_text(content)
    cache = DigestCache(tmp_path / "digests.json")
    assert cache.hash(data) == ref_of(b"payload")
    assert cache.hashed == 1


async def test_a_second_submit_hashes_only_the_inputs_that_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "job"
    write(root / "big.bin", b"B" * 300_000)
    write(root / "small.txt", b"small")
    shared = write(tmp_path / "shared" / "ref.fa", b">ref\nACGT\n")
    spec = {"a": {"command": "true", "inputs": ["big.bin", "small.txt", shared.as_uri()]}}
    wf = workflow_from_mapping({"name": "t", "tasks": spec}, root)
    caplog.set_level(logging.INFO, logger="bonjourgrid.coordinator.stage")

    first = await stage_sources(wf, {})
    assert "3 hashed, 0 unchanged" in caplog.text
    assert (root / DIGESTS_FILE).is_file()
    caplog.clear()
    assert await stage_sources(wf, {}) == first
    assert "0 hashed, 3 unchanged" in caplog.text

    write(root / "small.txt", b"SMALL")  # same size, other bytes
    caplog.clear()
    third = await stage_sources(wf, {})
    assert "1 hashed, 2 unchanged" in caplog.text
    assert third["small.txt"].ref == ref_of(b"SMALL")
    assert third["big.bin"] == first["big.bin"]
    remembered = json.loads((root / DIGESTS_FILE).read_text())["files"]
    assert str(root / "small.txt") in remembered
