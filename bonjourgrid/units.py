"""Human sizes ("4GiB", "512MiB", "2G", "1500") to numbers and back."""

from __future__ import annotations

import re

from bonjourgrid.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1024**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ti": 1024**4,
    "tib": 1024**4,
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
