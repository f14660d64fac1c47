"""Training throughput of the IC-Light UNet (FC + consistency) in the trainer's own step, per switch and micro-batch.

    python bench/throughput.py [--size full|tiny] [--resolution R] [--cases a,b,...] [--micro-batches 1,2,...]
                               [--steps N] [--warmup N] [--min-time-s S] [--budget-s S] [--case-timeout S]
                               [--compile-backend inductor|aot_eager|eager] [--append] [--out FILE]

What is timed: `Trainer.train_step()`, the optimizer step a user's run takes: the case's DeepSpeed config (ZeRO stage,
offload, bf16) and optimizer as `build_models` builds them, noise and timesteps drawn per step, `iclight_losses`
(vanilla + consistency: 3 UNet rows per sample in one batched forward), the all-ranks finite check, one backward
and one engine step, gradient accumulation 1 (an optimizer step per micro-batch). The step is fed one conditioned
sample repeated to the micro-batch, as a run from a latent cache is (`data.cache`: no VAE or text encoder in the
step); the frozen encoders are dropped once it is encoded. Each case (one configuration) is a fresh process that
builds its engine once and runs the micro-batches in ascending order; an out-of-memory error ends its sweep (the
larger ones are recorded as not run). A case that dies or passes its time (--case-timeout, or what is left of
--budget-s) keeps the rows it finished; the cases not started are recorded as not run.

Per row: `step_s` is the median of the timed steps (at least --steps, and at least --min-time-s of them, after
--warmup steps whose first is `first_step_s`: optimizer states, compilation); `samples_per_s` = micro-batch /
step_s; FLOPs are counted once per shape with torch's FlopCounterMode on the meta device (model FLOPs: forward and
backward of the objective without recomputation; `hardware_flops` adds gradient checkpointing's recomputation);
`tflops` = model FLOPs / step_s; `mfu` = tflops / the card's published dense bf16 peak (named in the file; null on
a CPU and on cards not in PEAKS); `gpu_busy` = nvidia-smi's utilization.gpu over the timed steps (bench/gpu_busy.py;
null without nvidia-smi); `device_peak_gib` = torch.cuda.max_memory_allocated over the micro-batch's steps (null on
a CPU, where `peak_rss_gib` is the process's peak RSS). The JSON (bench/results/throughput-<device>.json by default)
is rewritten after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.provenance import cpu_name, provenance  # noqa: E402

GiB = 2**30

# Published dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets, matched as whole words
# in torch.cuda.get_device_name(); the most specific name first.
PEAKS = (("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
         ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.2))
TARGETS = {"best_mfu": 0.40, "offload_step_vs_no_offload": 1.5}


@dataclass(frozen=True)
class Case:
    """One configuration: a DeepSpeed config, run-config overrides on the base switches, the micro-batches (GPU)."""

    ds_config: str
    overrides: dict = field(default_factory=dict)
    micro_batches: tuple[int, ...] = (8, 16)


VARIANTS = REPO / "bench" / "ds_variants"
# In the order gpu_all.sh runs them (the most wanted numbers first). Every case starts from `base`: ZeRO-2 without
# offload (zero2.json), bitsandbytes AdamW8bit, PyTorch SDPA, no gradient checkpointing, channels-first, eager.
CASES = {
    "base": Case("zero2", {}, (1, 2, 4, 8, 16)),
    "offload": Case("1gpu-8gb", {"train.optimizer": "cpu_adam"}, (1, 8)),
    "zero3-offload": Case("1gpu-6gb", {"train.optimizer": "cpu_adam"}, (1,)),
    "channels-last": Case("zero2", {"model.channels_last": True}),
    "fused-adamw": Case("zero2", {"train.optimizer": "adamw"}),
    "checkpointing": Case("zero2", {"model.gradient_checkpointing": True}, (16,)),
    "xformers": Case("zero2", {"model.attention": "xformers"}),
    "compile": Case("zero2", {"model.compile": True}, (8,)),
    "stage0": Case("default-gpu", {}),
    "offload-buckets-200m": Case(str(VARIANTS / "zero2-offload-buckets-200m.json"), {"train.optimizer": "cpu_adam"},
                                 (1,)),
    "offload-no-overlap": Case(str(VARIANTS / "zero2-offload-no-overlap.json"), {"train.optimizer": "cpu_adam"}, (1,)),
    "offload-unpinned": Case(str(VARIANTS / "zero2-offload-unpinned.json"), {"train.optimizer": "cpu_adam"}, (1,)),
    "zero3-superoffload": Case(str(VARIANTS / "zero3-superoffload.json"), {"train.optimizer": "cpu_adam"}, (1,)),
    "zero3-offload-subgroup-1e8": Case(str(VARIANTS / "zero3-offload-subgroup-1e8.json"),
                                       {"train.optimizer": "cpu_adam"}, (1,)),
    "zero3-offload-subgroup-1e9": Case(str(VARIANTS / "zero3-offload-subgroup-1e9.json"),
                                       {"train.optimizer": "cpu_adam"}, (1,)),
}
BASE_SWITCHES = {"train.optimizer": "adamw8bit", "model.attention": "sdpa", "model.gradient_checkpointing": False,
                 "model.channels_last": False, "model.compile": False}


# ------------------------------------------------------------------------------------------------ the device



def device_info() -> dict:
    """The device the cases run on, its count and its published dense bf16 peak (None where unknown or a CPU)."""
    import torch

    if not torch.cuda.is_available():
        return {"device": "cpu", "device_name": cpu_name(), "device_count": 1, "cores": os.cpu_count(),
                "peak": {"name": None, "dense_bf16_tflops": None, "source": "none: a CPU has no such peak here"}}
    name = torch.cuda.get_device_name(0)
    match = next(((key, tflops) for key, tflops in PEAKS if re.search(rf"\b{key}\b", name)), None)
    peak = {"name": match[0] if match else None, "dense_bf16_tflops": match[1] if match else None,
            "source": "NVIDIA data sheet, dense bf16 tensor core, no sparsity" if match else
            f"unknown: {name!r} is not in bench/throughput.py's PEAKS"}
    return {"device": "cuda", "device_name": name, "device_count": torch.cuda.device_count(), "cores": os.cpu_count(),
            "peak": peak}


def device_slug(info: dict) -> str:
    """The file-name tag: cpu, or the card ('h200', 'h100-pcie', ...)."""
    if info["device"] == "cpu":
        return "cpu"
    name = info["peak"]["name"] or info["device_name"].replace("NVIDIA", "")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


def run_provenance(argv: list[str]) -> dict:
    """bench/provenance.py's fields, with the attention and compiler kernels' versions: whether they load here."""
    prov = provenance("bench/throughput.py", argv)
    for name in ("xformers", "triton"):
        try:
            prov["versions"][name] = __import__(name).__version__
        except Exception as e:  # not installed, or built for another torch
            prov["versions"][name] = f"unavailable ({type(e).__name__}: {str(e)[:120]})"
    return prov


# ------------------------------------------------------------------------------------------------ FLOPs


_FLOPS: dict[tuple, int] = {}


def count_flops(size: str, resolution: int, micro_batch: int, *, checkpointing: bool) -> int:
    """FLOPs of one forward + backward of `iclight_losses` (FC, vanilla + consistency) for one micro-batch, counted
    with FlopCounterMode on the meta device (shapes only; SDPA runs as its math decomposition there, so attention is
    counted too). With `checkpointing` the recomputation in backward is included. Once per shape."""
    key = (size, resolution, micro_batch, checkpointing)
    if key in _FLOPS:
        return _FLOPS[key]
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from iclight_ds.config import ModelConfig
    from iclight_ds.model.arch import configure_attention
    from iclight_ds.model.iclight import build_iclight_model
    from iclight_ds.model.schedule import alphas_cumprod
    from iclight_ds.train.objectives import ConditionedBatch, iclight_losses

    model_cfg = ModelConfig(size=size, variant="fc")
    with torch.device("meta"):
        model = build_iclight_model(model_cfg)
    configure_attention(model.unet, "sdpa", "cpu")
    if checkpointing:
        model.unet.enable_gradient_checkpointing()
    model.train()
    lat, dim = resolution // 8, model.unet.config.cross_attention_dim  # the SD1.5 VAE and the tiny 8x one: /8
    env_h, env_w = model_cfg.env_shape

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    cond = ConditionedBatch(latents=meta(micro_batch, 4, lat, lat), foreground=meta(micro_batch, 4, lat, lat),
                            text=meta(micro_batch, 77, dim), mask=meta(micro_batch, 1, lat, lat),
                            env=tuple(meta(micro_batch, 3, env_h, env_w) for _ in range(3)))
    timesteps = torch.zeros(micro_batch, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        terms = iclight_losses(model, cond, meta(micro_batch, 4, lat, lat), timesteps,
                               alphas_cumprod=alphas_cumprod().to("meta"), snr_gamma=5.0)
        terms["loss"].backward()
    _FLOPS[key] = int(counter.get_total_flops())
    return _FLOPS[key]


def complete_row(row: dict, info: dict) -> dict:
    """Add FLOPs, TFLOP/s and MFU to a measured row (nulls for a row that did not run)."""
    out = {"device": info["device"], "device_name": info["device_name"], **row}
    peak = info["peak"]["dense_bf16_tflops"]
    if not row.get("step_s"):
        return {**out, "flops_per_step": None, "hardware_flops_per_step": None, "tflops": None, "mfu": None}
    steps = row["accumulation"]
    model = count_flops(row["size"], row["resolution"], row["micro_batch"], checkpointing=False) * steps
    hardware = (count_flops(row["size"], row["resolution"], row["micro_batch"], checkpointing=True) * steps
                if row["gradient_checkpointing"] else model)
    tflops = model / row["step_s"] / 1e12
    return {**out, "flops_per_step": model, "hardware_flops_per_step": hardware, "tflops": tflops,
            "hardware_tflops": hardware / row["step_s"] / 1e12, "mfu": tflops / peak if peak else None}


# ------------------------------------------------------------------------------------------------ one case


def _case_config(name: str, case: Case, args, out_dir: Path):
    """The run config of a case: the base switches, the case's overrides, a 1-scene synthetic set, nothing logged."""
    from iclight_ds.config import load_config
    from iclight_ds.train import engine as eng

    ds = eng.read_ds_config(eng.resolve_ds_config_path(case.ds_config))
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)  # the micro-batch is what is fed
    ds_path = out_dir / f"{name}.json"
    ds_path.write_text(json.dumps(ds))
    values = {"model.size": args.size, "data.resolution": args.resolution, "data.synth_samples": 1,
              "data.num_workers": 0, "train.output_dir": str(out_dir / "run"), "train.ds_config": str(ds_path),
              "train.steps": 10**9, "train.lr": 1e-5, "train.export": False, "train.checkpoint_every": 0,
              "train.checkpoint_minutes": 0, "logging.wandb": False, "logging.tensorboard": False,
              "logging.progress": False, "logging.preview_every": 0, "logging.eval_every": 0,
              "model.compile_backend": args.compile_backend, **BASE_SWITCHES, **case.overrides}
    return load_config(None, values)


