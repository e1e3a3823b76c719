"""The condor backend: a personal HTCondor pool over the recruited peers (or an existing
pool), the DAG run by DAGMan, through HTCondor's Python bindings (`htcondor2`)."""

from bonjourgrid.backends.condor.backend import CondorBackend

__all__ = ["CondorBackend"]
