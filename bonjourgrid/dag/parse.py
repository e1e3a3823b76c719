"""Workflow files to plain data: YAML and JSON, a repeated key refused, every error placed.

YAML. PyYAML's loader first composes a tree of node objects, then builds the values from it;
on a 100,000-task file that takes about 20 s, most of it spent by the garbage collector
walking millions of live nodes. `_load_fast` builds the values straight from libyaml's event
stream, without nodes, and resolves plain scalars with PyYAML's own resolvers and
constructors, so it returns exactly what the safe loader would. Whatever it does not handle
itself (merge keys, explicit tags, complex keys, an alias to an unfinished collection,
several documents, a repeated key) sends the whole text to the complete loader, which then
returns the value or raises the precise error: a rare construct costs time, never
correctness. Without libyaml only the complete loader runs.
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Iterator
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import ScalarNode

from bonjourgrid.errors import DagError

__all__ = ["parse_json", "parse_yaml"]

_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"
_MERGE = "tag:yaml.org,2002:merge"


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: building a large acyclic tree runs 3-4x faster."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ---------------------------------------------------------------------------------------------
# JSON


def parse_json(text: str, source: str) -> object:
    """The value of a JSON workflow; DagError with line and column if it is not JSON."""

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) < len(pairs):  # rare: only then is the repeated key looked for
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise DagError(
                        f"{source}: key {key!r} appears twice in one object; "
                        "the second would silently replace the first, so rename or merge them"
                    )
                seen.add(key)
        return result

    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as err:
        raise DagError(
            f"{source}: line {err.lineno}, column {err.colno}: {err.msg}; fix the JSON there"
        ) from None
    except RecursionError:
        raise DagError(f"{source}: nested too deeply to be a workflow") from None


# ---------------------------------------------------------------------------------------------
# YAML: the complete loader


_YamlBase: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present


class _UniqueKeyLoader(_YamlBase):  # type: ignore[misc]
    """YAML's safe loader, except that a key repeated in one mapping is an error, not a loss."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as err:
            raise _unreadable(node.tag, node.value, err, node.start_mark) from None


def _unreadable(tag: str, value: object, err: Exception, mark: yaml.Mark) -> yaml.YAMLError:
    """A scalar its resolver claimed but its constructor refused (2001-02-30, 5000 digits)."""
    kind = tag.rsplit(":", 1)[-1]
    return yaml.constructor.ConstructorError(
        None, None, f"cannot read {str(value)[:60]!r} as a YAML {kind}: {err}; quote it", mark
    )


def _construct_unique_mapping(loader: Any, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[tuple[str, str], yaml.Mark] = {}
    for key_node, _value in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE:
            first = seen.setdefault((key_node.tag, key_node.value), key_node.start_mark)
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key_node.value!r} appears twice (first on line {first.line + 1}); "
                    "the second would silently replace the first, so rename or merge them",
                    key_node.start_mark,
                )
    result: dict[Any, Any] = yaml.SafeLoader.construct_mapping(loader, node, deep=True)
    return result


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


# ---------------------------------------------------------------------------------------------
# YAML: the fast path


class _Fallback(Exception):
    """The fast path met a construct it leaves to the complete loader."""


_NOTHING = object()  # no value yet
_IN_LIST = object()  # the open collection is a list
_NEEDS_KEY = object()  # the open mapping waits for a key


def _load_fast(text: str) -> object:
    loader = yaml.CSafeLoader(text)
    try:
        return _build(loader)
    finally:
        loader.dispose()


