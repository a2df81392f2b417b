"""Freed memory kept for reuse inside a job (lingshu.memory): a large buffer allocated and freed
again and again faults its pages in once, not at every allocation."""

import os
import platform
import subprocess
import sys

import pytest

CHILD = """
import resource, sys
from lingshu.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    buf = bytearray(64 << 20)  # 64 MiB, zero-filled: every page touched
    del buf
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    run = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         check=True, env=env)
    return int(run.stdout.strip())


GLIBC = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc's mallopt only")


@GLIBC
def test_a_freed_large_buffer_is_reused_without_new_page_faults():
    pages = (64 << 20) // 4096
    default, kept = _page_faults("default"), _page_faults("keep")
    assert default > 15 * pages  # glibc maps and unmaps the buffer at each round
    assert kept < 3 * pages  # kept: faulted in once (and reused 19 times)


@GLIBC
def test_programs_a_job_starts_get_the_same_settings():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    code = ("import os; from lingshu.memory import keep_freed_memory; ok = keep_freed_memory(); "
            "print(ok, os.environ.get('MALLOC_MMAP_MAX_'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    assert out == ["True", "0"]
