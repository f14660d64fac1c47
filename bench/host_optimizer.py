"""Time of one optimizer step on the host CPU: what an optimizer-offload config (and every CPU run) waits for.

    python bench/host_optimizer.py [--params N] [--threads T] [--out bench/results/host-optimizer-<host>.json]

Each optimizer updates the same N fp32 parameters (in 20M-element groups, as the trainer groups them) with
random gradients, in a fresh process: one warm-up step, then the fastest of three timed steps. Optimizers:

  adamw8bit   bitsandbytes AdamW8bit (train.optimizer=adamw8bit): 2 bytes of state per parameter
  cpu_adam    DeepSpeed's DeepSpeedCPUAdam (train.optimizer=cpu_adam, built on first use): 8 bytes
  torch_fused torch.optim.AdamW(fused=True): 8 bytes
  torch_foreach torch.optim.AdamW(foreach=True): 8 bytes

Prints a table (seconds per step, nanoseconds per parameter, speed relative to adamw8bit) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.provenance import provenance  # noqa: E402

OPTIMIZERS = ("adamw8bit", "cpu_adam", "torch_fused", "torch_foreach")
GROUP = 20_000_000  # iclight_ds.train.engine.MAX_GROUP_ELEMENTS


def one(name: str, n: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(min(GROUP, n - i))) for i in range(0, n, GROUP)]
    for p in params:
        p.grad = torch.randn_like(p)
    groups = [{"params": [p]} for p in params]
    if name == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(groups, lr=1e-5)
    elif name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, lr=1e-5, adamw_mode=True)
    else:
        opt = torch.optim.AdamW(groups, lr=1e-5, fused=name == "torch_fused", foreach=name == "torch_foreach")
    before = params[0].detach()[:1000].clone()
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    moved = bool((params[0].detach()[:1000] != before).any())
    if not moved:
        raise RuntimeError(f"{name}: the step left the parameters unchanged")
    step = min(times[1:])
    return {"optimizer": name, "params": n, "threads": threads, "step_s": step, "ns_per_param": step / n * 1e9,
            "step_times_s": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=2e8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    n = int(args.params)
    if args.one:
        print(json.dumps(one(args.one, n, args.threads)))
        return

    results = []
    for name in OPTIMIZERS:
        cmd = [sys.executable, __file__, "--one", name, "--params", str(n), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            results.append({"optimizer": name, "error": (proc.stdout + proc.stderr)[-2000:]})
            print(f"{name}: failed (exit {proc.returncode})", flush=True)
            continue
        results.append(json.loads(lines[-1]))
    base = next((r for r in results if r["optimizer"] == "adamw8bit" and "error" not in r), None)
    host = platform.processor() or platform.machine()
    print(f"\nhost: {host}, {os.cpu_count()} cores, {args.threads} threads; {n / 1e6:.0f}M fp32 parameters")
    print(f"{'optimizer':<15}{'step s':>9}{'ns/param':>10}{'vs adamw8bit':>14}")
    for r in results:
        if "error" in r:
            print(f"{r['optimizer']:<15} ERROR")
            continue
        r["speedup_vs_adamw8bit"] = base["step_s"] / r["step_s"] if base else None
        print(f"{r['optimizer']:<15}{r['step_s']:>9.3f}{r['ns_per_param']:>10.2f}"
              + (f"{r['speedup_vs_adamw8bit']:>13.1f}x" if base else ""))
    out = args.out or REPO / "bench" / "results" / f"host-optimizer-{platform.machine()}-{os.cpu_count()}cores.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    prov = provenance("bench/host_optimizer.py", sys.argv[1:])
    out.write_text(json.dumps({"provenance": prov, "host": host, "cores": os.cpu_count(), "threads": args.threads,
                               "params": n, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
