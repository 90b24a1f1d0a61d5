"""Sizes written by users (`--max-memory 2GB`, a shard size in a plan): parsed here, below the config, so a
malformed size is refused when the settings are read rather than once a job has started."""

from __future__ import annotations

import re

from swm_ray.errors import UserError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size_bytes(text: str) -> int:
    """'2GB', '512MiB', '1.5g', '1000000' -> bytes (GB = 10^9, GiB = 2^30); ValueError for anything else (the
    config's validators raise it as is)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].lower() not in _UNITS:
        raise ValueError(f"{text!r}: expected a size such as 2GB, 512MiB or 1.5GiB")
    value = int(float(m[1]) * _UNITS[m[2].lower()])
    if value <= 0:
        raise ValueError(f"{text!r}: must be more than zero")
    return value


def parse_size(text: str | int | None, what: str = "--max-memory") -> int | None:
    """`size_bytes` with a one-line UserError naming the setting (`what`); an int or None stays as it is."""
    if text is None or isinstance(text, int):
        return text
    try:
        return size_bytes(text)
    except ValueError as e:
        raise UserError(f"{what} {e}") from None
