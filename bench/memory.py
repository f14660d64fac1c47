"""Memory and speed of one full-size IC-Light training step (vanilla + consistency), ours vs plain PyTorch.

    python bench/memory.py [--resolution R] [--cases a,b,...] [--out bench/results/memory-<device>.json]

On a CPU-only machine (default 256 px):

Every case runs in a fresh process (peak RSS is per process), on the full SD1.5-shaped UNet with random
weights, batch 1 (x3 rows for the consistency objective), the same synthetic sample and the same noise:

  naive        plain PyTorch: fp32 weights, fp32 AdamW, no gradient checkpointing, glibc malloc as it comes
  naive-pinned the same with glibc's mmap threshold pinned as the trainer pins it for ZeRO-3 on CPU
               (engine.pin_malloc_mmap_threshold), to show how much of the saving is the allocator setting alone
  plain-bf16   plain PyTorch loop with our math: bf16 weights + fp32 master, AdamW8bit, checkpointing
  zero2-1rank  our Trainer, ds_configs/zero2.json, 1 rank, AdamW8bit, checkpointing (same math as plain-bf16)
  cpu-1rank    our Trainer, ds_configs/cpu-1rank.json (ZeRO stage 0: with one rank ZeRO has nothing to partition,
               and stage 2's gradient bucket copies are measurable on a CPU), 1 rank: the config `auto` picks here;
               AdamW8bit, like every trainer case on a CPU, so that it compares with plain-bf16
  cpu-1rank-adamw  cpu-1rank with torch's fused AdamW, the optimizer train.optimizer=auto picks on a CPU-only machine
  zero3-2rank  our Trainer, ds_configs/cpu-zero3.json, 2 CPU ranks (deepspeed launcher), AdamW8bit, checkpointing
  batched / separate   forward+backward of the three consistency evaluations as one batch of 3 vs 3 calls

On a GPU machine (default 512 px; CUDA device peaks from torch.cuda.max_memory_allocated, counted from after the
inputs are encoded and the frozen encoders dropped): naive, plain-bf16, zero2-1rank (ds_configs/zero2.json), and
  offload-opt  our Trainer, ds_configs/1gpu-8gb.json: ZeRO-2 + optimizer offload to host RAM (train.optimizer=auto:
               DeepSpeedCPUAdam on the host)
  offload-all  our Trainer, ds_configs/1gpu-6gb.json: ZeRO-3 + parameter and optimizer offload (DeepSpeedCPUAdam)
  offload-opt-8bit  offload-opt with train.optimizer=adamw8bit (bitsandbytes on the host) instead of auto's
               DeepSpeedCPUAdam, to show what the host optimizer costs
  zero2-1rank-sdpa  zero2-1rank with PyTorch SDPA attention instead of xformers (what `model.attention: auto`
               picks on CUDA when xformers imports), to show what xformers saves
  zero3-2rank  ds_configs/zero3.json on 2 GPUs, when the machine has them
  batching

Per case: bytes held in parameters, gradients and optimizer state (counted from the tensors), peak RSS, the
attention kernel and optimizer used, and the step time: the fastest of the steps after a warm-up step (this
shared 2-core machine's timings of one step vary by 20% or more; noise only adds time). Prints a table, writes
JSON, and names the device. The JSON is rewritten after every case, so a run cut short keeps the cases it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.provenance import provenance  # noqa: E402

GiB = 2**30


def free_port() -> int:
    """A TCP port free on this machine now, for the 2-rank cases' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_device_peak(device) -> None:
    """Start counting the device peak here (after the inputs are encoded); a no-op on CPU."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def device_peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


STEPS = 4  # one warm-up step, then timed ones


def timed_steps(trainer, device, steps: int) -> list[float]:
    """Seconds of each of `steps` trainer steps, the device synchronised around each (the first one warms up)."""
    reset_device_peak(device)
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        trainer.train_step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def tensor_bytes(objs) -> int:
    """Bytes of the distinct storages behind the tensors found in `objs` (lists, dicts, attributes one level)."""
    import torch

    seen, total = set(), 0

    def visit(x, depth=0):
        nonlocal total
        if isinstance(x, torch.Tensor):
            if x.device.type == "meta" or x.numel() == 0:
                return
            st = x.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in seen:
                seen.add(key)
                total += st.nbytes()
        elif depth < 3 and isinstance(x, (list, tuple)):
            for y in x:
                visit(y, depth + 1)
        elif depth < 3 and isinstance(x, dict):
            for y in x.values():
                visit(y, depth + 1)

    for o in objs:
        visit(o)
    return total


# ------------------------------------------------------------------------------------------------ the inputs


def make_inputs(resolution: int, frozen=None, device=None):
    """One synthetic sample at `resolution`, conditioned with the full-size frozen VAE/text encoder (bf16).

    `frozen`: (vae, text_encoder) to reuse (the trainer's own), so that a case never holds two copies.
    `device`: where the frozen encoders run and the inputs live (default: CPU)."""
    import tempfile

    import torch

    from iclight_ds.train.conditioning import condition_batch
    from iclight_ds.data.dataset import RelightDataset
    from iclight_ds.data.synth import generate
    from iclight_ds.model.tokenizer import build_char_tokenizer
    from iclight_ds.model.arch import build_text_encoder, build_vae, default_dtype, freeze

    device = device if device is not None else torch.device("cpu")
    tok = build_char_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        generate(root, 2, size=resolution, seed=0, extras=False)
        batch = torch.utils.data.default_collate([RelightDataset(root, resolution, tok, require_env=True)[0]])
    torch.manual_seed(1)
    if frozen is not None:
        vae, te = frozen
    else:
        with default_dtype(torch.bfloat16):
            vae = freeze(build_vae("full"), torch.bfloat16, device)
            te = freeze(build_text_encoder("full", tok), torch.bfloat16, device)
    g = torch.Generator().manual_seed(0)
    cond = condition_batch(batch, vae=vae, text_encoder=te, variant="fc", split_cells=4, with_split=True,
                           generator=g, device=device)
    noise = torch.randn(cond.latents.shape, generator=g).to(device)
    t = torch.tensor([500], device=device)
    return cond, noise, t


def losses(model, cond, noise, t):
    from iclight_ds.train.objectives import iclight_losses
    from iclight_ds.model.schedule import alphas_cumprod

    return iclight_losses(model, cond, noise, t, alphas_cumprod=alphas_cumprod())


# --------------------------------------------------------------------------------------------------- the cases


def case_plain(resolution: int, precise: bool, pin_malloc: bool) -> dict:
    """Plain PyTorch. precise=True: the naive baseline (fp32, AdamW, no checkpointing); else our math.

    pin_malloc: fix glibc's mmap threshold as the Trainer does (before anything large is allocated)."""
    import bitsandbytes as bnb
    import torch

    from iclight_ds.config import ModelConfig
    from iclight_ds.train.engine import param_groups, pin_malloc_mmap_threshold
    from iclight_ds.model.arch import configure_attention, default_dtype
    from iclight_ds.model.iclight import build_iclight_model

    if pin_malloc and not pin_malloc_mmap_threshold():
        raise RuntimeError("could not pin glibc's mmap threshold (not glibc, or MALLOC_MMAP_THRESHOLD_ is set)")

    device = bench_device()
    cond, noise, t = make_inputs(resolution, device=device)
    torch.manual_seed(0)
    dtype = torch.float32 if precise else torch.bfloat16
    with default_dtype(dtype):
        model = build_iclight_model(ModelConfig(size="full", variant="fc")).to(device)
    attention = configure_attention(model.unet, "sdpa", device.type)
    model.train()
    if precise:
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-5)
        master = params
    else:
        model.unet.enable_gradient_checkpointing()
        params = list(model.parameters())
        master = [torch.nn.Parameter(p.detach().float()) for p in params]
        opt = bnb.optim.AdamW8bit(param_groups(master), lr=1e-5)
    reset_device_peak(device)
    times, grad_bytes = [], 0
    for _ in range(STEPS):
        sync(device)
        t0 = time.perf_counter()
        loss = losses(model, cond, noise, t)["loss"]
        loss.backward()
        if not precise:
            for p, m in zip(params, master):
                m.grad = p.grad.float()
                p.grad = None
        grad_bytes = max(grad_bytes, tensor_bytes([p.grad for p in master if p.grad is not None]))
        torch.nn.utils.clip_grad_norm_(master, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not precise:
            with torch.no_grad():
                for p, m in zip(params, master):
                    p.copy_(m)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "param_bytes": tensor_bytes(list(model.parameters())),
        "grad_bytes": grad_bytes,
        "optimizer_bytes": tensor_bytes([opt.state]) + (0 if precise else tensor_bytes(master)),
        "peak_rss_gib": peak_rss_gib(),
        "device_peak_gib": device_peak_gib(device),
        "attention": attention,
        "step_s": min(times[1:]),
        "first_step_s": times[0],
        "step_times_s": times,
    }


