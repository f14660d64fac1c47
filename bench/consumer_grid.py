"""The consumer grid measured: each cell's config (the planner's answer, `python -m iclight_ds.plan --grid`) trained
on the full SD1.5-shaped UNet, one row per cell.

    python bench/consumer_grid.py [--resolution R] [--configs a,b,...] [--nvme-path DIR] [--size full|tiny]
                                  [--accumulation N|shipped] [--case-timeout S]
                                  [--out bench/results/consumer-grid-<device>.json]

Every (config, LoRA rank) the grid names runs once, in a fresh process, through our Trainer with the same synthetic
sample and noise as bench/memory.py (batch 1, three UNet rows for vanilla + consistency, the frozen encoders dropped
after encoding), by default a micro-batch per optimizer step (accumulation 1: the optimizer step, which offload
moves to the host or the SSD, is in every step). `--accumulation shipped` keeps each config's own accumulation (a
step is then that many micro-batches and one optimizer step, as a run with the config trains). Step time is the
fastest step after the first. NVMe configs swap into --nvme-path (default: a folder under
BENCH_TMP, /tmp/iclight-bench).

On a GPU each cell runs with the device capped to the cell's size (torch.cuda.set_per_process_memory_fraction) and
records the device peak (torch.cuda.max_memory_allocated) and the host's peak RSS. On a CPU there is no device: the
run's peak RSS holds what would be on the GPU too, so it is an upper bound of the host side (`host_peak_gib`), set
beside the planner's estimate for the same run on a CPU (`planner_cpu_gib`: everything in RAM) and its host
estimate for the cell (`planner_host_gib`). `--configs` picks what runs (on a CPU the grid's RAM-offload configs
need 20+ GiB: run them on a machine that has it); a cell whose config did not run keeps null measurements.
The rows: gpu_gib, ram_gib, gpus, config, lora_rank, device_peak_gib, host_peak_gib, step_s, fits (measured peaks
within the planner's headroom of the cell; null where nothing was measured), and the planner's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO), str(BENCH)]

from bench.provenance import provenance  # noqa: E402

GiB = 2**30
STEPS = 3  # one warm-up step, then timed ones


def case(resolution: int, ds_path: str, lora_rank: int, nvme_path: str | None, size: str,
         gpu_gib: float | None) -> dict:
    """One run's numbers (inside its own process)."""
    import psutil
    import torch

    from iclight_ds.config import load_config
    from iclight_ds.train import engine as eng
    from iclight_ds.train.trainer import Trainer
    from memory import device_peak_gib, losses, make_inputs, peak_rss_gib, timed_steps

    class Bench(Trainer):
        def _next_batch(self):
            return None

        def forward_backward(self, batch):
            terms = losses(self.engine, self.cond, self.noise, self.t)
            self.engine.backward(terms["loss"])
            self.engine.step()
            return {k: v.detach() for k, v in terms.items()}

    if gpu_gib is not None:  # the cell's GPU
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu_gib * 1e9 / total))
    out = Path(os.environ.get("BENCH_TMP", "/tmp/iclight-bench")) / f"grid-{Path(ds_path).stem}-r{lora_rank}"
    over = {"train.ds_config": ds_path, "model.size": size, "data.resolution": resolution, "data.synth_samples": 4,
            "train.output_dir": str(out), "logging.wandb": False, "logging.progress": False,
            "logging.tensorboard": False, "data.num_workers": 0, "train.export": False, "model.lora_rank": lora_rank}
    if nvme_path:
        over["train.nvme_path"] = nvme_path
    trainer = Bench(load_config(None, over))
    device = trainer.acc.device
    trainer.cond, trainer.noise, trainer.t = make_inputs(resolution, (trainer.vae, trainer.text_encoder), device)
    trainer.vae = trainer.text_encoder = None  # as in a run from a latent cache
    init_rss = psutil.Process().memory_info().rss / GiB
    times = timed_steps(trainer, device, STEPS)
    result = {"host_peak_gib": peak_rss_gib(), "init_rss_gib": init_rss, "device_peak_gib": device_peak_gib(device),
              "optimizer": trainer.run.optimizer, "attention": trainer.run.attention,
              "accumulation": trainer.geometry.accumulation, "step_s": min(times[1:]),
              "step_times_s": times}
    trainer._remove_nvme_swap()
    eng.shutdown()
    return result


def run_case(args: list[str], timeout: int) -> dict:
    out = Path(os.environ["BENCH_TMP"]) / f"grid-case-{os.getpid()}-{time.time_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case-out", str(out), *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
               HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"exit {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    return json.loads(out.read_text())


def bench_config(name: str, device: str, tmp: Path, accumulation: str = "1") -> Path:
    """The shipped config with micro-batch 1, `accumulation` micro-batches per optimizer step ("shipped": the
    config's own), and on a CPU no comm overlap, as bench/memory.py runs them."""
    ds = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
    if accumulation != "shipped":
        ds["gradient_accumulation_steps"] = int(accumulation)
    ds["train_micro_batch_size_per_gpu"] = 1
    if device == "cpu" and "zero_optimization" in ds:
        ds["zero_optimization"]["overlap_comm"] = False
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(ds))
    return path