def _repeat(cond, n: int):
    """The conditioned sample repeated to a micro-batch of n."""
    def rep(t):
        return t.repeat(n, *([1] * (t.dim() - 1)))

    return dataclasses.replace(
        cond, latents=rep(cond.latents), foreground=rep(cond.foreground), text=rep(cond.text), mask=rep(cond.mask),
        background=tuple(map(rep, cond.background)) if cond.background is not None else None,
        env=tuple(map(rep, cond.env)) if cond.env is not None else None)


def _describe(trainer, name: str, case: Case, args) -> dict:
    """The case's columns: what the engine actually runs."""
    from iclight_ds.train import engine as eng

    opt = trainer.engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    zero = trainer.run.ds.get("zero_optimization", {})
    offload = [k.removeprefix("offload_") for k in ("offload_optimizer", "offload_param")
               if zero.get(k, {}).get("device", "none") not in (None, "none")]
    cfg = trainer.cfg.model
    return {"case": name, "ds_config": Path(case.ds_config).name, "zero_stage": trainer.run.zero_stage,
            "offload": "+".join(offload) or "none", "optimizer": trainer.run.optimizer,
            "optimizer_class": type(inner).__name__, "fused": getattr(inner, "defaults", {}).get("fused"),
            "attention": trainer.run.attention, "gradient_checkpointing": trainer.run.gradient_checkpointing,
            "channels_last": cfg.channels_last, "compile": cfg.compile_backend if cfg.compile else False,
            "size": args.size, "resolution": args.resolution, "accumulation": 1,
            "dtype": str(eng.training_dtype(trainer.run.ds)).removeprefix("torch.")}


