"""Workflows: the task model, the file-flow graph, and loading with full validation.

The loader reads native YAML/JSON, and WfCommons WfFormat instances through dag/wfformat.py.
"""

from bonjourgrid.dag.loader import (
    load_workflow,
    parse_worker_range,
    workflow_from_mapping,
)
from bonjourgrid.dag.model import GridSpec, TaskSpec, Workflow, normalize_path
from bonjourgrid.dag.wfformat import WfFormatOptions

__all__ = [
    "GridSpec",
    "TaskSpec",
    "WfFormatOptions",
    "Workflow",
    "load_workflow",
    "normalize_path",
    "parse_worker_range",
    "workflow_from_mapping",
]
