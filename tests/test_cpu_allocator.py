"""dsmoe.cpu_allocator: with the setting a freed large tensor's pages are reused (no new page faults on the next
step); with DSMOE_SYSTEM_MALLOC=1 glibc's default (fresh mmap per large tensor) is kept. Counted in page faults,
not timed; each case in its own process, since the setting is per process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from dsmoe.cpu_allocator import allocator_note, keep_cpu_allocations
on = keep_cpu_allocations()
def step():
    t = torch.empty(16 * 2**20)      # 64 MiB: above glibc's largest mmap threshold
    t.fill_(1.0)                     # touch every page
    del t
# warm: the heap grows twice, on step 1 and on step 2 or 3 (a small allocation can land in the first freed
# block), then never again (30 of 30 probes on the 2-core CI-like VM); measure from step 4 on
step(); step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, allocator_note())
"""


def probe(**env):
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT))], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120)
    assert out.returncode == 0, out.stderr
    on, faults, *note = out.stdout.split()
    return on == "True", int(faults), " ".join(note)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_heap_reuse_removes_the_page_faults_of_large_tensors():
    on, faults, note = probe(DSMOE_SYSTEM_MALLOC="")
    off, faults_default, note_default = probe(DSMOE_SYSTEM_MALLOC="1")
    assert on and not off
    assert note == "malloc: heap only (no mmap for large tensors)" and note_default == "malloc: system default"
    pages = 3 * 16 * 2**20 * 4 // 4096                 # 3 steps x 64 MiB of 4 KiB pages
    assert faults_default > pages // 2, "glibc's default should fault the fresh mapping in every step"
    assert faults < pages // 20, f"{faults} page faults: the freed heap memory was not reused"
