"""Requirement expressions: parsing, matching against TXT attributes, hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bonjourgrid.errors import RequirementError
from bonjourgrid.requirements import ALIASES, Requirement, combine

PEER = {
    "cpus": "4",
    "ram": "8192",
    "disk": "50000",
    "cost": "0.5",
    "arch": "x86_64",
    "os": "linux",
    "mw": "native,condor",
    "state": "idle",
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cpus>=4", True),
        ("cpus>4", False),
        ("cpus==4", True),
        ("cpus==4.0", True),  # numbers compare as numbers
        ("cpus!=4", False),
        ("cpus<8 and cpus>2", True),
        ("ram>=8GiB", True),  # 8GiB is 8192 MiB
        ("ram>8GiB", False),
        ("ram>=4096", True),  # a bare number for ram is MiB
        ("ram>=512MiB", True),
        ("ram>=9G", False),  # 9G = 9GiB = 9216 MiB
        ("ram>=8G", True),  # G is 2**30, as in HTCondor and Slurm
        ("ram>=8GB", True),
        ("disk>=1.5TiB", False),
        ("disk<=48.9GiB", True),
        ("cost<=0.5", True),
        ("cost<0.5", False),
        ("arch==x86_64", True),
        ("arch==X86_64", True),  # text compares without case
        ("arch!=aarch64", True),
        ("os=='linux'", True),
        ('os=="linux"', True),
        ("os=linux", True),  # '=' is read as '=='
        ("mw==condor", True),  # a comma list holds condor
        ("mw==boinc", False),
        ("mw!=boinc", True),
        ("arch>x86", False),  # ordering on text is never true
        ("txt.gpu>=1", False),  # missing key
        ("txt.gpu!=1", False),  # missing key, whatever the operator
        ("not txt.gpu>=1", True),
        ("Memory>=8GiB", True),  # HTCondor's names, any case
        ("memory>8G", False),
        ("Cpus==4 and Arch==X86_64 and OpSys==LINUX and Disk>=1", True),
        ("RAM>=8G and CPUS>=4 and Mw==condor", True),  # native names in any case
        ("state==idle && cpus>=2", True),
        ("state==busy || cpus>=2", True),
        ("!(state==busy)", True),
        ("true", True),
        ("false", False),
        ("", True),
        ("   ", True),
    ],
)
def test_matches_table(text: str, expected: bool) -> None:
    assert Requirement.parse(text).matches(PEER) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # and binds tighter than or
        ("cpus>=8 and ram>=1 or arch==x86_64", True),
        ("cpus>=8 and (ram>=1 or arch==x86_64)", False),
        ("arch==arm or cpus>=2 and ram>=1", True),
        ("(arch==arm or cpus>=2) and ram>=100GiB", False),
        # not binds tighter than and
        ("not cpus>=8 and ram>=1", True),
        ("not (cpus>=2 and ram>=1)", False),
        ("not not cpus>=2", True),
        ("((((cpus>=2))))", True),
        ("CPUS>=2", True),  # attribute names are read without case, as in HTCondor
        ("cpus>=2 AND ram>=1 Or false", True),  # keywords are not
    ],
)
def test_precedence_and_parentheses(text: str, expected: bool) -> None:
    assert Requirement.parse(text).matches(PEER) is expected


def test_quoted_value_keeps_spaces_and_quotes() -> None:
    requirement = Requirement.parse(r'txt.site=="lab \"A\" floor 2"')
    assert requirement.matches({"site": 'lab "A" floor 2'})
    assert not requirement.matches({"site": "lab A"})
    assert Requirement.parse(str(requirement)) == requirement


def test_bad_attribute_values_never_raise() -> None:
    requirement = Requirement.parse("ram>=1GiB and arch==x86_64 and mw==condor")
    hostile: list[dict[str, str]] = [
        {},
        {"ram": ""},
        {"ram": "lots"},
        {"ram": "9" * 5000},
        {"ram": "1e999"},
        {"ram": "nan", "arch": "\x00"},
        {"ram": "99999999999999999999TiB", "arch": "x86_64", "mw": ",,,"},
        {"ram": "-5", "mw": "condor"},
    ]
    for attrs in hostile:
        assert requirement.matches(attrs) is False
    assert requirement.matches({"ram": "2048", "arch": "x86_64", "mw": " condor "}) is True
    not_strings: dict[str, object] = {"ram": 4096, "arch": None}
    assert requirement.matches(not_strings) is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ram>=", "expected a value after '>=' at column 6"),
        ("ram", "expected an operator"),
        (">=4", "expected an attribute name"),
        ("4>=ram", "expected an attribute name"),
        ("ram>=4 and", "expected an attribute name such as ram or cpus, found the end"),
        ("ram>=4 cpus>=2", "expected 'and', 'or' or the end, found 'cpus' at column 8"),
        ("(ram>=4", "expected ')' (to close the '(' of column 1) at column 8"),
        ("ram>=4)", "found ')'"),
        ("ram>=$4", "unexpected character '$' at column 6"),
        ("ram>='4", "never closed"),
        ("ram>=4 and ; rm -rf /", "unexpected character ';'"),
        ("__import__('os')", "unknown attribute '__import__'"),
        ("ram >= 4GiB or", "found the end"),
        ("ram==and", "expected a value after '=='"),
        ("mw==native,condor", "unexpected character ','"),  # quote a value holding commas
    ],
)
def test_parse_errors_say_where_and_give_an_example(text: str, message: str) -> None:
    with pytest.raises(RequirementError) as caught:
        Requirement.parse(text)
    assert message in str(caught.value)
    assert f"cannot read requirement {text!r}" in str(caught.value)
    assert "example: ram>=4GiB and cpus>=2" in str(caught.value)


def test_error_message_matches_the_documented_example() -> None:
    with pytest.raises(RequirementError) as caught:
        Requirement.parse("ram>=")
    assert str(caught.value) == (
        "cannot read requirement 'ram>=': expected a value after '>=' at column 6; "
        "example: ram>=4GiB and cpus>=2"
    )


def test_deep_nesting_is_a_clear_error_not_a_recursion_error() -> None:
    for text in ["(" * 10_000 + "cpus>=1" + ")" * 10_000, "not " * 10_000 + "cpus>=1"]:
        with pytest.raises(RequirementError, match="nesting deeper than"):
            Requirement.parse(text)
    assert Requirement.parse("(" * 50 + "cpus>=1" + ")" * 50).matches(PEER)


def test_long_flat_expressions_parse_and_huge_ones_are_refused() -> None:
    long_text = " and ".join(f"cpus>={i % 4}" for i in range(5000))
    assert Requirement.parse(long_text).matches(PEER)
    with pytest.raises(RequirementError, match="the limit is"):
        Requirement.parse("cpus>=1 and " * 10_000 + "cpus>=1")


def test_parse_refuses_non_text() -> None:
    with pytest.raises(RequirementError, match="must be text"):
        Requirement.parse(4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("ram >= 4GiB  AND cpus>=2", "ram>=4GiB and cpus>=2"),
        ("cpus==1 && (v==2 || txt.c==3)", "cpus==1 and (v==2 or txt.c==3)"),
        ("(cpus==1 and v==2) or txt.c==3", "cpus==1 and v==2 or txt.c==3"),
        ("(cpus==1 and v==2) and txt.c==3", "cpus==1 and v==2 and txt.c==3"),
        ("!(cpus==1 or v==2)", "not (cpus==1 or v==2)"),
        ("! cpus==1", "not cpus==1"),
        ("os='my os'", 'os=="my os"'),
        ("os=='linux'", "os==linux"),
        ("TXT.X=='and'", 'txt.x=="and"'),
        ("arch==''", 'arch==""'),
        ("Memory>=4G and OpSys==LINUX", "ram>=4G and os==LINUX"),
        ("", "true"),
    ],
)
def test_str_is_canonical_and_parses_back(text: str, canonical: str) -> None:
    requirement = Requirement.parse(text)
    assert str(requirement) == canonical
    assert Requirement.parse(str(requirement)) == requirement


def test_combine_ands_the_non_empty_texts() -> None:
    assert combine() == Requirement.everything()
    assert combine(None, "", "  ") == Requirement.everything()
    both = combine("ram>=4GiB", None, "cpus>=2 or arch==arm")
    assert str(both) == "ram>=4GiB and (cpus>=2 or arch==arm)"
    assert both.matches(PEER)
    assert not both.matches({**PEER, "ram": "1024"})
    assert Requirement.everything() & Requirement.parse("cpus>=2") == Requirement.parse("cpus>=2")
    with pytest.raises(RequirementError):
        combine("ram>=4GiB", "cpus>=")


def test_everything_matches_every_peer() -> None:
    assert Requirement.everything().matches({})
    assert Requirement.everything().matches(PEER)
    assert str(Requirement.everything()) == "true"


@settings(deadline=None)  # a loaded CI box must not turn a slow example into a failure
@given(st.text(max_size=200))
def test_parse_raises_only_requirement_error(text: str) -> None:
    try:
        requirement = Requirement.parse(text)
    except RequirementError:
        return
    assert Requirement.parse(str(requirement)) == requirement
    requirement.matches(PEER)


_VALUES = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(["4GiB", "512MiB", "2G", "1.5TiB", "x86_64", "linux", "condor", "0.5"]),
    st.text(max_size=8).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
)
_COMPARISONS = st.builds(
    lambda key, op, value: f"{key}{op}{value}",
    st.sampled_from(["cpus", "ram", "disk", "cost", "arch", "mw", "txt.gpu", "Memory", "OPSYS"]),
    st.sampled_from([">=", "<=", ">", "<", "==", "!="]),
    _VALUES,
)
_EXPRESSIONS = st.recursive(
    _COMPARISONS,
    lambda inner: st.one_of(
        st.builds(lambda a, b: f"{a} and {b}", inner, inner),
        st.builds(lambda a, b: f"{a} or {b}", inner, inner),
        st.builds(lambda a: f"not ({a})", inner),
        st.builds(lambda a: f"({a})", inner),
    ),
    max_leaves=12,
)


@settings(deadline=None)
@given(_EXPRESSIONS, st.dictionaries(st.sampled_from(list(PEER)), st.text(max_size=10)))
def test_valid_expressions_round_trip_and_keep_their_meaning(
    text: str, attrs: dict[str, str]
) -> None:
    requirement = Requirement.parse(text)
    again = Requirement.parse(str(requirement))
    assert again == requirement
    assert again.matches(attrs) == requirement.matches(attrs)
    assert again.matches(PEER) == requirement.matches(PEER)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Memory2 >= 4096", "unknown attribute 'Memory2' (did you mean Memory?); known: cpus, ram"),
        ("gpu>=1", "unknown attribute 'gpu'; known: cpus, ram, disk"),
        ("cpus>=1 and rma>=2G", "unknown attribute 'rma' (did you mean ram?)"),
    ],
)
def test_an_unknown_attribute_is_an_error_listing_the_known_ones(text: str, message: str) -> None:
    with pytest.raises(RequirementError) as caught:
        Requirement.parse(text)
    assert message in str(caught.value)
    assert "HTCondor's Memory, Cpus, Disk, Arch, OpSys; txt.NAME" in str(caught.value)


def test_the_known_attributes_are_the_txt_schema() -> None:
    from bonjourgrid.discovery.txt import PEER_KEYS
    from bonjourgrid.requirements import _NATIVE

    assert _NATIVE == PEER_KEYS
    assert set(ALIASES.values()) <= PEER_KEYS


def test_txt_needs_a_key_after_it() -> None:
    with pytest.raises(RequirementError, match=r"after 'txt\.' write a TXT key a peer advertises"):
        Requirement.parse("txt.>=1")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("ram>=8GiB", "ram>=8GiB (it has 4.0 GiB)"),
        ("cpus>=2 and Memory>=8G", "ram>=8G (it has 4.0 GiB)"),
        ("cpus>=8", "cpus>=8 (it has 4)"),
        (
            "cpus>=2 and (ram>=8G or arch==arm)",
            "ram>=8G or arch==arm (it has ram 4.0 GiB, arch x86_64)",
        ),
        ("txt.gpu==a100", "txt.gpu==a100 (it has no txt.gpu)"),
        ("false", "false"),
        ("ram>=4G and ram<=4G", None),
    ],
)
def test_explain_names_the_failing_clause_and_what_the_peer_has(text: str, why: str | None) -> None:
    assert Requirement.parse(text).explain({**PEER, "ram": "4096"}) == why
