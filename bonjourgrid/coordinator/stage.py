"""The remote cache: the workflow's source inputs, staged where the coordinator serves them.

Three kinds of source, one result (`StagedFile`: the file's identity and where the data
server reads it):
- a file of the submit directory is hashed where it is (a resumed run reuses the digests its
  journal check just computed);
- a `file://` URL is hashed and served where it is, nothing is copied;
- either is read only if it changed since an earlier submit from this directory hashed it
  (`cache/digests.py`: same device, inode, size, mtime and ctime: the remembered digest);
  the files that must be read are hashed by a few threads at once (one core each);
- an `http(s)://` URL is downloaded into `<submit dir>/.bgrid/remote/` (a content store:
  files named by digest, hashed while they download). Before any download the sizes the
  servers announce (HEAD) are added up and checked against the free space there.

A URL downloaded by an earlier run is asked for again with If-None-Match/If-Modified-Since:
a server answering 304 keeps the stored copy; any other answer downloads it again (a URL's
content can change). `remote/index.json` remembers, per URL, the digest and the validators.
Every failure is a StageError (exit 2) that names the URL or file and the tasks that need it,
raised before any peer is touched.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import hashlib
import http.client
import json
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from bonjourgrid.cache.digests import DIGESTS_FILE, DigestCache
from bonjourgrid.cache.store import ContentStore, FileRef, is_digest
from bonjourgrid.dag import Workflow
from bonjourgrid.dag.urls import file_url_path
from bonjourgrid.errors import StageError
from bonjourgrid.units import MIB, format_size

__all__ = ["REMOTE_DIR", "StagedFile", "remote_dir", "stage_sources"]

log = logging.getLogger(__name__)

REMOTE_DIR = Path(".bgrid") / "remote"  # under the submit directory
DISK_MARGIN = 64 * MIB  # bytes left free on the submit directory's disk after the downloads
HTTP_TIMEOUT_S = 30.0  # a server silent this long (connecting or sending) fails the download
MAX_CONNECTIONS = 4  # HEAD requests and downloads at once
STALE_PART_S = 24 * 3600.0  # a partial download this old was left by a run that died
HASH_THREADS = min(4, os.cpu_count() or 1)  # files hashed at once
# An input at least this big, not hashed before, is hashed while the first tasks run.
DEFER_MIN_BYTES = 64 * 1024 * 1024
_CHUNK = MIB
_GONE = (404, 410)  # a HEAD answering these fails at once; other HEAD errors leave it to the GET
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_INDEX = "index.json"


@dataclass(frozen=True)
class StagedFile:
    """A source input ready to serve: its identity and the file the data server reads."""

    ref: FileRef
    path: Path


def remote_dir(workflow: Workflow) -> Path:
    """Where downloaded URL inputs are kept: `<submit dir>/.bgrid/remote`."""
    return workflow.root / REMOTE_DIR


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def deferrable_sources(workflow: Workflow, known: Mapping[str, FileRef]) -> list[str]:
    """Submit-directory inputs worth hashing while the job already runs: big (at least
    DEFER_MIN_BYTES), readable, and neither known nor remembered by the digest cache, when
    a first task reads none of them. The tasks that read none of them need not wait for
    their bytes to be read (SchedulerCore.hold_sources). StageError for one that cannot be
    read, as staging says."""
    digests = DigestCache(workflow.root / DIGESTS_FILE)
    deferred = []
    for path in workflow.source_inputs():
        if path in workflow.urls or path in known:
            continue
        where = workflow.root / path
        try:
            big = where.stat().st_size >= DEFER_MIN_BYTES
            if big and not digests.remembers(where):
                os.close(os.open(where, os.O_RDONLY))  # unreadable: said now, not later
                deferred.append(path)
        except OSError as err:
            raise _unreadable(workflow, path, err) from None
    held = set(deferred)
    graph = workflow.graph
    if not any(
        held.isdisjoint(task.inputs)
        for name, task in workflow.tasks.items()
        if graph.in_degree(name) == 0
    ):
        return []  # every first task reads one of them: nothing could start any sooner
    return deferred


async def hash_deferred(workflow: Workflow, paths: Sequence[str]) -> dict[str, FileRef]:
    """The digests of `deferrable_sources`' inputs, smallest first on the hashing threads;
    StageError if one can no longer be read."""
    order = sorted(paths, key=lambda path: _size(workflow.root / path))
    stop = threading.Event()  # set: the hashing threads give up at their next block
    try:
        staged = await asyncio.to_thread(_hash_in_place, workflow, order, {}, {}, stop)
    finally:
        stop.set()  # the job ended (or was cancelled) first: no reading on behind it
    return {path: item.ref for path, item in staged.items()}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


async def stage_sources(
    workflow: Workflow,
    known: Mapping[str, FileRef],
    *,
    free_bytes: Callable[[Path], int] = _free_bytes,
    deferred: Collection[str] = (),
) -> dict[str, StagedFile]:
    """Every source input (path in the sandbox) staged; StageError if one cannot be.

    `known`: digests of submit-directory files already computed (a resumed run's journal
    check); they are not hashed again. URL inputs never take theirs from `known`.
    `free_bytes(dir)`: free bytes on the file system of `dir` (tests replace it).
    `deferred`: inputs left out, hashed while the job runs (`hash_deferred`).
    """
    local: list[str] = []
    by_url: dict[str, list[str]] = {}  # URL -> the sandbox paths it is staged as
    for path in workflow.source_inputs():
        url = workflow.urls.get(path)
        if path in deferred:
            continue
        if url is None:
            local.append(path)
        else:
            by_url.setdefault(url, []).append(path)
    web = {url: paths for url, paths in by_url.items() if url[:5].lower() != "file:"}
    files = {url: paths for url, paths in by_url.items() if url not in web}
    staged: dict[str, StagedFile] = {}
    stop = threading.Event()  # set: the hashing thread gives up at its next block
    try:
        async with asyncio.TaskGroup() as group:
            hashed = group.create_task(
                asyncio.to_thread(_hash_in_place, workflow, local, files, known, stop)
            )
            downloaded = group.create_task(_download_all(workflow, web, free_bytes))
    except BaseExceptionGroup as failed:
        raise _first_stage_error(failed) from None
    finally:
        stop.set()  # on a failure or a cancel (Ctrl-C), not after the whole input is read
    staged.update(hashed.result())
    for url, item in downloaded.result().items():
        staged.update(dict.fromkeys(web[url], item))
    return staged


def _first_stage_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_stage_error(exc)
        if isinstance(exc, StageError):
            return exc
    return group.exceptions[0]


def _unreadable(workflow: Workflow, path: str, err: OSError) -> StageError:
    """What to say of a submit-directory input that cannot be read."""
    return StageError(
        f"cannot read input {path} in {workflow.root} ({_needed_by(workflow, [path])}): "
        f"{err.strerror or err}; put the file back, or fix its permissions"
    )


def _needed_by(workflow: Workflow, paths: Iterable[str]) -> str:
    """`task 'a'` or `tasks 'a', 'b' and 3 more`: who reads these inputs (for messages)."""
    wanted = set(paths)
    names = [name for name, task in workflow.tasks.items() if not wanted.isdisjoint(task.inputs)]
    shown = ", ".join(repr(name) for name in names[:3])
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"task{'s' if len(names) > 1 else ''} {shown}{more}"


# -- files that stay where they are -----------------------------------------------------------


def _hash_in_place(
    workflow: Workflow,
    local: list[str],
    files: Mapping[str, list[str]],
    known: Mapping[str, FileRef],
    stop: threading.Event | None = None,
) -> dict[str, StagedFile]:
    """Submit-directory files and file:// URLs, hashed where they are (one read each)."""
    digests = DigestCache(workflow.root / DIGESTS_FILE)
    try:
        staged = _hash_with(digests, workflow, local, files, known, stop)
    finally:  # what was hashed before a failure is remembered too
        digests.save()
    log.info(
        "source inputs: %d hashed, %d unchanged since an earlier submit",
        digests.hashed,
        digests.hits,
    )
    return staged


