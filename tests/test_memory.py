"""utils.keep_freed_memory: glibc keeps freed blocks for reuse, so repeated allocations stop page-faulting;
utils.free_heap_bytes counts them.

That it changes no number is tested in test_resume.py (a run with glibc's defaults equals one with it).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import utils

ROOT = Path(__file__).resolve().parents[1]
GLIBC = bool(utils.glibc_version())

# COUNT blocks of SIZE bytes from glibc's malloc (as torch's CPU allocator gets them), every page written,
# then freed, as a training step does with its activations; the page faults of 10 rounds after 2 rounds of
# warm-up. With glibc's defaults, ten 8 MiB blocks are trimmed off the top of the heap (80 MiB: more than
# twice its adaptive threshold, which stops at 32 MiB), and two 64 MiB blocks (one batch of feature maps
# at 288 px) are mapped on their own and unmapped when freed, so every round faults them in again. (Small
# objects allocated between the blocks would pin the heap's top at random places, so the blocks come
# straight from malloc.)
CHURN = """
import ctypes, resource, sys
sys.path.insert(0, sys.argv[1])
import utils

kept = utils.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE, COUNT = int(sys.argv[2]), int(sys.argv[3])

def churn():
    blocks = [libc.malloc(SIZE) for _ in range(COUNT)]
    for block in blocks:
        ctypes.memset(block, 1, SIZE)
    for block in blocks:
        libc.free(block)

churn(); churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    churn()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, utils.free_heap_bytes())
"""


def churn_faults(size: int, count: int, **env: str) -> tuple[bool, int, int]:
    """Whether keep_freed_memory took effect, the page faults of the 10 rounds, and the free heap after them."""
    environment = {key: value for key, value in os.environ.items() if key != "GLASS_MALLOC"}
    done = subprocess.run([sys.executable, "-c", CHURN, str(ROOT), str(size), str(count)], env={**environment, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    kept, faults, free_heap = done.stdout.split()
    return kept == "True", int(faults), int(free_heap)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc settings exist on Linux with glibc only")
@pytest.mark.parametrize("size, count", [(8 * 2**20, 10), (64 * 2**20, 2)], ids=["8MiB-blocks", "64MiB-blocks"])
def test_freed_memory_is_reused_without_page_faults(size, count):
    pages_written = 10 * size * count // 4096
    kept, faults, free_heap = churn_faults(size, count)
    assert kept and faults < pages_written // 100
    assert free_heap >= size * count  # kept, and counted as available to this process (common.available_memory)
    # glibc's defaults hand the blocks back and fault them in again: the cost this setting removes.
    kept, faults, free_heap = churn_faults(size, count, GLASS_MALLOC="system")
    assert not kept and faults > pages_written // 2
    assert free_heap < size * count


@pytest.mark.parametrize("name, value", [
    ("GLASS_MALLOC", "system"),
    ("MALLOC_TRIM_THRESHOLD_", "131072"),
    ("MALLOC_MMAP_MAX_", "0"),
    ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072"),
])
def test_the_users_own_malloc_settings_are_left_alone(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert utils.keep_freed_memory() is False


@pytest.mark.parametrize("value", ["bogus", "System"])
def test_a_glass_malloc_value_that_means_nothing_is_named(value):
    # In a child process: keep_freed_memory changes the malloc of the process it runs in.
    script = "import logging, sys; sys.path.insert(0, sys.argv[1]); import utils; logging.basicConfig(); " \
             "print(utils.keep_freed_memory())"
    done = subprocess.run([sys.executable, "-c", script, str(Path(utils.__file__).parent)], capture_output=True,
                          text=True, env={**os.environ, "GLASS_MALLOC": value}, check=True)
    assert done.stdout.strip() == "True"  # ignored: as without it
    assert done.stderr.startswith(f"WARNING:utils:GLASS_MALLOC={value} is not a setting and is ignored: its one "
                                  "value is 'system'") and len(done.stderr.splitlines()) == 1
