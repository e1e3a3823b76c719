"""The remote cache: staging submit-directory files, file:// URLs and http(s) downloads.

A real HTTP server (the standard library's, in a thread on 127.0.0.1) serves the URL inputs;
it records every request, so a test can tell a download from a 304.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bonjourgrid.cache.store import FileRef
from bonjourgrid.coordinator import stage
from bonjourgrid.coordinator.stage import StagedFile, remote_dir, stage_sources
from bonjourgrid.dag import Workflow, workflow_from_mapping
from bonjourgrid.errors import StageError
from bonjourgrid.units import MIB

PLENTY = 1 << 40  # free bytes, as far as a test that is not about the disk cares


def plenty(_: Path) -> int:
    return PLENTY


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[tuple[str, str, int]]
    refuse_head = False
    release: threading.Event  # a /drip/ download goes on once this is set

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up is what some tests do: no traceback for it


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.server.requests.append((self.command, self.path, int(code)))

    def do_HEAD(self) -> None:
        if self.server.refuse_head:  # as some servers and signed URLs do
            self.send_error(405)
            return
        super().do_HEAD()

    def do_GET(self) -> None:
        if not self.path.startswith("/drip/"):
            super().do_GET()
            return
        self.send_response(200)  # a slow server: 64 KiB, then the rest once released
        self.send_header("Content-Length", str(4 * MIB))
        self.end_headers()
        self.wfile.write(b"x" * 65536)
        self.wfile.flush()
        self.server.release.wait(timeout=30)
        with contextlib.suppress(OSError):  # the client may hang up: that is the point
            for _ in range(63):
                self.wfile.write(b"x" * 65536)


class Site:
    """The files an HTTP server on 127.0.0.1 serves, and the requests it answered."""

    def __init__(self, root: Path, server: _Server) -> None:
        self.root = root
        self.server = server
        self.base = f"http://127.0.0.1:{server.server_address[1]}"

    def put(self, name: str, data: bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return f"{self.base}/{name}"

    def gets(self) -> list[tuple[str, int]]:
        return [(path, code) for method, path, code in self.server.requests if method == "GET"]


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    root = tmp_path / "site"
    root.mkdir()
    server = _Server(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    server.requests = []
    server.release = threading.Event()
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield Site(root, server)
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def submit_dir(tmp_path: Path) -> Path:
    path = tmp_path / "job"
    path.mkdir()
    return path


def workflow(root: Path, **inputs: list[object]) -> Workflow:
    """One task per keyword, reading those inputs."""
    tasks = {name: {"command": "true", "inputs": items} for name, items in inputs.items()}
    return workflow_from_mapping({"name": "t", "tasks": tasks}, root)


def ref_of(data: bytes) -> FileRef:
    return FileRef(hashlib.sha256(data).hexdigest(), len(data))


def no_partials(root: Path) -> bool:
    return not list((remote_dir_of(root) / "incoming").glob("*"))


def remote_dir_of(root: Path) -> Path:
    return root / ".bgrid" / "remote"


# ---------------------------------------------------------------------------------------------
# Files that stay where they are


async def test_submit_dir_files_and_file_urls_are_served_where_they_are(
    tmp_path: Path, submit_dir: Path
) -> None:
    (submit_dir / "local.txt").write_bytes(b"local")
    shared = tmp_path / "shared dir" / "ref.fa"
    shared.parent.mkdir()
    shared.write_bytes(b">ref\nACGT\n")
    wf = workflow(submit_dir, a=["local.txt", shared.as_uri()])
    staged = await stage_sources(wf, {})
    assert staged == {
        "local.txt": StagedFile(ref_of(b"local"), submit_dir / "local.txt"),
        "ref.fa": StagedFile(ref_of(b">ref\nACGT\n"), shared),
    }
    assert not remote_dir_of(submit_dir).exists()  # nothing was copied


async def test_known_digests_are_reused_for_submit_dir_files_only(
    tmp_path: Path, submit_dir: Path
) -> None:
    (submit_dir / "local.txt").write_bytes(b"local")
    shared = tmp_path / "ref.fa"
    shared.write_bytes(b"ACGT")
    wf = workflow(submit_dir, a=["local.txt", shared.as_uri()])
    journal = FileRef("0" * 64, 5)  # what a resumed run's journal check hashed
    staged = await stage_sources(wf, {"local.txt": journal, "ref.fa": journal})
    assert staged["local.txt"].ref == journal  # not hashed again
    assert staged["ref.fa"].ref == ref_of(b"ACGT")  # a URL's content is always its own


async def test_a_file_url_that_went_missing_names_the_url_and_the_task(
    tmp_path: Path, submit_dir: Path
) -> None:
    shared = tmp_path / "ref.fa"
    shared.write_bytes(b"ACGT")
    wf = workflow(submit_dir, align=[shared.as_uri()])
    shared.unlink()
    with pytest.raises(StageError) as caught:
        await stage_sources(wf, {})
    assert str(caught.value) == (
        f"cannot read input {shared.as_uri()} (task 'align'): no such file; check the URL's path"
    )
    assert caught.value.exit_code == 2


# ---------------------------------------------------------------------------------------------
# http(s): downloads into .bgrid/remote


async def test_a_download_is_stored_by_digest_and_served_from_there(
    site: Site, submit_dir: Path
) -> None:
    data = os.urandom(3 * MIB + 17)  # several chunks
    url = site.put("data/reads.fq", data)
    wf = workflow(
        submit_dir,
        a=[url, {"url": url, "path": "copy/reads.fq"}],
        b=[{"url": site.put("small.txt", b"small"), "path": "s.txt"}],
    )
    staged = await stage_sources(wf, {}, free_bytes=plenty)
    ref = ref_of(data)
    assert staged["reads.fq"].ref == ref == staged["copy/reads.fq"].ref
    assert staged["reads.fq"].path.read_bytes() == data
    assert staged["reads.fq"].path.is_relative_to(remote_dir(wf))
    assert ref.digest in staged["reads.fq"].path.name
    assert staged["s.txt"].path.read_bytes() == b"small"
    assert sorted(site.gets()) == [("/data/reads.fq", 200), ("/small.txt", 200)]  # once each
    assert no_partials(submit_dir)


async def test_a_second_staging_asks_and_downloads_only_what_changed(
    site: Site, submit_dir: Path
) -> None:
    same = site.put("same.bin", b"unchanged bytes")
    changing = site.put("changing.bin", b"version 1")
    wf = workflow(submit_dir, a=[same, changing])
    first = await stage_sources(wf, {}, free_bytes=plenty)
    assert len(site.gets()) == 2

    (site.root / "changing.bin").write_bytes(b"version 2")
    later = os.stat(site.root / "changing.bin").st_mtime + 10  # Last-Modified has 1 s steps
    os.utime(site.root / "changing.bin", (later, later))
    site.server.requests.clear()
    second = await stage_sources(wf, {}, free_bytes=plenty)
    assert second["same.bin"] == first["same.bin"]
    assert second["changing.bin"].ref == ref_of(b"version 2")
    assert second["changing.bin"].path.read_bytes() == b"version 2"
    assert site.gets() == [("/changing.bin", 200)]  # same.bin: a HEAD answered 304
    assert ("HEAD", "/same.bin", 304) in site.server.requests
    assert not first["changing.bin"].path.exists()  # the old version is not kept


async def test_a_server_refusing_head_is_still_asked_with_a_conditional_get(
    site: Site, submit_dir: Path
) -> None:
    site.server.refuse_head = True
    wf = workflow(submit_dir, a=[site.put("x.bin", b"x" * 1000)])
    first = await stage_sources(wf, {}, free_bytes=plenty)
    second = await stage_sources(wf, {}, free_bytes=plenty)
    assert first == second
    assert site.gets() == [("/x.bin", 200), ("/x.bin", 304)]


async def test_a_stored_copy_changed_on_disk_is_downloaded_again(
    site: Site, submit_dir: Path
) -> None:
    wf = workflow(submit_dir, a=[site.put("x.bin", b"original")])
    first = await stage_sources(wf, {}, free_bytes=plenty)
    first["x.bin"].path.chmod(0o644)
    first["x.bin"].path.write_bytes(b"damaged!")
    second = await stage_sources(wf, {}, free_bytes=plenty)
    assert second["x.bin"].path.read_bytes() == b"original"
    assert [code for _, code in site.gets()] == [200, 200]


async def test_http_errors_name_every_url_its_tasks_and_the_status(
    site: Site, submit_dir: Path
) -> None:
    wf = workflow(
        submit_dir,
        align=[f"{site.base}/gone/ref.fa", site.put("ok.txt", b"ok")],
        count=[f"{site.base}/gone/ref.fa"],
        sort=[f"{site.base}/missing.csv"],
    )
    with pytest.raises(StageError) as caught:
        await stage_sources(wf, {}, free_bytes=plenty)
    message = str(caught.value)
    assert message.startswith("cannot download 2 URL inputs; check them:")
    assert f"{site.base}/gone/ref.fa (tasks 'align', 'count'): HTTP 404 File not found" in message
    assert f"{site.base}/missing.csv (task 'sort'): HTTP 404" in message
    assert site.gets() == []  # nothing downloaded once an input is known to be missing


async def test_a_404_found_by_the_get_names_the_url_and_task(site: Site, submit_dir: Path) -> None:
    site.server.refuse_head = True
    wf = workflow(submit_dir, sort=[f"{site.base}/missing.csv"])
    with pytest.raises(StageError) as caught:
        await stage_sources(wf, {}, free_bytes=plenty)
    assert str(caught.value) == (
        f"cannot download {site.base}/missing.csv (task 'sort'): HTTP 404 File not found"
    )
    assert no_partials(submit_dir)


async def test_an_unreachable_server_is_named(submit_dir: Path) -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    wf = workflow(submit_dir, a=[f"http://127.0.0.1:{port}/x.bin"])
    with pytest.raises(StageError) as caught:
        await stage_sources(wf, {}, free_bytes=plenty)
    message = str(caught.value)
    assert message.startswith(
        f"cannot download http://127.0.0.1:{port}/x.bin (task 'a'): cannot reach the server ("
    )
    assert "refused" in message


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_a_cancelled_staging_stops_its_downloads_and_leaves_no_partial_file(
    site: Site, submit_dir: Path
) -> None:
    wf = workflow(submit_dir, a=[f"{site.base}/drip/big.bin"])
    site.server.refuse_head = True  # the size is learnt from the GET
    staging = asyncio.create_task(stage_sources(wf, {}, free_bytes=plenty))
    incoming = remote_dir(wf) / "incoming"

    def receiving() -> bool:
        return any(p.stat().st_size > 0 for p in incoming.glob("*.part"))

    await until(receiving, "the download to start")
    staging.cancel()
    with pytest.raises(asyncio.CancelledError):
        await staging
    site.server.release.set()  # the blocked read returns, and the download sees it must stop
    await until(lambda: no_partials(submit_dir), "the partial file to go")
    stored = [p for p in (remote_dir(wf) / "objects").rglob("*") if p.is_file()]
    assert stored == []  # the download stopped: it did not go on to the end and get stored


# ---------------------------------------------------------------------------------------------
# The disk


async def test_downloads_that_do_not_fit_are_refused_before_any_starts(
    site: Site, submit_dir: Path
) -> None:
    wf = workflow(
        submit_dir, a=[site.put("a.bin", b"a" * 3000)], b=[site.put("b.bin", b"b" * 2000)]
    )
    seen: list[Path] = []

    def free(path: Path) -> int:
        seen.append(path)
        return stage.DISK_MARGIN + 4999  # one byte short

    with pytest.raises(StageError) as caught:
        await stage_sources(wf, {}, free_bytes=free)
    assert str(caught.value) == (
        f"the URL inputs need 4.9 KiB in {remote_dir(wf)}, and 64.0 MiB to spare, but that disk "
        "has 64.0 MiB free; free some space there, or submit from a directory on a larger disk"
    )
    assert seen == [remote_dir(wf)] and site.gets() == []
    staged = await stage_sources(wf, {}, free_bytes=lambda _: stage.DISK_MARGIN + 5000)
    assert staged["a.bin"].path.read_bytes() == b"a" * 3000


async def test_nothing_to_download_needs_no_disk(site: Site, submit_dir: Path) -> None:
    wf = workflow(submit_dir, a=[site.put("a.bin", b"a")])
    await stage_sources(wf, {}, free_bytes=plenty)
    await stage_sources(wf, {}, free_bytes=lambda _: 0)  # a 304: nothing to store


async def test_a_size_only_the_get_tells_is_checked_before_the_body(
    site: Site, submit_dir: Path
) -> None:
    site.server.refuse_head = True
    wf = workflow(submit_dir, a=[site.put("a.bin", b"a" * 100)])
    with pytest.raises(StageError) as caught:
        await stage_sources(wf, {}, free_bytes=lambda _: stage.DISK_MARGIN + 99)
    assert str(caught.value).startswith(
        f"cannot download {site.base}/a.bin (task 'a'): it would need 100 B in "
    )
    assert no_partials(submit_dir)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_disk_that_fills_up_during_a_download_leaves_no_partial_file(
    site: Site, small_disk: Path
) -> None:
    wf = workflow(small_disk, a=[site.put("big.bin", os.urandom(2 * MIB))])
    # The file system claims room (as one shared with other writers may, a moment before).
    with pytest.raises(StageError) as caught:
        await stage_sources(wf, {}, free_bytes=plenty)
    message = str(caught.value)
    assert message.startswith(f"cannot download {site.base}/big.bin (task 'a'): the disk of ")
    assert "filled up after" in message and "free some space there" in message
    assert no_partials(small_disk)
    assert shutil.disk_usage(small_disk).used < 64 * 1024  # nothing left behind
