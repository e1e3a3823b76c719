"""Backends: where a recruited set of peers runs the workflow (native workers, HTCondor, ...)."""
