"""Benchmark scripts refuse bad arguments with one line naming them, before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--frames", "64,abc"], "--frames '64,abc': give comma-separated whole numbers"),
        (["--frames", "0,64"], "must all be at least 1"),
        (["--repeat", "0"], "--repeat 0"),
    ],
)
def test_bench_memory_refuses_bad_sizes(args: list[str], expected: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_memory.py"), "--data", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert expected in done.stderr and "Traceback" not in done.stderr
