"""Host memory: the trainer pins glibc's mmap threshold for ZeRO-3 on CPU so freed tensors leave the process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import subprocess_env

# 100 tensors of 4 MiB held at once, then a small survivor allocated after them, then the 100 freed. Before
# the loop a 16 MiB tensor is freed, which lifts glibc's dynamic threshold above 4 MiB: the 4 MiB blocks
# then come from the heap, and the survivor on top of them keeps the heap from shrinking.
CHURN = r"""
import json, sys
import psutil, torch
if sys.argv[1] == "pin":
    from iclight_ds.train.engine import pin_malloc_mmap_threshold
    assert pin_malloc_mmap_threshold()
rss = lambda: psutil.Process().memory_info().rss
lift = torch.ones(4 << 20)
del lift
before = rss()
blocks = [torch.ones(1 << 20) for _ in range(100)]
survivor = torch.ones(4096)
del blocks
print(json.dumps({"retained_mib": (rss() - before) / 2**20}))
"""


def _retained_mib(mode: str) -> float:
    env = subprocess_env()
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # glibc's own default, unless the child pins it
    out = subprocess.run([sys.executable, "-c", CHURN, mode], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["retained_mib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_pinned_threshold_returns_freed_tensors_to_the_os():
    unpinned = _retained_mib("default")
    pinned = _retained_mib("pin")
    assert unpinned > 300, f"glibc kept only {unpinned:.0f} MiB of 400 freed: the case this guards is gone"
    assert pinned < 50, f"{pinned:.0f} MiB of 400 freed MiB stayed in the process with the pinned threshold"
