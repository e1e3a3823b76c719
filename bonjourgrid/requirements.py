"""Requirement expressions (`ram>=4GiB and cpus>=2`) matched against a peer's TXT record.

Theory of operation: a hand-written tokenizer and recursive-descent parser build a small,
immutable tree; `matches` walks it against a `Mapping[str, str]`. Nothing is ever evaluated
as Python. The grammar:

    expr       := and_expr (("or" | "||") and_expr)*
    and_expr   := not_expr (("and" | "&&") not_expr)*
    not_expr   := ("not" | "!") not_expr | "(" expr ")" | "true" | "false" | comparison
    comparison := KEY OP VALUE          OP in >= <= > < == != (and "=" for "==")
    KEY        := a TXT schema key | an HTCondor alias | "txt." + an extra TXT key
    VALUE      := number | number+size unit (4GiB, 512MiB, 2G) | bare word | "quoted"

Attributes are checked when the text is parsed, so a typo is an error, not a silent false:
- the peer TXT schema keys (cpus, ram, disk, cost, arch, os, mw, state, ...), in any case;
- HTCondor's names, in any case: Memory -> ram, Cpus -> cpus, Disk -> disk, Arch -> arch,
  OpSys -> os. They rename, they do not convert: a bare number is MiB for ram and disk (an
  HTCondor Disk is KiB: write a unit, Disk>=10GiB);
- an extra key a peer advertises outside the schema (its daemon's own, e.g. `gpu`) is named
  with the prefix `txt.`: `txt.gpu==a100`. The prefix keeps a typo of a schema key an error.

Semantics, chosen so that a stranger's TXT record can never make a match raise:
- sizes are MiB (the unit of the `ram` and `disk` TXT keys): `4GiB` is 4096, `1500` is 1500;
  K, M, G, T are powers of 1024 (units.py), so `ram>=4G` is `ram>=4096`;
- both sides numbers -> numeric comparison; otherwise `==`/`!=` compare text (case-insensitive)
  and an ordering comparison is False;
- a missing key makes its comparison False, whatever the operator;
- list-valued keys (`mw`): `mw==condor` is true when condor is one of the comma-separated items.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeAlias

from bonjourgrid.errors import ConfigError, RequirementError
from bonjourgrid.units import MIB, format_size, parse_size

__all__ = ["ALIASES", "ATTRIBUTES", "EXTRA_PREFIX", "Requirement", "combine"]

_MAX_LENGTH = 65536  # characters; far beyond any real requirement, bounds the work per parse
_MAX_DEPTH = 64  # nested parentheses / `not`; keeps the parser off Python's recursion limit
_EXAMPLE = "ram>=4GiB and cpus>=2"
_LIST_KEYS = frozenset({"mw"})  # TXT keys whose value is a comma-separated set

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_EXTRA_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}\Z")  # as txt.py accepts an extra TXT key
# The peer TXT schema's keys (discovery/txt.py PEER_KEYS, pinned equal by a test: importing
# it here would load zeroconf into every workflow check).
ATTRIBUTES = ("cpus", "ram", "disk", "cost", "arch", "os", "mw", "state", "job", "grid", "v")
_INTERNAL = ("key", "cred", "seq")  # may be named, but are not worth listing in a message
_NATIVE = frozenset(ATTRIBUTES + _INTERNAL)
EXTRA_PREFIX = "txt."
# HTCondor's ClassAd names for what our TXT schema calls otherwise (lower case: matched so).
ALIASES = {"memory": "ram", "cpus": "cpus", "disk": "disk", "arch": "arch", "opsys": "os"}
_SIZE_KEYS = frozenset({"ram", "disk"})  # MiB: shown as sizes when a peer fails a clause
_BARE_WORD = re.compile(r"[A-Za-z0-9_.+\-:/@%]+")
_NUMBER = re.compile(r"\s*([+-]?\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*\Z")
_OPERATORS = (">=", "<=", "==", "!=", ">", "<", "=")  # longest first
_KEYWORDS = {"and": "and", "&&": "and", "or": "or", "||": "or", "not": "not", "!": "not"}
_CONSTANTS = frozenset({"true", "false"})
_RESERVED_WORDS = frozenset(_KEYWORDS) | _CONSTANTS  # bare values that must be quoted

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}


def _as_number(text: str) -> float | None:
    """The number in `text` (sizes in MiB), or None when it is not a number."""
    match = _NUMBER.match(text)
    if match is None:
        return None
    number, unit = match.groups()
    if not unit:
        return float(number)
    try:
        # parse_size takes no sign; a negative size is not a number here
        return parse_size(number + unit) / MIB
    except (ConfigError, OverflowError):  # unknown unit; a size too big for an int
        return None


# ---------------------------------------------------------------------------------------------
# The tree


@dataclass(frozen=True)
class _Const:
    value: bool

    def matches(self, attrs: Mapping[str, str]) -> bool:
        return self.value

    def comparisons(self) -> Iterator[_Compare]:
        return iter(())

    def text(self) -> str:
        return "true" if self.value else "false"


@dataclass(frozen=True)
class _Compare:
    key: str  # the TXT key looked up: a schema key (aliases resolved) or an extra one
    op: str
    value: str
    number: float | None
    extra: bool = False  # written `txt.KEY`: a key outside the schema

    def comparisons(self) -> Iterator[_Compare]:
        yield self

    def matches(self, attrs: Mapping[str, str]) -> bool:
        have = attrs.get(self.key)
        if not isinstance(have, str):
            return False
        have_number = _as_number(have)
        if self.number is not None and have_number is not None:
            return _COMPARE[self.op](have_number, self.number)
        if self.op not in ("==", "!="):
            return False
        want = self.value.casefold()
        if self.key in _LIST_KEYS:
            equal = want in (item.strip().casefold() for item in have.split(","))
        else:
            equal = have.casefold() == want
        return equal if self.op == "==" else not equal

    def text(self) -> str:
        return f"{self.name}{self.op}{_quote(self.value)}"

    @property
    def name(self) -> str:
        return EXTRA_PREFIX + self.key if self.extra else self.key


@dataclass(frozen=True)
class _Not:
    item: _Node

    def matches(self, attrs: Mapping[str, str]) -> bool:
        return not self.item.matches(attrs)

    def comparisons(self) -> Iterator[_Compare]:
        return self.item.comparisons()

    def text(self) -> str:
        inner = self.item.text()
        return (
            f"not {inner}" if isinstance(self.item, _Compare | _Const | _Not) else f"not ({inner})"
        )


@dataclass(frozen=True)
class _All:
    items: tuple[_Node, ...]

    def matches(self, attrs: Mapping[str, str]) -> bool:
        return all(item.matches(attrs) for item in self.items)

    def comparisons(self) -> Iterator[_Compare]:
        for item in self.items:
            yield from item.comparisons()

    def text(self) -> str:
        return " and ".join(
            f"({i.text()})" if isinstance(i, _Any) else i.text() for i in self.items
        )


@dataclass(frozen=True)
class _Any:
    items: tuple[_Node, ...]

    def matches(self, attrs: Mapping[str, str]) -> bool:
        return any(item.matches(attrs) for item in self.items)

    def comparisons(self) -> Iterator[_Compare]:
        for item in self.items:
            yield from item.comparisons()

    def text(self) -> str:
        return " or ".join(item.text() for item in self.items)


_Node: TypeAlias = _Const | _Compare | _Not | _All | _Any


def _failing(node: _Node, attrs: Mapping[str, str]) -> _Node | None:
    """The smallest clause of an unmet requirement that fails: one item of an `and`."""
    if node.matches(attrs):
        return None
    if isinstance(node, _All):
        return next(_failing(i, attrs) or i for i in node.items if not i.matches(attrs))
    return node


def _has(compare: _Compare, attrs: Mapping[str, str]) -> str:
    """What a peer advertises for one attribute, as a person reads it."""
    have = attrs.get(compare.key)
    if not isinstance(have, str):
        return f"no {compare.name}"
    number = _as_number(have)
    if compare.key in _SIZE_KEYS and not compare.extra and number is not None:
        return format_size(number * MIB)
    return have if len(have) <= 40 else have[:37] + "..."


def _quote(value: str) -> str:
    """`value` as it must be written to read back the same: bare when it can be, else quoted."""
    if _BARE_WORD.fullmatch(value) and value.lower() not in _RESERVED_WORDS:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _all_of(items: list[_Node]) -> _Node:
    flat: list[_Node] = []
    for item in items:
        if isinstance(item, _All):
            flat.extend(item.items)
        elif item != _Const(True):
            flat.append(item)
    return flat[0] if len(flat) == 1 else _Const(True) if not flat else _All(tuple(flat))


def _any_of(items: list[_Node]) -> _Node:
    flat: list[_Node] = []
    for item in items:
        flat.extend(item.items if isinstance(item, _Any) else (item,))
    return flat[0] if len(flat) == 1 else _Any(tuple(flat))


# ---------------------------------------------------------------------------------------------
# Tokenizer and parser


@dataclass(frozen=True)
class _Token:
    kind: str  # "word" | "string" | "op" | "keyword" | "(" | ")" | "end"
    text: str  # for "string": the unescaped content; for "keyword": and/or/not
    column: int  # 1-based, for messages


def _tokens(text: str, fail: Callable[[str, int], RequirementError]) -> Iterator[_Token]:
    pos, end = 0, len(text)
    while pos < end:
        char = text[pos]
        if char.isspace():
            pos += 1
            continue
        column = pos + 1
        two = text[pos : pos + 2]
        if two in ("&&", "||"):
            yield _Token("keyword", _KEYWORDS[two], column)
            pos += 2
            continue
        op = next((op for op in _OPERATORS if text.startswith(op, pos)), None)
        if op is not None:
            yield _Token("op", "==" if op == "=" else op, column)
            pos += len(op)
        elif char == "!":
            yield _Token("keyword", "not", column)
            pos += 1
        elif char in "()":
            yield _Token(char, char, column)
            pos += 1
        elif char in "\"'":
            content, pos = _read_string(text, pos, fail)
            yield _Token("string", content, column)
        elif word := _BARE_WORD.match(text, pos):
            word_text = word.group()
            keyword = _KEYWORDS.get(word_text.lower())
            yield (
                _Token("keyword", keyword, column) if keyword else _Token("word", word_text, column)
            )
            pos = word.end()
        else:
            raise fail(f"unexpected character {char!r}", column)
    yield _Token("end", "", end + 1)


def _read_string(
    text: str, start: int, fail: Callable[[str, int], RequirementError]
) -> tuple[str, int]:
    quote, pos, out = text[start], start + 1, []
    while pos < len(text):
        char = text[pos]
        if char == "\\" and pos + 1 < len(text):
            out.append(text[pos + 1])
            pos += 2
        elif char == quote:
            return "".join(out), pos + 1
        else:
            out.append(char)
            pos += 1
    raise fail(f"the string opened with {quote} is never closed", start + 1)


class _Parser:
    def __init__(self, text: str) -> None:
        self.source = text
        self.tokens = list(_tokens(text, self.error))
        self.pos = 0
        self.depth = 0

    def error(self, problem: str, column: int) -> RequirementError:
        shown = self.source if len(self.source) <= 80 else self.source[:77] + "..."
        return RequirementError(
            f"cannot read requirement {shown!r}: {problem} at column {column}; example: {_EXAMPLE}"
        )

    @property
    def token(self) -> _Token:
        return self.tokens[self.pos]

    def take(self) -> _Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def is_keyword(self, word: str) -> bool:
        return self.token.kind == "keyword" and self.token.text == word

    def parse(self) -> _Node:
        if self.token.kind == "end":
            return _Const(True)
        node = self.expr()
        if self.token.kind != "end":
            raise self.error(
                f"expected 'and', 'or' or the end, found {self.token.text!r}", self.token.column
            )
        return node

    def expr(self) -> _Node:
        items = [self.and_expr()]
        while self.is_keyword("or"):
            self.take()
            items.append(self.and_expr())
        return _any_of(items)

    def and_expr(self) -> _Node:
        items = [self.not_expr()]
        while self.is_keyword("and"):
            self.take()
            items.append(self.not_expr())
        return _all_of(items)

    def not_expr(self) -> _Node:
        token = self.token
        if self.is_keyword("not") or token.kind == "(":
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise self.error(f"nesting deeper than {_MAX_DEPTH} levels", token.column)
            self.take()
            if token.kind == "(":
                node = self.expr()
                if self.token.kind != ")":
                    raise self.error(
                        f"expected ')' (to close the '(' of column {token.column})",
                        self.token.column,
                    )
                self.take()
            else:
                node = _Not(self.not_expr())
            self.depth -= 1
            return node
        return self.comparison()

    def comparison(self) -> _Node:
        key = self.take()
        if key.kind == "word" and key.text.lower() in _CONSTANTS:
            return _Const(key.text.lower() == "true")
        is_extra = key.kind == "word" and key.text.lower().startswith(EXTRA_PREFIX)
        if key.kind != "word" or not (is_extra or _KEY.match(key.text)):
            found = "the end" if key.kind == "end" else repr(key.text)
            raise self.error(
                f"expected an attribute name such as ram or cpus, found {found}", key.column
            )
        name = self.attribute(key)
        op = self.take()
        if op.kind != "op":
            raise self.error(
                f"expected an operator (>= <= > < == !=) after {key.text!r}", op.column
            )
        value = self.take()
        if value.kind not in ("word", "string"):
            raise self.error(f"expected a value after {op.text!r}", value.column)
        return _Compare(name, op.text, value.text, _as_number(value.text), is_extra)

    def attribute(self, token: _Token) -> str:
        """The TXT key an attribute name stands for; an unknown name is an error."""
        lower = token.text.lower()
        if lower.startswith(EXTRA_PREFIX):
            extra = lower[len(EXTRA_PREFIX) :]
            if _EXTRA_KEY.match(extra):
                return extra
            raise self.error(
                f"{token.text!r}: after {EXTRA_PREFIX!r} write a TXT key a peer advertises "
                "(lower case letters, digits, _ . -)",
                token.column,
            )
        if lower in ALIASES or lower in _NATIVE:
            return ALIASES.get(lower, lower)
        names = [*ATTRIBUTES, "Memory", "Cpus", "Disk", "Arch", "OpSys"]
        close = difflib.get_close_matches(lower, [n.lower() for n in names], n=1)
        hint = (
            f" (did you mean {next(n for n in names if n.lower() == close[0])}?)" if close else ""
        )
        raise self.error(
            f"unknown attribute {token.text!r}{hint}; known: {', '.join(ATTRIBUTES)}; "
            "HTCondor's Memory, Cpus, Disk, Arch, OpSys; txt.NAME for another TXT key a peer "
            "advertises",
            token.column,
        )


# ---------------------------------------------------------------------------------------------
# Public face


@dataclass(frozen=True)
class Requirement:
    """A parsed requirement; `matches` never raises, whatever the peer advertises."""

    _node: _Node

    @classmethod
    def parse(cls, text: str) -> Requirement:
        """Parse `text`; blank text matches everything; raises RequirementError."""
        if not isinstance(text, str):
            raise RequirementError(
                f"a requirement must be text, not {type(text).__name__}; example: {_EXAMPLE}"
            )
        if len(text) > _MAX_LENGTH:
            raise RequirementError(
                f"requirement is {len(text)} characters long; the limit is {_MAX_LENGTH}"
            )
        return cls(_Parser(text).parse())

    @classmethod
    def everything(cls) -> Requirement:
        """The requirement every peer meets."""
        return cls(_Const(True))

    def matches(self, attrs: Mapping[str, str]) -> bool:
        """True when a peer with these TXT attributes meets the requirement."""
        return self._node.matches(attrs)

    def explain(self, attrs: Mapping[str, str]) -> str | None:
        """None when the peer meets it; else the clause it fails and what it has there, as
        `condor_q -better-analyze` says it: "ram>=8GiB (it has 4.0 GiB)"."""
        clause = _failing(self._node, attrs)
        if clause is None:
            return None
        seen: dict[str, str] = {}
        for compare in clause.comparisons():
            seen.setdefault(compare.name, _has(compare, attrs))
        if not seen:
            return clause.text()
        if len(seen) == 1:
            facts = next(iter(seen.values()))
        else:
            facts = ", ".join(f"{name} {have}" for name, have in seen.items())
        return f"{clause.text()} (it has {facts})"

    def __and__(self, other: Requirement) -> Requirement:
        return Requirement(_all_of([self._node, other._node]))

    def __str__(self) -> str:
        return self._node.text()

    def __repr__(self) -> str:
        return f"Requirement({str(self)!r})"


def combine(*texts: str | None) -> Requirement:
    """The AND of the given requirement texts; None and blank ones are skipped."""
    result = Requirement.everything()
    for text in texts:
        if text is not None and text.strip():
            result = result & Requirement.parse(text)
    return result