def case_trainer(resolution: int, ds_config: str, attention: str, optimizer: str) -> dict:
    """Our Trainer (engine from the DeepSpeed JSON), one rank's numbers; fed the same inputs as plain."""
    from iclight_ds.train import engine as eng
    from iclight_ds.config import load_config
    from iclight_ds.train.trainer import Trainer

    class Bench(Trainer):
        grad_bytes = 0

        def _next_batch(self):
            return None

        def forward_backward(self, batch):
            terms = losses(self.engine, self.cond, self.noise, self.t)
            self.engine.backward(terms["loss"])
            zero = self.engine.optimizer
            if self.engine.zero_optimization_stage() == 0:  # the module's own .grad (the step's fp32 copy is transient)
                held = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            else:  # ZeRO's gradient partitions and buckets
                held = [v for k, v in vars(zero).items() if "grad" in k.lower()]
            self.grad_bytes = max(self.grad_bytes, tensor_bytes(held))
            self.engine.step()
            return {k: v.detach() for k, v in terms.items()}

    out = Path(os.environ.get("BENCH_TMP", "/tmp")) / f"bench-{Path(ds_config).stem}"
    cfg = load_config(None, {"train.ds_config": ds_config, "model.size": "full", "data.resolution": resolution,
                             "data.synth_samples": 4, "train.output_dir": str(out), "logging.wandb": False,
                             "model.attention": attention, "train.optimizer": optimizer,
                             "logging.progress": False, "data.num_workers": 0, "train.export": False})
    trainer = Bench(cfg)
    import psutil

    init_peak, init_rss = peak_rss_gib(), psutil.Process().memory_info().rss / GiB
    device = trainer.acc.device
    trainer.cond, trainer.noise, trainer.t = make_inputs(resolution, (trainer.vae, trainer.text_encoder), device)
    # the input is conditioned once; then the frozen encoders go, as in a run from a latent cache (data.cache),
    # which never builds them
    trainer.vae = trainer.text_encoder = None
    times = timed_steps(trainer, device, STEPS)
    zero = trainer.engine.optimizer
    module_params = [getattr(p, "ds_tensor", p) for p in trainer.engine.module.parameters()]
    fp32 = [v for k, v in vars(zero).items() if "fp32" in k.lower()]
    result = {
        "rank": trainer.acc.rank,
        "world_size": trainer.acc.world_size,
        "param_bytes": tensor_bytes(module_params),
        "grad_bytes": trainer.grad_bytes,
        "optimizer_bytes": tensor_bytes([zero.optimizer.state]) + tensor_bytes(fp32),
        "peak_rss_gib": peak_rss_gib(),
        "device_peak_gib": device_peak_gib(device),
        "init_peak_rss_gib": init_peak,
        "init_rss_gib": init_rss,
        "attention": trainer.attention,
        "optimizer": trainer.optimizer_name,
        "step_s": min(times[1:]),
        "first_step_s": times[0],
        "step_times_s": times,
    }
    eng.shutdown()
    return result