def _time_micro_batch(trainer, sample, micro_batch: int, args) -> dict:
    """Warm-up steps, then timed ones, of the trainer's own train_step on `micro_batch` copies of `sample`."""
    import contextlib

    import torch

    from bench.gpu_busy import BusySampler, nvidia_smi_index

    cond = _repeat(sample, micro_batch)
    trainer.condition = lambda batch: cond  # what a latent-cache run's conditioning returns, without the read
    trainer._next_batch = lambda: {"index": torch.arange(micro_batch)}
    cuda = trainer.acc.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(trainer.acc.device)) if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(trainer.acc.device)
    warm = []
    for _ in range(max(1, args.warmup)):
        t0 = time.perf_counter()
        trainer.train_step()
        sync()
        warm.append(time.perf_counter() - t0)
    times = []
    sampler = BusySampler(nvidia_smi_index(trainer.acc.local_rank)) if cuda else contextlib.nullcontext()
    with sampler:
        began = time.monotonic()
        while len(times) < args.steps or (sum(times) < args.min_time_s and len(times) < 10 * args.steps):
            t0 = time.perf_counter()
            trainer.train_step()
            sync()
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"micro_batch": micro_batch, "unet_rows": 3 * micro_batch, "steps_timed": len(times), "step_s": step,
            "step_s_min": min(times), "step_s_max": max(times), "first_step_s": warm[0],
            "samples_per_s": micro_batch / step, "gpu_busy": sampler.busy(since=began) if cuda else None,
            "device_peak_gib": torch.cuda.max_memory_allocated(trainer.acc.device) / GiB if cuda else None,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "error": None}


