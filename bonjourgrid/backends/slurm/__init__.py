"""The slurm backend: a transient Slurm cluster per job over the recruited peers (EC3's idea)."""

from bonjourgrid.backends.slurm.backend import SlurmBackend

__all__ = ["SlurmBackend"]
