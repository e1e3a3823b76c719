"""The content store on a real file system: digests name files, entries are shared by hard links."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path

import pytest

from bonjourgrid.cache.store import ContentStore, FileIndex, FileRef, hash_file, is_digest

MIB = 1024 * 1024


def ref_of(data: bytes) -> FileRef:
    return FileRef(hashlib.sha256(data).hexdigest(), len(data))


def put(store: ContentStore, data: bytes) -> FileRef:
    """Commit `data` the way a fetch does: write to the incoming path, then commit."""
    ref = ref_of(data)
    partial = store.incoming_path(ref.digest)
    partial.write_bytes(data)
    store.commit(partial, ref.digest)
    return ref


def writable(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "cache")


def test_a_committed_file_is_found_by_its_digest(store: ContentStore) -> None:
    ref = put(store, b"hello grid\n")
    path = store.locate(ref.digest)
    assert path is not None and path.read_bytes() == b"hello grid\n"
    assert store.has(ref)
    assert not store.has(FileRef(ref.digest, ref.size + 1))  # same digest, wrong size
    assert not store.incoming_path(ref.digest).exists()  # moved, not copied


def test_an_unknown_digest_is_not_found(store: ContentStore) -> None:
    ref = ref_of(b"never stored")
    assert store.locate(ref.digest) is None
    assert not store.has(ref)


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "",
        "ab" * 31 + "a",  # 63 hex digits
        "ab" * 32 + "a",  # 65
        "AB" * 32,  # upper case is another name
        "g" * 64,
        "../" + "a" * 61,
        "/" + "a" * 63,
    ],
)
def test_locate_refuses_anything_but_a_digest(store: ContentStore, name: str) -> None:
    assert not is_digest(name)
    assert store.locate(name) is None


def test_stored_entries_are_read_only(store: ContentStore, tmp_path: Path) -> None:
    committed = store.locate(put(store, b"fetched").digest)
    output = tmp_path / "out.txt"
    output.write_bytes(b"made by a task")
    adopted = store.locate(store.adopt(output).digest)
    assert committed is not None and adopted is not None
    assert not writable(committed)
    assert not writable(adopted)


def test_adopt_moves_the_file_in_and_leaves_a_hard_link(
    store: ContentStore, tmp_path: Path
) -> None:
    output = tmp_path / "sandbox" / "out.txt"
    output.parent.mkdir()
    output.write_bytes(b"result\n")
    ref = store.adopt(output)
    assert ref == ref_of(b"result\n")
    stored = store.locate(ref.digest)
    assert stored is not None and stored.read_bytes() == b"result\n"
    assert output.read_bytes() == b"result\n"  # the task directory still shows it
    assert os.stat(output).st_ino == os.stat(stored).st_ino
    assert os.stat(stored).st_nlink == 2


def test_adopting_a_twin_keeps_one_copy(store: ContentStore, tmp_path: Path) -> None:
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_bytes(b"same bytes")
    second.write_bytes(b"same bytes")
    assert store.adopt(first) == store.adopt(second)
    stored = store.locate(ref_of(b"same bytes").digest)
    assert stored is not None
    assert os.stat(first).st_ino == os.stat(second).st_ino == os.stat(stored).st_ino
    assert os.stat(stored).st_nlink == 3


def test_link_into_hard_links_an_entry_into_a_sandbox(store: ContentStore, tmp_path: Path) -> None:
    ref = put(store, b"input bytes")
    stored = store.locate(ref.digest)
    assert stored is not None
    dest = tmp_path / "sandbox" / "raw" / "1.fits"  # parents are created
    store.link_into(ref.digest, dest)
    assert dest.read_bytes() == b"input bytes"
    assert os.stat(dest).st_ino == os.stat(stored).st_ino
    assert os.stat(stored).st_nlink == 2


def test_linking_onto_an_existing_link_never_changes_a_stored_entry(
    store: ContentStore, tmp_path: Path
) -> None:
    # What a `run` naming the same input path twice (with different digests) makes happen.
    first, second = put(store, b"first input!"), put(store, b"other input!")
    dest = tmp_path / "sandbox" / "in.txt"
    store.link_into(first.digest, dest)
    with contextlib.suppress(OSError):  # refusing is fine; changing the entry is not
        store.link_into(second.digest, dest)
    stored = store.locate(first.digest)
    assert stored is not None and hash_file(stored) == first


def test_entries_survive_a_restart(store: ContentStore) -> None:
    ref = put(store, b"persistent")
    again = ContentStore(store.root)
    assert again.has(ref)


def test_hash_file_of_an_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.touch()
    assert hash_file(empty) == FileRef(hashlib.sha256(b"").hexdigest(), 0)


def test_hash_file_of_a_multi_mib_file(tmp_path: Path) -> None:
    data = os.urandom(3 * MIB + MIB // 2 + 7)  # spans several read blocks, ends mid-block
    path = tmp_path / "big"
    path.write_bytes(data)
    assert hash_file(path) == ref_of(data)


def test_file_index_serves_files_where_they_are(tmp_path: Path) -> None:
    path = tmp_path / "submit" / "project.py"
    path.parent.mkdir()
    path.write_bytes(b"print('hi')\n")
    index = FileIndex()
    ref = index.add(path)
    assert ref == ref_of(b"print('hi')\n")
    assert index.locate(ref.digest) == path  # the original, not a copy
    assert index.locate(ref_of(b"other").digest) is None
    assert index.locate("../../etc/passwd") is None


def test_file_index_trusts_a_known_ref(tmp_path: Path) -> None:
    path = tmp_path / "big.dat"
    path.write_bytes(b"x")
    known = FileRef("cd" * 32, 1)  # hashed earlier, e.g. by a resumed job's journal
    index = FileIndex()
    assert index.add(path, known) == known
    assert index.locate(known.digest) == path