def _columns(name: str, args) -> dict:
    """The columns every row has, known before the case's engine exists."""
    return {"case": name, "ds_config": Path(CASES[name].ds_config).name, "size": args.size,
            "resolution": args.resolution, "accumulation": 1}


def _not_run(columns: dict, micro_batch: int, why: str) -> dict:
    return {**columns, "micro_batch": micro_batch, "unet_rows": 3 * micro_batch, "step_s": None,
            "samples_per_s": None, "gpu_busy": None, "device_peak_gib": None, "error": why}


def run_case(name: str, case: Case, micro_batches: list[int], args, emit) -> None:
    """Build the case's trainer once and sweep its micro-batches; `emit(row)` after each (and before, as a marker)."""
    from torch.utils.data import default_collate

    from iclight_ds.train.trainer import Trainer

    columns = _columns(name, args)
    with tempfile.TemporaryDirectory(prefix=f"throughput-{name}-") as tmp:
        try:
            trainer = Trainer(_case_config(name, case, args, Path(tmp)))
        except Exception as e:  # e.g. xformers that does not load, CPU Adam that cannot build: the case cannot run
            why = f"{type(e).__name__}: {str(e)[:400]}"
            unavailable = case.overrides.get("model.attention") == "xformers"
            for mb in micro_batches:
                emit(_not_run(columns, mb, ("unavailable: " if unavailable else "failed to build: ") + why))
            return
        columns = _describe(trainer, name, case, args)
        sample = trainer.condition(default_collate([trainer.dataset[0]]))  # (1, ...) through the frozen encoders
        trainer.vae = trainer.text_encoder = trainer.monitor = None  # as in a latent-cache run: not built at all
        for i, mb in enumerate(micro_batches):
            emit({"event": "start", "micro_batch": mb})
            try:
                emit({**columns, **_time_micro_batch(trainer, sample, mb, args)})
            except Exception as e:  # the sweep ends here: the engine may hold half a step's gradients
                what = "out of memory" if _is_oom(e) else f"failed: {type(e).__name__}"
                emit(_not_run(columns, mb, f"{what}: {(str(e).splitlines() or [''])[0][:300]}"))
                for later in micro_batches[i + 1:]:
                    emit(_not_run(columns, later, f"not run: {what} at micro-batch {mb}"))
                return


def _is_oom(error: Exception) -> bool:
    """torch's allocator's OutOfMemoryError, or a library's allocation failure (cuBLAS, cuDNN) raised as a
    RuntimeError."""
    import torch

    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower() or "ALLOC_FAILED" in text


# ------------------------------------------------------------------------------------------------ the driver


