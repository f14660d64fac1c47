"""Build DeepSpeed's JIT-compiled C++ ops into torch's extension cache (~/.cache/torch_extensions), in the order the
test tiers first need them: the CPU all-reduce, CPU Adam, pinned memory, async I/O (NVMe offload). DeepSpeed
otherwise compiles each at its first use, minutes on two cores with nothing else running meanwhile.

tests/conftest.py starts this in a background process, at low priority, while the unit tier runs; an op a test needs
before it is built waits on torch's build lock and then loads the finished build. An op already built only loads.
"""

from __future__ import annotations

import os
import time

OPS = ("ShareMemCommBuilder", "CPUAdamBuilder", "PinMemoryBuilder", "AsyncIOBuilder")


def main() -> None:
    os.nice(10)  # the tests first: the build takes the CPU they leave
    from deepspeed.accelerator import get_accelerator

    for name in OPS:
        started = time.monotonic()
        try:
            builder = get_accelerator().create_op_builder(name)
            if builder is None or not builder.is_compatible(verbose=False):
                print(f"{name}: not built (not available or not compatible here)", flush=True)
                continue
            builder.load(verbose=False)
        except Exception as e:  # the test that needs the op reports it; this only logs
            print(f"{name}: {type(e).__name__}: {e}", flush=True)
            continue
        print(f"{name}: ready after {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
