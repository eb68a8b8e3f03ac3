"""Sizes as people read them, in one place so every command and error prints them alike."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """Decimal units, as disks and `du -h --si` count: ``950 B``, ``1.5 MB``, ``31.2 GB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