class Results:
    """The JSON file: device, peak, the invocations' provenance, one row per case and micro-batch, a summary."""

    def __init__(self, path: Path, info: dict, prov: dict, append: bool):
        self.path, self.rows = path, []
        self.head = {**info, "runs": [prov]}
        if append and path.is_file():
            old = json.loads(path.read_text())
            if old.get("device_name") != info["device_name"]:
                raise SystemExit(f"--append: {path} holds rows of {old.get('device_name')}, not {info['device_name']}")
            self.head["runs"] = old.get("runs", []) + [prov]
            self.rows = old.get("rows", [])

    def add(self, row: dict) -> None:
        """Add a row (`run`: its invocation in `runs`), replacing an older one of the same case and micro-batch,
        unless the new one did not run and the old one did."""
        key = (row["case"], row["micro_batch"])
        old = [r for r in self.rows if (r["case"], r["micro_batch"]) == key]
        if old and old[0].get("samples_per_s") and not row.get("samples_per_s"):
            return
        self.rows = [r for r in self.rows if (r["case"], r["micro_batch"]) != key] + [
            {**row, "run": len(self.head["runs"]) - 1}]
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {**self.head, "targets": TARGETS, "summary": summarise(self.rows), "rows": self.rows}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        tmp.replace(self.path)


def summarise(rows: list[dict]) -> dict:
    """The best no-offload row, each offload row's step against `base` at the same micro-batch, and each case's
    samples/s against `base` at the same micro-batch."""
    ok = [r for r in rows if r.get("samples_per_s")]
    base = {r["micro_batch"]: r for r in ok if r["case"] == "base"}
    plain = [r for r in ok if r.get("offload") == "none"]
    best = max(plain, key=lambda r: r["samples_per_s"], default=None)
    summary = {"best": None if best is None else {k: best[k] for k in ("case", "micro_batch", "samples_per_s",
                                                                       "tflops", "mfu")},
               "offload_step_vs_no_offload": {}, "samples_per_s_vs_base": {}}
    for r in ok:
        ref = base.get(r["micro_batch"])
        if ref is None or r["case"] == "base":
            continue
        tag = f"{r['case']}@{r['micro_batch']}"
        if r.get("offload") != "none":
            summary["offload_step_vs_no_offload"][tag] = r["step_s"] / ref["step_s"]
        summary["samples_per_s_vs_base"][tag] = r["samples_per_s"] / ref["samples_per_s"]
    return summary


def _child_command(name: str, rows_file: Path, args) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--rows", str(rows_file),
           "--size", args.size, "--resolution", str(args.resolution), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--min-time-s", str(args.min_time_s),
           "--compile-backend", args.compile_backend]
    if args.micro_batches:
        cmd += ["--micro-batches", args.micro_batches]
    return cmd


def run_in_child(name: str, micro_batches: list[int], args, results: Results, info: dict, timeout: float) -> None:
    """The case in a fresh process; its rows are completed and written as they come, whatever ends it."""
    rows_file = Path(tempfile.mkdtemp(prefix="throughput-rows-")) / f"{name}.jsonl"
    rows_file.touch()
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    log = rows_file.with_suffix(".log").open("w")
    proc = subprocess.Popen(_child_command(name, rows_file, args), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=pythonpath))
    seen, started, done = 0, None, set()
    deadline, rc = time.monotonic() + timeout, None
    while rc is None:
        try:
            rc = proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                rc = "timeout"
        lines = rows_file.read_text().splitlines()
        for line in lines[seen:]:
            row = json.loads(line)
            if row.get("event") == "start":
                started = row["micro_batch"]
                continue
            done.add(row["micro_batch"])
            results.add(complete_row(row, info))
        seen = len(lines)
    log.close()
    _record_failure(name, micro_batches, done, started, rc, rows_file.with_suffix(".log"), results, info, args)


def _record_failure(name, micro_batches, done, started, rc, log_path: Path, results, info, args) -> None:
    """Rows for the micro-batches a dead or stopped child left: the one it was in, and those after it."""
    left = [mb for mb in micro_batches if mb not in done]
    if not left:
        return
    if rc == "timeout":
        why = "stopped: the case's time ran out"
    elif isinstance(rc, int) and rc < 0:
        why = f"killed by signal {-rc}" + (" (out of host memory?)" if rc == -9 else "")
    else:
        why = f"exit {rc}"
    tail = log_path.read_text(errors="replace")[-1500:] if log_path.is_file() else ""
    for mb in left:
        first = mb == (started if started in left else left[0])
        note = why if first else f"not run: {why} at micro-batch {started if started in left else left[0]}"
        results.add(complete_row({**_not_run(_columns(name, args), mb, note), "log_tail": tail if first else None},
                                 info))