def _hash_with(
    digests: DigestCache,
    workflow: Workflow,
    local: list[str],
    files: Mapping[str, list[str]],
    known: Mapping[str, FileRef],
    stop: threading.Event | None,
) -> dict[str, StagedFile]:
    """Each file on a thread of a small pool (SHA-256 lets go of the GIL: one core each);
    the first failure, in the order of the inputs, stops the others at their next block."""

    def submit_dir_file(path: str) -> dict[str, StagedFile]:
        where = workflow.root / path
        try:
            return {path: StagedFile(known.get(path) or digests.hash(where, stop), where)}
        except InterruptedError:
            raise
        except OSError as err:
            raise _unreadable(workflow, path, err) from None

    def file_url(url: str, paths: list[str]) -> dict[str, StagedFile]:
        where = file_url_path(url)
        try:
            return dict.fromkeys(paths, StagedFile(digests.hash(where, stop), where))
        except InterruptedError:
            raise
        except OSError as err:
            what = "no such file" if isinstance(err, FileNotFoundError) else err.strerror or err
            raise StageError(
                f"cannot read input {url} ({_needed_by(workflow, paths)}): {what}; "
                "check the URL's path"
            ) from None

    staged: dict[str, StagedFile] = {}
    threads = max(1, min(HASH_THREADS, len(local) + len(files)))
    with concurrent.futures.ThreadPoolExecutor(threads, "bgrid-hash") as pool:
        jobs = [pool.submit(submit_dir_file, path) for path in local]
        jobs += [pool.submit(file_url, url, paths) for url, paths in files.items()]
        try:
            for job in jobs:
                staged.update(job.result())
        except BaseException:
            if stop is not None:
                stop.set()
            for job in jobs:
                job.cancel()
            raise
    return staged


