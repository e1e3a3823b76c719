"""URL inputs: which URLs a task may read, and the name it sees each one under.

An `inputs` item may be an `http://`, `https://` or `file://` URL, or `{url: URL, path: NAME}`.
The task finds the file at NAME in its sandbox; without a NAME, at the URL path's last segment
(percent-decoded). The coordinator stages these files (`coordinator/stage.py`); for the rest of
the system they are source inputs like any file of the submit directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit
from urllib.request import url2pathname

from bonjourgrid.dag.model import normalize_path

__all__ = ["URL_SCHEMES", "UrlInputs", "file_url_path", "is_url", "url_input_path"]

URL_SCHEMES = ("http", "https", "file")  # what an input may be fetched from
_INPUT_KEYS = ("url", "path")  # of an input written as a mapping


def is_url(text: str) -> bool:
    """Whether an `inputs` item is a URL (a scheme, then `://`) rather than a path."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme[:1].isalpha() and all(c.isalnum() or c in "+.-" for c in scheme)


def url_input_path(url: str) -> str:
    """Where a task sees a URL input: the URL path's last segment, decoded; else ValueError."""
    parts = _split_url(url)
    segment = unquote(parts.path.rsplit("/", 1)[-1])
    if not segment or segment in (".", ".."):
        problem = "does not end in a file name"
    elif "/" in segment:
        problem = "ends in a name with an encoded '/'"
    else:
        try:
            return normalize_path(segment)
        except ValueError as err:
            problem = f"ends in a name that cannot be a file name ({err})"
    raise ValueError(f"URL {url!r} {problem}; name the file: {{url: {url}, path: NAME}}")


def file_url_path(url: str) -> Path:
    """The local file a `file://` URL names (absolute); ValueError if it is not one."""
    parts = _split_url(url)
    if parts.scheme.lower() != "file":
        raise ValueError(f"{url!r} is not a file:// URL")
    return Path(url2pathname(parts.path))


def _split_url(url: str) -> SplitResult:
    """A URL of a scheme inputs may use, checked: http(s) with a host, file:// on this host."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a port that is not a number
    except ValueError as err:
        raise ValueError(f"{url!r} is not a valid URL: {err}") from None
    scheme = parts.scheme.lower()
    if scheme not in URL_SCHEMES:
        raise ValueError(
            f"{url!r}: {scheme}:// URLs cannot be inputs; use http://, https:// or file:// "
            "(or put the file in the submit directory)"
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"{url!r} names host {parts.netloc!r}; a file:// URL names a file on this "
                "machine: file:///absolute/path"
            )
        if not parts.path.startswith("/"):
            raise ValueError(f"{url!r}: write a file:// URL with an absolute path: file:///dir/f")
    elif not parts.hostname:
        raise ValueError(f"{url!r} has no host; write it as {scheme}://HOST/PATH")
    return parts


class UrlInputs:
    """The URL inputs of a workflow being read: one URL per path, whichever tasks list it."""

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}  # path in the sandbox -> URL
        self.first: dict[str, str] = {}  # path -> the task that listed it first, as "task 'x'"

    def add(self, item: object, where: str) -> str:
        """The sandbox path of a URL input item (a URL or {url, path}); else ValueError."""
        if isinstance(item, Mapping):
            extra = sorted(str(key) for key in item if key not in _INPUT_KEYS)
            if extra:
                raise ValueError(f"unknown keys {extra}; an input mapping has url and path")
            url = item.get("url")
            if not isinstance(url, str) or not is_url(url):
                raise ValueError(f"url {url!r} is not a URL such as https://host/dir/file")
            name = item.get("path")
            path = url_input_path(url) if name is None else normalize_path(name)
            if name is not None:
                _split_url(url)  # the URL is checked even when its name is not used
        elif isinstance(item, str):
            url, path = item, url_input_path(item)
        else:
            raise ValueError(f"{item!r} is not a path; write it as a string")
        first = self.urls.setdefault(path, url)
        if first != url:
            raise ValueError(
                f"{path!r} would be both {first} ({self.first[path]}) and {url}; "
                "give one of them another name with {url: URL, path: NAME}"
            )
        self.first.setdefault(path, where)
        return path

    def problems(self, producer: Mapping[str, str], check_files: bool) -> list[str]:
        """What is wrong with them: a path some task writes; a file:// URL naming no file."""
        found = [
            f"task {producer[path]!r} writes {path!r}, which {self.first[path]} reads from "
            f"{self.urls[path]}; rename the output, or name the URL input with "
            "{url: URL, path: NAME}"
            for path in sorted(self.urls.keys() & producer.keys())
        ]
        for path, url in self.urls.items() if check_files else ():
            if url[:5].lower() == "file:":
                local = file_url_path(url)
                if not local.is_file():
                    what = "a directory" if local.is_dir() else "not a file"
                    found.append(f"{self.first[path]}: input {url} is {what} ({local}); fix it")
        return found