def micro_batches_for(case: Case, args) -> list[int]:
    return [int(x) for x in args.micro_batches.split(",")] if args.micro_batches else list(case.micro_batches)


def run_cases(names: list[str], args, results: Results, info: dict) -> None:
    start = time.monotonic()

    def add(row: dict) -> None:
        if row.get("event") != "start":  # the child's marker: which micro-batch it is in
            results.add(complete_row(row, info))

    for name in names:
        mbs = micro_batches_for(CASES[name], args)
        left = args.budget_s - (time.monotonic() - start) if args.budget_s else float("inf")
        if left < args.min_case_s:
            for mb in mbs:
                add(_not_run(_columns(name, args), mb, "not run: time budget"))
            continue
        if CASES[name].overrides.get("model.attention") == "xformers" and importlib.util.find_spec("xformers") is None:
            for mb in mbs:  # not installed: no process to start (one that imports but cannot run is found there)
                add(_not_run(_columns(name, args), mb, "unavailable: xformers is not installed"))
            continue
        print(f"case {name}: micro-batches {mbs} ({min(left, args.case_timeout):.0f} s at most)", flush=True)
        if args.in_process:
            run_case(name, CASES[name], mbs, args, add)
        else:
            run_in_child(name, mbs, args, results, info, timeout=min(left, args.case_timeout))


def print_table(results: Results) -> None:
    info = results.head
    print(f"\n{info['device_name']} ({info['device']}, {info['device_count']} device(s)); peak "
          f"{info['peak']['dense_bf16_tflops']} TFLOP/s dense bf16 ({info['peak']['name']})")
    print(f"{'case':<28}{'mb':>4}{'samples/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'busy':>6}{'GiB':>7}{'step s':>9}  note")

    def fmt(value, spec: str) -> str:
        return format(value, spec) if value is not None else "-"

    for r in results.rows:
        print(f"{r['case']:<28}{r['micro_batch']:>4}{fmt(r.get('samples_per_s'), '11.2f')}"
              f"{fmt(r.get('tflops'), '9.2f')}{fmt(r.get('mfu'), '7.3f')}{fmt(r.get('gpu_busy'), '6.2f')}"
              f"{fmt(r.get('device_peak_gib'), '7.2f')}{fmt(r.get('step_s'), '9.3f')}  {(r.get('error') or '')[:60]}")
    print(json.dumps(summarise(results.rows), indent=1))
    print(f"wrote {results.path}")


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--cases", default=None, help=f"comma-separated, in order (default: all): {', '.join(CASES)}")
    p.add_argument("--micro-batches", default=None, help="e.g. 1,2: for every case (default: each case's own)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per micro-batch (at least)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first builds states, compiles)")
    p.add_argument("--min-time-s", type=float, default=2.0, help="time at least this long per micro-batch")
    p.add_argument("--budget-s", type=float, default=0, help="start no case after this many seconds (0: no limit)")
    p.add_argument("--min-case-s", type=float, default=20, help="the least time left worth starting a case in")
    p.add_argument("--case-timeout", type=float, default=420)
    p.add_argument("--compile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"))
    p.add_argument("--append", action="store_true",
                   help="add to the rows already in --out (same device; a measured row is kept over one not run)")
    p.add_argument("--in-process", action="store_true", help="run the cases in this process (tests)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:  # inside a case's process: measure, append rows to --rows as JSON lines
        def emit(row: dict) -> None:
            with args.rows.open("a") as f:
                f.write(json.dumps(row) + "\n")

        run_case(args.child, CASES[args.child], micro_batches_for(CASES[args.child], args), args, emit)
        from iclight_ds.train import engine as eng

        eng.shutdown()
        return 0
    names = args.cases.split(",") if args.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; cases: {', '.join(CASES)}")
    info = device_info()
    out = args.out or REPO / "bench" / "results" / f"throughput-{device_slug(info)}.json"
    results = Results(out, {**info, "size": args.size, "resolution": args.resolution},
                      run_provenance(sys.argv[1:] if argv is None else argv), args.append)
    results.write()
    run_cases(names, args, results, info)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
