"""Workflows: the task model, the file-flow graph, and loading with full validation."""

from bonjourgrid.dag.loader import (
    load_workflow,
    parse_worker_range,
    workflow_from_mapping,
)
from bonjourgrid.dag.model import GridSpec, TaskSpec, Workflow, normalize_path

__all__ = [
    "GridSpec",
    "TaskSpec",
    "Workflow",
    "load_workflow",
    "normalize_path",
    "parse_worker_range",
    "workflow_from_mapping",
]