def planner_numbers(name: str, lora_rank: int, resolution: int, size: str, bench_ds: Path) -> dict:
    """The planner's estimate of the bench run on a CPU (everything in RAM, the micro-batch of 1 the bench runs), as
    the trainer plans a run from raw data: with the frozen VAE and text encoder, which the bench builds to encode its
    input and then drops (their freed memory mostly stays in the process: glibc's heap keeps it, except under ZeRO-3
    on a CPU, where the trainer pins the mmap threshold)."""
    from iclight_ds.train import engine as eng
    from iclight_ds.train import plan

    work = plan.Workload(resolution=resolution, size=size, lora_rank=lora_rank)
    est = plan._estimate(bench_ds, work, gpu_mem_gib=None, gpus=1, ram_gib=1e6, nvme_gib=1e6)
    return {"planner_cpu_gib": est.host_gib, "planner_disk_gib": est.disk_gib,
            "planner_optimizer": est.optimizer, "zero_stage": eng.zero_stage(eng.read_ds_config(bench_ds))}



def rows_for(cells, measured: dict, planned: dict, device: str) -> list[dict]:
    from iclight_ds.train.plan import HEADROOM

    rows = []
    for c in cells:
        m, p = measured.get((c.config, c.lora_rank)), planned.get((c.config, c.lora_rank), {})
        ok = m is not None and "error" not in m
        host = m["host_peak_gib"] if ok else None
        dev = m["device_peak_gib"] if ok else None
        fits = None
        if ok:  # on a CPU the device side is the planner's (there is no device to measure)
            dev_fits = (dev if dev is not None else c.device_gib) <= HEADROOM * c.gpu_gib
            fits = bool(dev_fits and host * c.gpus <= HEADROOM * c.ram_gib)
        rows.append({"gpu_gib": c.gpu_gib, "ram_gib": c.ram_gib, "gpus": c.gpus, "config": c.config,
                     "lora_rank": c.lora_rank, "device_peak_gib": dev, "host_peak_gib": host,
                     "step_s": m["step_s"] if ok else None, "fits": fits,
                     "planner_device_gib": c.device_gib, "planner_host_gib": c.host_gib,
                     "planner_disk_gib": c.disk_gib, **p, "error": m.get("error") if m and not ok else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=None, help="default: 256 on a CPU, 512 on a GPU")
    p.add_argument("--configs", default=None, help="(config[:lora_rank]),... to run (default: every one of the grid)")
    p.add_argument("--nvme-path", default=None, help="where the NVMe configs swap (default: under BENCH_TMP)")
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--accumulation", default="1",
                   help="micro-batches per optimizer step: a number, or `shipped` for each config's own (default 1)")
    p.add_argument("--case-timeout", type=int, default=3600)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--update", action="store_true", help="keep the runs already in --out that this call does not run")
    p.add_argument("--case-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--case", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--gpu-gib", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:  # inside a case process
        result = case(args.resolution, args.case[0], int(args.case[1]), args.nvme_path, args.size, args.gpu_gib)
        Path(args.case_out).write_text(json.dumps(result))
        return 0

    import torch

    from iclight_ds.train.plan import Workload, grid

    device = "cuda" if torch.cuda.is_available() else "cpu"
    resolution = args.resolution or (512 if device == "cuda" else 256)
    tmp = Path(os.environ.setdefault("BENCH_TMP", "/tmp/iclight-bench"))
    tmp.mkdir(parents=True, exist_ok=True)
    nvme = args.nvme_path or str(tmp / "nvme")
    Path(nvme).mkdir(parents=True, exist_ok=True)
    cells = grid(Workload(resolution=512, size=args.size))  # the grid is planned at 512 px
    runs = sorted({(c.config, c.lora_rank) for c in cells})
    if args.configs:
        wanted = [(s.split(":")[0], int(s.split(":")[1]) if ":" in s else 0) for s in args.configs.split(",")]
        runs = wanted
    out = args.out or REPO / "bench" / "results" / f"consumer-grid-{device}.json"
    header = {"device": device, "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "resolution": resolution, "size": args.size, "accumulation": args.accumulation,
              "provenance": provenance("bench/consumer_grid.py", argv)}
    measured, planned = {}, {}
    if args.update and out.is_file():  # the earlier runs, each with the provenance it was measured with
        for key, run in json.loads(out.read_text()).get("runs", {}).items():
            name, rank = key.rsplit(":", 1)
            planned[(name, int(rank))] = {k: run[k] for k in ("planner_cpu_gib", "planner_disk_gib",
                                                              "planner_optimizer", "zero_stage") if k in run}
            measured[(name, int(rank))] = {k: v for k, v in run.items() if k not in planned[(name, int(rank))]}
    for name, rank in runs:
        ds = bench_config(name, device, tmp, args.accumulation)
        planned[(name, rank)] = planner_numbers(name, rank, resolution, args.size, ds)
        gpu_cells = [c.gpu_gib for c in cells if (c.config, c.lora_rank) == (name, rank)] if device == "cuda" else []
        print(f"running {name} (LoRA rank {rank}) ...", flush=True)
        case_args = ["--case", str(ds), str(rank), "--resolution", str(resolution), "--size", args.size,
                     "--nvme-path", nvme] + (["--gpu-gib", str(min(gpu_cells))] if gpu_cells else [])
        measured[(name, rank)] = {**run_case(case_args, args.case_timeout), "provenance": header["provenance"]}
        print(json.dumps(measured[(name, rank)])[:300], flush=True)
        rows = rows_for(cells, measured, planned, device)
        by_run = {f"{n}:{r}": {**planned[(n, r)], **measured[(n, r)]} for n, r in measured}
        out.write_text(json.dumps({**header, "rows": rows, "runs": by_run}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
