"""Within reuse_freed_memory a freed large block is reused instead of page-faulted in again."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys

import pytest

from decoders.host_allocator import is_active, reuse_freed_memory

# Run in a fresh interpreter, as a training process is: in this one, earlier tests may have forked
# helper processes, and copy-on-write then faults in written pages whatever the allocator does.
# One torch thread: with OpenMP's workers running, the block sometimes came back freshly mapped inside the
# setting too (about one probe in four under pytest), which is about thread start-up, not the setting.
PROBE = """
import json, resource, torch
torch.set_num_threads(1)
from decoders.host_allocator import is_active, reuse_freed_memory

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MB)

def faults_of_second_allocation():
    first = torch.ones(BLOCK // 4)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.ones(BLOCK // 4)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del second
    return faults

outside = faults_of_second_allocation()
with reuse_freed_memory() as applied:
    with reuse_freed_memory() as nested:
        pass
    still_active = is_active()
    faults_of_second_allocation()
    inside = faults_of_second_allocation()
after = faults_of_second_allocation()
print(json.dumps({"outside": outside, "inside": inside, "after": after, "applied": applied,
                  "nested": nested, "still_active": still_active, "active_after": is_active()}))
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the setting is glibc's mallopt; elsewhere reuse_freed_memory is a no-op",
)
def test_freed_blocks_stay_mapped_inside_and_are_returned_after() -> None:
    pages = 64 * 2**20 // resource.getpagesize()
    inside = []
    # Up to three fresh interpreters: rarely (in one full CI run; in none of 40 probes run alone) a probe got
    # its block freshly mapped inside the setting too, every page faulted. A setting that does not apply
    # fails all three.
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        probe = json.loads(done.stdout.strip().splitlines()[-1])
        assert probe["applied"] and probe["nested"]
        assert probe["still_active"], "a nested block keeps the setting until the outer one ends"
        assert not probe["active_after"]
        assert probe["outside"] > pages // 2, "glibc maps a 64 MB block afresh each time by default"
        assert probe["after"] > pages // 2, "the default is restored when the block ends"
        inside.append(probe["inside"])
        if probe["inside"] < pages // 10:
            break
    assert min(inside) < pages // 10, f"page faults of a reused 64 MB block, per probe: {inside}"


def test_disabled_is_a_no_op() -> None:
    with reuse_freed_memory(enabled=False) as applied:
        assert not applied and not is_active()