# -- http(s) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """What remote/index.json remembers of one downloaded URL."""

    digest: str
    size: int
    etag: str  # "" if the server sent none
    modified: str  # the Last-Modified header; "" if none
    mtime_ns: int  # of the stored file when it was stored: a changed file is not trusted


@dataclass(frozen=True)
class _Head:
    """What a HEAD request said: unchanged (304), or the size to expect (None: not said)."""

    unchanged: bool
    size: int | None


@dataclass(frozen=True)
class _Got:
    """The result of a GET: the stored file, and whether it was downloaded or kept (304)."""

    entry: _Entry
    downloaded: bool


class _Failed(Exception):
    """A request failed; str() says how, without the URL (the caller names it)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, if the server answered


class _KeepMethod(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, but a HEAD stays a HEAD (urllib makes it a GET)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.method = req.get_method()
        return new


_OPENER = urllib.request.build_opener(_KeepMethod)


async def _download_all(
    workflow: Workflow, web: Mapping[str, list[str]], free_bytes: Callable[[Path], int]
) -> dict[str, StagedFile]:
    """Check the disk for the http(s) inputs, then download those that changed."""
    if not web:
        return {}
    root = remote_dir(workflow)
    try:
        store = ContentStore(root)
    except OSError as err:
        raise StageError(
            f"cannot create {root} for the URL inputs: {err.strerror or err}; the submit "
            "directory must be writable"
        ) from None
    _drop_stale_parts(root)
    index = _read_index(root / _INDEX)
    usable = {url: e for url in web if (e := index.get(url)) and _still_stored(store, e)}
    loop = asyncio.get_running_loop()
    stop = threading.Event()  # set: running downloads give up at their next chunk
    pool = concurrent.futures.ThreadPoolExecutor(MAX_CONNECTIONS, thread_name_prefix="bgrid-stage")

    def call(url: str, func: Callable[..., object], *args: object) -> asyncio.Future[object]:
        return loop.run_in_executor(pool, func, url, usable.get(url), *args)

    gets: dict[asyncio.Future[object], str] = {}  # download -> its URL
    try:
        heads = await asyncio.gather(*(call(url, _head) for url in web), return_exceptions=True)
        needed = unknown = 0
        failures: list[str] = []
        todo: list[str] = []  # the URLs to GET
        for (url, paths), head in zip(web.items(), heads, strict=True):
            if isinstance(head, _Failed):
                failures.append(f"{url} ({_needed_by(workflow, paths)}): {head}")
            elif isinstance(head, BaseException):
                raise head
            elif isinstance(head, _Head) and not head.unchanged:
                todo.append(url)
                unknown += head.size is None
                needed += head.size or 0
        if failures:  # every missing URL at once: the user fixes them in one round
            raise StageError(_failure_message(failures))
        if needed:
            _check_disk(root, needed, free_bytes(root), unknown)
        gets.update((call(url, _get, store, stop, free_bytes), url) for url in todo)
        if gets:
            # The first failure ends the staging: the job cannot start without that input.
            await asyncio.wait(gets, return_when=asyncio.FIRST_EXCEPTION)
        got: dict[str, _Entry] = {url: usable[url] for url in web if url not in todo}
        fresh = 0
        failure: tuple[str, BaseException] | None = None
        for future, url in gets.items():
            if not future.done() or future.cancelled():
                continue
            if (error := future.exception()) is not None:
                failure = failure or (url, error)
                continue
            result = future.result()
            assert isinstance(result, _Got)
            got[url] = result.entry
            if result.downloaded:  # remembered even if another URL failed: no download twice
                fresh += 1
                old = index.get(url)
                index[url] = result.entry
                if old is not None and old.digest != result.entry.digest:
                    _drop_unused(store, old.digest, index)
        if fresh:
            _write_index(root / _INDEX, index)
        if failure is not None:
            url, error = failure
            if isinstance(error, _Failed):
                raise StageError(
                    f"cannot download {url} ({_needed_by(workflow, web[url])}): {error}"
                )
            raise error
        log.info("URL inputs: %d downloaded, %d unchanged", fresh, len(web) - fresh)
        return {
            url: StagedFile(FileRef(e.digest, e.size), store.path_of(e.digest))
            for url, e in got.items()
        }
    finally:
        stop.set()  # on a failure or a cancel, downloads still running stop and clean up
        for future in gets:  # so a download ending after the loop closed is dropped quietly
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def _failure_message(failures: list[str]) -> str:
    if len(failures) == 1:
        return f"cannot download {failures[0]}; check the URL"
    shown = "\n  - ".join(failures[:10])
    more = f"\n  ... and {len(failures) - 10} more" if len(failures) > 10 else ""
    return f"cannot download {len(failures)} URL inputs; check them:\n  - {shown}{more}"


def _check_disk(root: Path, needed: int, free: int, unknown: int) -> None:
    """StageError unless `needed` bytes and the margin fit in `free`."""
    if needed + DISK_MARGIN > free:
        plus = f" (and {unknown} more of unknown size)" if unknown else ""
        raise StageError(f"the URL inputs{plus} {_no_room(root, needed, free)}")


def _no_room(root: Path, needed: int, free: int) -> str:
    return (
        f"need {format_size(needed)} in {root}, and {format_size(DISK_MARGIN)} to spare, but "
        f"that disk has {format_size(free)} free; free some space there, or submit from a "
        "directory on a larger disk"
    )


def _conditional(cached: _Entry | None) -> dict[str, str]:
    """Request headers that let the server answer 304 when our copy is current."""
    headers = {"User-Agent": "bonjourgrid"}
    if cached is not None and cached.etag:
        headers["If-None-Match"] = cached.etag
    if cached is not None and cached.modified:
        headers["If-Modified-Since"] = cached.modified
    return headers


def _open(request: urllib.request.Request) -> http.client.HTTPResponse:
    """The response, after our timeout at most; _Failed with the status or the network's reason."""
    try:
        response: http.client.HTTPResponse = _OPENER.open(request, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        err.close()
        raise _Failed(f"HTTP {err.code} {err.reason}", err.code) from None
    except urllib.error.URLError as err:
        raise _Failed(f"cannot reach the server ({err.reason})") from None
    except TimeoutError:
        raise _Failed(f"the server did not answer within {HTTP_TIMEOUT_S:g} s") from None
    except (OSError, http.client.HTTPException) as err:
        raise _Failed(f"the connection failed ({err})") from None
    return response


def _head(url: str, cached: _Entry | None) -> _Head:
    """HEAD the URL: unchanged since `cached`, or the size a download would take."""
    request = urllib.request.Request(url, method="HEAD", headers=_conditional(cached))
    try:
        response = _open(request)
    except _Failed as err:
        if err.status == 304 and cached is not None:
            return _Head(unchanged=True, size=None)
        if err.status is not None and err.status not in _GONE:
            return _Head(unchanged=False, size=None)  # HEAD refused (405, a signed URL...)
        raise
    with response:
        return _Head(unchanged=False, size=_length(response))


def _length(response: http.client.HTTPResponse) -> int | None:
    text = response.headers.get("Content-Length")
    try:
        return int(text) if text is not None and int(text) >= 0 else None
    except ValueError:
        return None


def _get(
    url: str,
    cached: _Entry | None,
    store: ContentStore,
    stop: threading.Event,
    free_bytes: Callable[[Path], int],
) -> _Got:
    """Download the URL into the store, hashing as it comes; keep `cached` on a 304."""
    request = urllib.request.Request(url, headers=_conditional(cached))
    try:
        response = _open(request)
    except _Failed as err:
        if err.status == 304 and cached is not None:
            return _Got(cached, downloaded=False)
        raise
    with response:
        size = _length(response)  # a HEAD may have said nothing, or something else
        if size is not None and size + DISK_MARGIN > (free := free_bytes(store.root)):
            raise _Failed(f"it would {_no_room(store.root, size, free)}")
        partial = store.incoming_path("download")
        try:
            ref = _receive(response, partial, size, stop)
            final = store.commit(partial, ref.digest)  # replaces a stored copy: it may be damaged
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise
    entry = _Entry(
        ref.digest,
        ref.size,
        etag=response.headers.get("ETag", ""),
        modified=response.headers.get("Last-Modified", ""),
        mtime_ns=final.stat().st_mtime_ns,
    )
    return _Got(entry, downloaded=True)


def _receive(
    response: http.client.HTTPResponse, partial: Path, size: int | None, stop: threading.Event
) -> FileRef:
    """The body into `partial`, hashed on the way; _Failed if it breaks off or the disk fills."""
    sha = hashlib.sha256()
    received = 0
    try:
        with open(partial, "wb") as f:
            while not stop.is_set():
                try:
                    block = response.read1(_CHUNK)  # what has come: a stop is seen soon
                except (OSError, http.client.HTTPException) as err:
                    raise _Failed(
                        f"the download broke off after {format_size(received)} ({err})"
                    ) from None
                if not block:
                    break
                sha.update(block)
                f.write(block)
                received += len(block)
    except OSError as err:
        if err.errno in _DISK_FULL:
            raise _Failed(
                f"the disk of {partial.parent} filled up after {format_size(received)}; free "
                "some space there, or submit from a directory on a larger disk"
            ) from None
        raise _Failed(f"cannot write {partial}: {err.strerror or err}") from None
    if stop.is_set():
        raise _Failed("stopped: another input could not be staged")
    if size is not None and received != size:
        raise _Failed(
            f"the download broke off after {format_size(received)} of {format_size(size)}"
        )
    return FileRef(sha.hexdigest(), received)


# -- the index of downloaded URLs -------------------------------------------------------------


def _still_stored(store: ContentStore, entry: _Entry) -> bool:
    """Whether the stored copy is the one the index describes (not changed or removed)."""
    try:
        st = store.path_of(entry.digest).stat()
    except OSError:
        return False
    return st.st_size == entry.size and st.st_mtime_ns == entry.mtime_ns


def _read_index(path: Path) -> dict[str, _Entry]:
    """The index of an earlier run; {} if there is none or it is damaged (all re-downloaded)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = {url: _Entry(**fields) for url, fields in data["urls"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("ignoring %s (%s): URL inputs are downloaded again", path, err)
        return {}
    return {url: e for url, e in entries.items() if _valid(e)}


def _valid(e: _Entry) -> bool:
    return (
        isinstance(e.digest, str)
        and is_digest(e.digest)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in (e.size, e.mtime_ns))
        and isinstance(e.etag, str)
        and isinstance(e.modified, str)
    )


def _write_index(path: Path, index: Mapping[str, _Entry]) -> None:
    data = {"v": 1, "urls": {url: asdict(e) for url, e in sorted(index.items())}}
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        scratch.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(scratch, path)
    except OSError as err:  # only costs a download next time
        log.warning("cannot write %s (%s): URL inputs will be downloaded again", path, err)
        with contextlib.suppress(OSError):
            scratch.unlink()


def _drop_unused(store: ContentStore, digest: str, index: Mapping[str, _Entry]) -> None:
    """Remove a stored download that no URL of the index refers to any more."""
    if all(e.digest != digest for e in index.values()):
        store.evict(digest)


def _drop_stale_parts(root: Path) -> None:
    """Partial downloads left by a run that died (a running one's are recent)."""
    cutoff = time.time() - STALE_PART_S
    for part in (root / "incoming").glob("*.part"):
        with contextlib.suppress(OSError):
            if part.stat().st_mtime < cutoff:
                part.unlink()
