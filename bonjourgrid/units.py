"""Human sizes ("4GiB", "512MiB", "2G", "1500") to numbers and back.

K, M, G and T mean 2**10, 2**20, 2**30 and 2**40 whatever follows them (B, iB or nothing):
"4G", "4GB" and "4GiB" are the same 4096 MiB, as in HTCondor, Slurm and Docker.
"""

from __future__ import annotations

import re

from bonjourgrid.errors import ConfigError

# One rule everywhere (worker flags, worker.toml, bgrid.toml, workflow limits, --require):
# K, M, G, T, with or without B or i, are powers of 1024, as HTCondor and Slurm read them.
_UNITS = {
    "": 1,
    "b": 1,
    **{
        prefix + suffix: 1024**power
        for power, prefix in enumerate("kmgt", start=1)
        for suffix in ("", "b", "i", "ib")
    },
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
MIB = 1024**2


def parse_size(text: str) -> int:
    """Bytes in a size such as "4GiB", "512 MiB" or "1500" (bytes)."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(
            f"{text!r} is not a size: write a number with an optional unit, e.g. 4GiB, 512MiB, 2G"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def parse_size_mib(text: str) -> int:
    """Whole MiB in a size; a bare number counts as MiB (as in the `ram` TXT key)."""
    if re.fullmatch(r"\s*\d+(?:\.\d+)?\s*", text):
        return int(float(text))
    return parse_size(text) // MIB


def format_size(n_bytes: float) -> str:
    """A short human size: 1.5 GiB, 300 MiB, 12 KiB, 7 B."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