def _build(loader: Any) -> object:  # one flat loop: 100k tasks are 1.3 M events
    """The document's value from the event stream; _Fallback for what it does not handle."""
    get_event = loader.get_event
    resolvers: dict[str, list[tuple[str, Any]]] = loader.yaml_implicit_resolvers
    if resolvers.get(None):  # type: ignore[call-overload]
        raise _Fallback  # wildcard resolvers: not the safe loader's table
    constructors: dict[str, Any] = loader.yaml_constructors
    anchors: dict[str, object] = {}
    containers: list[Any] = []  # the open collections, innermost last
    slots: list[Any] = []  # per open collection: _IN_LIST, _NEEDS_KEY or the pending key
    opened_as: list[str | None] = []  # per open collection: its anchor
    root: object = None
    while True:
        event = get_event()
        kind = event.__class__
        if kind is ScalarEvent:
            tag = event.tag
            value = event.value
            if tag is None or tag == "!":
                # Resolver.resolve, without path resolvers (the safe loader has none)
                tag = _STR
                if event.implicit[0]:
                    for candidate, regexp in resolvers.get(value[:1], ()):
                        if regexp.match(value):
                            tag = candidate
                            break
            if tag != _STR:
                construct = constructors.get(tag) if event.tag is None or event.tag == "!" else None
                if construct is None:
                    raise _Fallback  # merge keys, `=`, explicit tags
                node = ScalarNode(tag, value, event.start_mark, event.end_mark, event.style)
                try:
                    value = construct(loader, node)
                except (ValueError, OverflowError):
                    # The complete loader reports it, after any error in the rest of the text.
                    raise _Fallback from None
            if event.anchor is not None:
                if event.anchor in anchors or event.anchor in opened_as:
                    raise _Fallback  # a duplicate anchor: the complete loader says where
                anchors[event.anchor] = value
        elif kind is MappingStartEvent or kind is SequenceStartEvent:
            if event.tag not in (None, "!", _MAP if kind is MappingStartEvent else _SEQ):
                raise _Fallback
            if event.anchor is not None and (event.anchor in anchors or event.anchor in opened_as):
                raise _Fallback  # a duplicate anchor: the complete loader says where
            value = {} if kind is MappingStartEvent else []
            if containers:
                slot = slots[-1]
                if slot is _NEEDS_KEY:
                    raise _Fallback  # a collection as a key: the complete loader refuses it
                if slot is _IN_LIST:
                    containers[-1].append(value)
                else:
                    containers[-1][slot] = value
                    slots[-1] = _NEEDS_KEY
            else:
                root = value
            containers.append(value)
            slots.append(_NEEDS_KEY if kind is MappingStartEvent else _IN_LIST)
            opened_as.append(event.anchor)
            continue
        elif kind is MappingEndEvent or kind is SequenceEndEvent:
            done = containers.pop()
            slots.pop()
            anchor = opened_as.pop()
            if anchor is not None:
                anchors[anchor] = done
            continue
        elif kind is AliasEvent:
            value = anchors.get(event.anchor, _NOTHING)
            if value is _NOTHING:
                raise _Fallback  # undefined, or the collection it is inside of
        elif kind is DocumentEndEvent:
            if get_event().__class__ is not StreamEndEvent:
                raise _Fallback  # several documents: the complete loader refuses them
            return root
        elif kind is StreamEndEvent:
            return None  # no document at all
        elif kind is StreamStartEvent or kind is DocumentStartEvent:
            continue
        else:
            raise _Fallback
        # A scalar or an alias: it goes into the open collection, or is the document.
        if not containers:
            root = value
            continue
        slot = slots[-1]
        if slot is _IN_LIST:
            containers[-1].append(value)
        elif slot is _NEEDS_KEY:
            if isinstance(value, list | dict) or value in containers[-1]:
                raise _Fallback  # unhashable or repeated: the complete loader names the line
            slots[-1] = value
        else:
            containers[-1][slot] = value
            slots[-1] = _NEEDS_KEY


def parse_yaml(text: str, source: str, *, fast: bool = True) -> object:
    """The value of a YAML workflow; DagError with line and column if it is not valid.

    `fast=False` runs only the complete loader (tests compare the two).
    """
    try:
        with gc_paused():
            if fast and hasattr(yaml, "CSafeLoader"):
                with contextlib.suppress(_Fallback):
                    return _load_fast(text)
            return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f" ({err.context})" if err.context and err.problem else ""
        fix = "" if isinstance(err, yaml.constructor.ConstructorError) else "; fix the YAML there"
        raise DagError(f"{source}: {where}{err.problem or err.context}{context}{fix}") from None
    except yaml.YAMLError as err:
        raise DagError(f"{source}: not valid YAML: {err}") from None
    except RecursionError:
        raise DagError(f"{source}: nested too deeply to be a workflow") from None
