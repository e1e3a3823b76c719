"""BonjourGrid: idle desktops found over mDNS, recruited on the fly, handed back.

The public API, for programs (the `bgrid` command is the other face):

    from bonjourgrid import Workflow, run
    report = run(Workflow.load("hello.yaml"), local=2)

Every name below is imported on first use (PEP 562): `import bonjourgrid` stays cheap, and
so do the `bgrid worker` daemons and the first task of `bgrid submit --local`, which import
the package without needing any of it.
"""

from __future__ import annotations

import sys as _sys

__version__ = "0.1.0"

TYPE_CHECKING = False  # not typing's: importing typing would triple this module's cost
if TYPE_CHECKING:
    from typing import Any

    from bonjourgrid.api import Workflow, run
    from bonjourgrid.errors import (
        BonjourGridError,
        ConfigError,
        DagError,
        Interrupted,
        JobFailed,
        KeyStoreError,
        RecruitError,
        RequirementError,
        StageError,
        TransferError,
    )
    from bonjourgrid.job_report import ByteCounts, PeerReport, Report, TaskReport

# public name -> the module that defines it
_PUBLIC = {
    "Workflow": "bonjourgrid.api",
    "run": "bonjourgrid.api",
    "Report": "bonjourgrid.job_report",
    "TaskReport": "bonjourgrid.job_report",
    "PeerReport": "bonjourgrid.job_report",
    "ByteCounts": "bonjourgrid.job_report",
    "BonjourGridError": "bonjourgrid.errors",
    "DagError": "bonjourgrid.errors",
    "RequirementError": "bonjourgrid.errors",
    "ConfigError": "bonjourgrid.errors",
    "KeyStoreError": "bonjourgrid.errors",
    "StageError": "bonjourgrid.errors",
    "TransferError": "bonjourgrid.errors",
    "RecruitError": "bonjourgrid.errors",
    "JobFailed": "bonjourgrid.errors",
    "Interrupted": "bonjourgrid.errors",
}

__all__ = [  # the names of _PUBLIC, written out for the type checkers and linters
    "BonjourGridError",
    "ByteCounts",
    "ConfigError",
    "DagError",
    "Interrupted",
    "JobFailed",
    "KeyStoreError",
    "PeerReport",
    "RecruitError",
    "Report",
    "RequirementError",
    "StageError",
    "TaskReport",
    "TransferError",
    "Workflow",
    "__version__",
    "run",
]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'bonjourgrid' has no attribute {name!r}")
    __import__(module)
    value = getattr(_sys.modules[module], name)
    globals()[name] = value  # the next access is a plain global
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
