"""Within reuse_freed_memory a freed large block is reused instead of page-faulted in again."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from decoders.host_allocator import is_active, reuse_freed_memory

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MB)


def _faults_of_second_allocation() -> int:
    first = torch.ones(BLOCK // 4)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.ones(BLOCK // 4)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del second
    return faults


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the setting is glibc's mallopt; elsewhere reuse_freed_memory is a no-op",
)
def test_freed_blocks_stay_mapped_inside_and_are_returned_after() -> None:
    pages = BLOCK // resource.getpagesize()
    outside = _faults_of_second_allocation()
    with reuse_freed_memory() as applied:
        assert applied and is_active()
        with reuse_freed_memory() as nested:  # nesting keeps the setting until the outer block ends
            assert nested
        _faults_of_second_allocation()  # the first big block now comes from the heap
        inside = _faults_of_second_allocation()
    after = _faults_of_second_allocation()
    assert not is_active()
    assert outside > pages // 2, "glibc maps a 64 MB block afresh each time by default"
    assert inside < pages // 10
    assert after > pages // 2, "the default is restored when the block ends"


def test_disabled_is_a_no_op() -> None:
    with reuse_freed_memory(enabled=False) as applied:
        assert not applied