def case_batching(resolution: int) -> dict:
    """Forward+backward of the three consistency evaluations: one batch of 3 vs three batches of 1."""
    import torch

    from iclight_ds.config import ModelConfig
    from iclight_ds.model.arch import configure_attention, default_dtype
    from iclight_ds.model.iclight import build_iclight_model

    device = bench_device()
    cond, noise, t = make_inputs(resolution, device=device)
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        model = build_iclight_model(ModelConfig(size="full", variant="fc")).to(device)
    attention = configure_attention(model.unet, "sdpa", device.type)
    model.unet.enable_gradient_checkpointing()
    model.train()

    class Separate(torch.nn.Module):
        """Same model, but every forward is split into calls of one sample each."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, noisy, ts, concat, text, env=None):
            return torch.cat([self.inner(noisy[i:i + 1], ts[i:i + 1], concat[i:i + 1], text[i:i + 1],
                                         None if env is None else env[i:i + 1]) for i in range(noisy.shape[0])])

        def merge(self, a, b):
            return self.inner.merge(a, b)

    timing = {}
    for name, m in (("batched", model), ("separate", Separate(model)), ("batched_2", model),
                    ("separate_2", Separate(model))):
        sync(device)
        t0 = time.perf_counter()
        losses(m, cond, noise, t)["loss"].backward()
        model.zero_grad(set_to_none=True)
        sync(device)
        timing[name] = time.perf_counter() - t0
    # the first of each pair warms caches: keep the second
    return {"batched_s": timing["batched_2"], "separate_s": timing["separate_2"],
            "ratio": timing["batched_2"] / timing["separate_2"], "attention": attention}


# ------------------------------------------------------------------------------------------------- the driver


def run_case(args_list: list[str], launcher: list[str] | None = None, timeout: int = 1800) -> list[dict]:
    out = Path(os.environ.get("BENCH_TMP", "/tmp")) / f"case-{os.getpid()}-{time.time_ns()}.json"
    cmd = (launcher or [sys.executable]) + [str(Path(__file__).resolve()), "--case-out", str(out)] + args_list
    # the repo first, then whatever PYTHONPATH already holds (packages installed with pip --target, say)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = ((e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace"))[-3000:]
        return [{"error": f"timed out after {timeout} s", "log_tail": tail}]
    results = [json.loads(p.read_text()) for p in sorted(out.parent.glob(out.stem + "*.json"))]
    if proc.returncode != 0 or not results:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return [{"error": f"exit {proc.returncode}", "log_tail": tail}]
    return results


CPU_CASES = "naive,naive-pinned,plain-bf16,zero2-1rank,cpu-1rank,cpu-1rank-adamw,zero3-2rank,batching"
GPU_CASES = ("naive,plain-bf16,zero2-1rank,zero2-1rank-sdpa,offload-opt,offload-opt-8bit,offload-all,zero3-2rank,"
             "batching")
TABLE_ORDER = ("naive", "naive-pinned", "plain-bf16", "zero2-1rank", "zero2-1rank-sdpa", "cpu-1rank",
               "cpu-1rank-adamw", "offload-opt", "offload-opt-8bit", "offload-all", "zero3-2rank")


def _ok(cases: dict, name: str) -> list[dict]:
    return [r for r in cases.get(name, []) if "error" not in r]


def _first_ok(cases: dict, name: str) -> dict | None:
    return next(iter(_ok(cases, name)), None)


def summarise(cases: dict, device: str) -> tuple[dict, dict]:
    """(ratios or GiB measured, their targets) from the issue's numbers, for the cases that ran."""
    ratios, targets = {}, {"batched_vs_separate_forwards": 0.9}
    plain, z2 = _first_ok(cases, "plain-bf16"), _first_ok(cases, "zero2-1rank")
    if device == "cpu":
        # the 1-rank target is the trainer's own 1-rank CPU config (cpu-1rank); ZeRO-2's ratio is reported beside it
        targets.update(zero3_2rank_peak_rss_vs_naive=0.35, cpu_1rank_step_vs_plain_loop=1.10)
        z3_peak = max((r["peak_rss_gib"] for r in _ok(cases, "zero3-2rank")), default=None)  # the fuller rank
        # naive-pinned has no target: it shows how much of the saving the allocator setting alone gives
        for name, key in (("naive", "zero3_2rank_peak_rss_vs_naive"),
                          ("naive-pinned", "zero3_2rank_peak_rss_vs_naive_pinned")):
            r = _first_ok(cases, name)
            if r and z3_peak is not None:
                ratios[key] = z3_peak / r["peak_rss_gib"]
        for name in ("zero2-1rank", "cpu-1rank"):
            r = _first_ok(cases, name)
            if plain and r:
                ratios[f"{name.replace('-', '_')}_step_vs_plain_loop"] = r["step_s"] / plain["step_s"]
        eight, fused = _first_ok(cases, "cpu-1rank"), _first_ok(cases, "cpu-1rank-adamw")
        if eight and fused:  # no target: what auto's optimizer on a CPU changes against 8-bit AdamW, same config
            ratios["cpu_1rank_step_adamw_vs_8bit"] = fused["step_s"] / eight["step_s"]
            ratios["cpu_1rank_peak_rss_adamw_vs_8bit"] = fused["peak_rss_gib"] / eight["peak_rss_gib"]
    else:
        targets.update(offload_opt_device_peak_gib=6.0, offload_all_device_peak_gib=4.0,
                       offload_opt_step_vs_no_offload=1.5, offload_all_step_vs_no_offload=1.5)
        for name in ("offload-opt", "offload-all"):
            r, key = _first_ok(cases, name), name.replace("-", "_")
            if r:
                ratios[f"{key}_device_peak_gib"] = r["device_peak_gib"]
                if z2:
                    ratios[f"{key}_step_vs_no_offload"] = r["step_s"] / z2["step_s"]
        eight = _first_ok(cases, "offload-opt-8bit")
        if eight:  # no target: the same offload config with bitsandbytes' 8-bit AdamW stepping on the host
            ratios["offload_opt_8bit_device_peak_gib"] = eight["device_peak_gib"]
            if z2:
                ratios["offload_opt_8bit_step_vs_no_offload"] = eight["step_s"] / z2["step_s"]
        sdpa = _first_ok(cases, "zero2-1rank-sdpa")
        if z2 and sdpa:  # no target: what the attention kernel alone changes, same config
            ratios["zero2_1rank_step_xformers_vs_sdpa"] = z2["step_s"] / sdpa["step_s"]
            ratios["zero2_1rank_device_peak_xformers_vs_sdpa"] = z2["device_peak_gib"] / sdpa["device_peak_gib"]
    batching = _first_ok(cases, "batching")
    if batching:
        ratios["batched_vs_separate_forwards"] = batching["ratio"]
    return ratios, targets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=None, help="default: 256 on CPU, 512 on a GPU")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cases", default=None, help=f"default on CPU: {CPU_CASES}; on a GPU: {GPU_CASES}")
    p.add_argument("--case-timeout", type=int, default=1800, help="seconds before a case is stopped (default 1800)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--attention", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--optimizer", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--case-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ds", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.case:  # inside a case process
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
        fn = {"naive": lambda: case_plain(args.resolution, True, False),
              "naive-pinned": lambda: case_plain(args.resolution, True, True),
              "plain-bf16": lambda: case_plain(args.resolution, False, False),
              "trainer": lambda: case_trainer(args.resolution, args.ds, args.attention, args.optimizer),
              "batching": lambda: case_batching(args.resolution)}[args.case]
        result = fn()
        rank = os.environ.get("RANK", "0")
        Path(args.case_out).with_name(Path(args.case_out).stem + f"-r{rank}.json").write_text(json.dumps(result))
        return

    import torch

    device = bench_device().type
    desc = (torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine())
    resolution = args.resolution or (512 if device == "cuda" else 256)
    wanted = (args.cases or (GPU_CASES if device == "cuda" else CPU_CASES)).split(",")
    gpus = torch.cuda.device_count()
    if device == "cuda" and "zero3-2rank" in wanted and gpus < 2:
        print(f"skipping zero3-2rank: it needs 2 GPUs, this machine has {gpus}", flush=True)
        wanted.remove("zero3-2rank")
    bench_tmp = Path(os.environ.setdefault("BENCH_TMP", "/tmp/iclight-bench"))
    bench_tmp.mkdir(parents=True, exist_ok=True)
    config_of = {"zero2-1rank": "zero2", "zero2-1rank-sdpa": "zero2", "cpu-1rank": "cpu-1rank",
                 "cpu-1rank-adamw": "cpu-1rank",
                 "offload-opt": "1gpu-8gb", "offload-opt-8bit": "1gpu-8gb", "offload-all": "1gpu-6gb",
                 "zero3-2rank": "cpu-zero3" if device == "cpu" else "zero3"}
    for name in set(config_of.values()):
        ds = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
        ds["gradient_accumulation_steps"] = 1  # one micro-batch per step: the same work as the plain loops
        ds["train_micro_batch_size_per_gpu"] = 1
        if device == "cpu":
            ds["zero_optimization"]["overlap_comm"] = False
        (bench_tmp / f"{name}.json").write_text(json.dumps(ds))
    res = ["--resolution", str(resolution)]
    out = args.out or REPO / "bench" / "results" / f"memory-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"provenance": provenance("bench/memory.py", sys.argv[1:]),
              "device": device, "device_name": desc, "cores": os.cpu_count(), "resolution": resolution}
    cases: dict[str, list[dict]] = {}
    two_ranks = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank"]

    def optimizer(name: str) -> str:
        """On a GPU auto (8-bit AdamW, CPU Adam with offload); on a CPU, where auto is torch's AdamW, 8-bit AdamW
        unless the case names another: the plain loops step AdamW8bit, and the trainer cases compare with them."""
        for suffix, opt in (("-8bit", "adamw8bit"), ("-adamw", "adamw")):
            if name.endswith(suffix):
                return opt
        return "auto" if device == "cuda" else "adamw8bit"

    plan = {name: (["--case", "trainer", "--ds", str(bench_tmp / f"{cfg}.json"),
                    "--attention", "sdpa" if name.endswith("-sdpa") else "auto", "--optimizer", optimizer(name)],
                   two_ranks if name == "zero3-2rank" else None) for name, cfg in config_of.items()}
    plan.update({name: (["--case", name], None) for name in ("naive", "naive-pinned", "plain-bf16", "batching")})
    for name in wanted:
        case_args, launcher = plan[name]
        print(f"running {name} ...", flush=True)
        if name == "zero3-2rank" and device == "cpu":
            os.environ["BENCH_THREADS"] = "1"  # two ranks on two cores
        cases[name] = run_case(case_args + res, launcher, timeout=args.case_timeout)
        os.environ.pop("BENCH_THREADS", None)
        print(json.dumps(cases[name])[:400], flush=True)
        ratios, targets = summarise(cases, device)
        out.write_text(json.dumps({**header, "cases": cases, "ratios": ratios, "targets": targets}, indent=1))

    gpu = device == "cuda"
    rows = []
    for name in TABLE_ORDER:
        for r in cases.get(name, []):
            if "error" in r:
                rows.append(f"{name:<18}ERROR {r['error']}")
                continue
            rows.append(f"{name + ('/r' + str(r['rank']) if 'rank' in r else ''):<18}"
                        f"{r['param_bytes'] / GiB:>9.2f}{r['grad_bytes'] / GiB:>9.2f}{r['optimizer_bytes'] / GiB:>9.2f}"
                        + (f"{r['device_peak_gib']:>10.2f}" if gpu else "")
                        + f"{r['peak_rss_gib']:>10.2f}{r['step_s']:>9.2f}  {r.get('attention', '')}"
                        + f"  {r.get('optimizer', '')}")
    ratios, targets = summarise(cases, device)

    print(f"\ndevice: {device} ({desc}), {os.cpu_count()} cores; full SD1.5 UNet (FC, 8 ch), {resolution} px, "
          "batch 1 x 3 rows (vanilla + consistency)")
    print(f"{'case':<18}{'params':>9}{'grads':>9}{'optim':>9}" + (f"{'GPU peak':>10}" if gpu else "")
          + f"{'peak RSS':>10}{'step s':>9}  attention/optimizer   (GiB per process)")
    print("\n".join(rows))
    for k, v in ratios.items():
        verdict = ("no target" if k not in targets else "meets" if v <= targets[k] else "MISSES")
        print(f"{k}: {v:.3f} ({'target <= ' + str(targets[k]) + ': ' if k in targets else ''}{verdict})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
