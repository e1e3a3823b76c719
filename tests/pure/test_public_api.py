"""The public names of `bonjourgrid` (as httpx's test_exported_members), and their cost."""

from __future__ import annotations

import inspect
import subprocess
import sys

import bonjourgrid
from bonjourgrid import errors

# name -> what it is: a change here is a change of the public API, made on purpose.
PUBLIC = {
    "__version__": "str",
    "Workflow": "class",
    "run": "function",
    "Report": "class",
    "TaskReport": "class",
    "PeerReport": "class",
    "ByteCounts": "class",
    "BonjourGridError": "error",
    "DagError": "error",
    "RequirementError": "error",
    "ConfigError": "error",
    "KeyStoreError": "error",
    "StageError": "error",
    "TransferError": "error",
    "RecruitError": "error",
    "JobFailed": "error",
    "Interrupted": "interrupt",
}


def _kind(value: object) -> str:
    if isinstance(value, str):
        return "str"
    if inspect.isclass(value) and issubclass(value, errors.BonjourGridError):
        return "error"
    if inspect.isclass(value) and issubclass(value, KeyboardInterrupt):
        return "interrupt"
    if inspect.isclass(value):
        return "class"
    return "function" if inspect.isfunction(value) else type(value).__name__


def test_the_public_names_are_pinned() -> None:
    assert sorted(bonjourgrid.__all__) == sorted(PUBLIC)
    assert {name: _kind(getattr(bonjourgrid, name)) for name in PUBLIC} == PUBLIC
    for name in PUBLIC:  # `from bonjourgrid import *` and dir() agree with __all__
        assert name in dir(bonjourgrid)


def test_the_public_workflow_is_not_the_internal_model() -> None:
    from bonjourgrid import dag

    assert bonjourgrid.Workflow is not dag.Workflow  # type: ignore[comparison-overlap]
    assert bonjourgrid.Workflow.__module__ == "bonjourgrid.api"


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        bonjourgrid.Wrokflow  # noqa: B018
    except AttributeError as err:
        assert "Wrokflow" in str(err)
    else:
        raise AssertionError("bonjourgrid.Wrokflow should not exist")


def test_importing_the_package_imports_none_of_it() -> None:
    # The worker daemons and `bgrid submit --local`'s first task pay for every import here.
    code = (
        "import sys, bonjourgrid; "
        "print(sorted(m for m in sys.modules if m.startswith('bonjourgrid.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_cli_starts_without_the_api() -> None:
    code = (
        "import sys, bonjourgrid.cli; "
        "print(sorted(m for m in sys.modules if m in ('bonjourgrid.api', 'networkx', 'yaml')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
