"""Memory and speed of one full-size IC-Light training step (vanilla + consistency), ours vs plain PyTorch.

    python bench/memory.py [--resolution 256] [--out bench/results/memory-cpu.json]

Every case runs in a fresh process (peak RSS is per process), on the full SD1.5-shaped UNet with random
weights, batch 1 (x3 rows for the consistency objective), the same synthetic sample and the same noise:

  naive        plain PyTorch: fp32 weights, fp32 AdamW, no gradient checkpointing
  plain-bf16   plain PyTorch loop with our math: bf16 weights + fp32 master, AdamW8bit, checkpointing
  zero2-1rank  our Trainer, ZeRO-2, 1 rank, AdamW8bit, checkpointing (same math as plain-bf16)
  zero3-2rank  our Trainer, ZeRO-3, 2 CPU ranks (deepspeed launcher), AdamW8bit, checkpointing
  batched / separate   forward+backward of the three consistency evaluations as one batch of 3 vs 3 calls

Per case: bytes held in parameters, gradients and optimizer state (counted from the tensors), peak RSS, and
the time of a step after one warm-up step. Prints a table, writes JSON, and names the device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GiB = 2**30


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


def make_inputs(resolution: int, frozen=None):
    """One synthetic sample at `resolution`, conditioned with the full-size frozen VAE/text encoder (bf16).

    `frozen`: (vae, text_encoder) to reuse (the trainer's own), so that a case never holds two copies."""
    import tempfile

    import torch

    from iclight_ds.conditioning import condition_batch
    from iclight_ds.data.dataset import RelightDataset
    from iclight_ds.data.synth import generate
    from iclight_ds.data.tokenizer import build_char_tokenizer
    from iclight_ds.models import build_text_encoder, build_vae, default_dtype, freeze

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
            vae = freeze(build_vae("full"), torch.bfloat16, "cpu")
            te = freeze(build_text_encoder("full", tok), torch.bfloat16, "cpu")
    g = torch.Generator().manual_seed(0)
    cond = condition_batch(batch, vae=vae, text_encoder=te, variant="fc", split_cells=4, with_split=True,
                           generator=g, device=torch.device("cpu"))
    noise = torch.randn(cond.latents.shape, generator=g)
    t = torch.tensor([500])
    return cond, noise, t


def losses(model, cond, noise, t):
    from iclight_ds.objectives import iclight_losses
    from iclight_ds.train import alphas_cumprod

    return iclight_losses(model, cond, noise, t, alphas_cumprod=alphas_cumprod())


# --------------------------------------------------------------------------------------------------- the cases


def case_plain(resolution: int, precise: bool) -> dict:
    """Plain PyTorch. precise=True: the naive baseline (fp32, AdamW, no checkpointing); else our math."""
    import bitsandbytes as bnb
    import torch

    from iclight_ds.config import ModelConfig
    from iclight_ds.engine import param_groups
    from iclight_ds.models import build_iclight_model, default_dtype

    cond, noise, t = make_inputs(resolution)
    torch.manual_seed(0)
    dtype = torch.float32 if precise else torch.bfloat16
    with default_dtype(dtype):
        model = build_iclight_model(ModelConfig(size="full", variant="fc"))
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
    times, grad_bytes = [], 0
    for _ in range(2):
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
        times.append(time.perf_counter() - t0)
    return {
        "param_bytes": tensor_bytes(list(model.parameters())),
        "grad_bytes": grad_bytes,
        "optimizer_bytes": tensor_bytes([opt.state]) + (0 if precise else tensor_bytes(master)),
        "peak_rss_gib": peak_rss_gib(),
        "step_s": times[-1],
        "first_step_s": times[0],
    }


def case_trainer(resolution: int, ds_config: str) -> dict:
    """Our Trainer (engine from the DeepSpeed JSON), one rank's numbers; fed the same inputs as plain."""
    import torch

    from iclight_ds import engine as eng
    from iclight_ds.config import load_config
    from iclight_ds.train import Trainer

    class Bench(Trainer):
        grad_bytes = 0

        def _next_batch(self):
            return None

        def forward_backward(self, batch):
            terms = losses(self.engine, self.cond, self.noise, self.t)
            self.engine.backward(terms["loss"])
            zero = self.engine.optimizer
            self.grad_bytes = max(self.grad_bytes, tensor_bytes(
                [v for k, v in vars(zero).items() if "grad" in k.lower()]))
            self.engine.step()
            return {k: v.detach() for k, v in terms.items()}

    out = Path(os.environ.get("BENCH_TMP", "/tmp")) / f"bench-{Path(ds_config).stem}"
    cfg = load_config(None, {"train.ds_config": ds_config, "model.size": "full", "data.resolution": resolution,
                             "data.synth_samples": 4, "train.output_dir": str(out), "logging.wandb": False,
                             "logging.progress": False, "data.num_workers": 0, "train.export": False})
    trainer = Bench(cfg)
    import psutil

    init_peak, init_rss = peak_rss_gib(), psutil.Process().memory_info().rss / GiB
    trainer.cond, trainer.noise, trainer.t = make_inputs(resolution, (trainer.vae, trainer.text_encoder))
    # the input is conditioned once; then the frozen encoders go, as in a run from a latent cache (data.cache),
    # which never builds them
    trainer.vae = trainer.text_encoder = None
    import gc

    gc.collect()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
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
        "init_peak_rss_gib": init_peak,
        "init_rss_gib": init_rss,
        "step_s": times[-1],
        "first_step_s": times[0],
    }
    eng.shutdown()
    return result


def case_batching(resolution: int) -> dict:
    """Forward+backward of the three consistency evaluations: one batch of 3 vs three batches of 1."""
    import torch

    from iclight_ds.config import ModelConfig
    from iclight_ds.models import build_iclight_model, default_dtype

    cond, noise, t = make_inputs(resolution)
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        model = build_iclight_model(ModelConfig(size="full", variant="fc"))
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
        t0 = time.perf_counter()
        losses(m, cond, noise, t)["loss"].backward()
        model.zero_grad(set_to_none=True)
        timing[name] = time.perf_counter() - t0
    # the first of each pair warms caches: keep the second
    return {"batched_s": timing["batched_2"], "separate_s": timing["separate_2"],
            "ratio": timing["batched_2"] / timing["separate_2"]}


# ------------------------------------------------------------------------------------------------- the driver


def run_case(args_list: list[str], launcher: list[str] | None = None, timeout: int = 1800) -> list[dict]:
    out = Path(os.environ.get("BENCH_TMP", "/tmp")) / f"case-{os.getpid()}-{time.time_ns()}.json"
    cmd = (launcher or [sys.executable]) + [str(Path(__file__).resolve()), "--case-out", str(out)] + args_list
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    results = [json.loads(p.read_text()) for p in sorted(out.parent.glob(out.stem + "*.json"))]
    if proc.returncode != 0 or not results:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return [{"error": f"exit {proc.returncode}", "log_tail": tail}]
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cases", default="naive,plain-bf16,zero2-1rank,zero3-2rank,batching")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--case-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ds", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.case:  # inside a case process
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
        fn = {"naive": lambda: case_plain(args.resolution, True),
              "plain-bf16": lambda: case_plain(args.resolution, False),
              "trainer": lambda: case_trainer(args.resolution, args.ds),
              "batching": lambda: case_batching(args.resolution)}[args.case]
        result = fn()
        rank = os.environ.get("RANK", "0")
        Path(args.case_out).with_name(Path(args.case_out).stem + f"-r{rank}.json").write_text(json.dumps(result))
        return

    import torch

    bench_tmp = Path(os.environ.setdefault("BENCH_TMP", "/tmp/iclight-bench"))
    bench_tmp.mkdir(parents=True, exist_ok=True)
    for name, (stage, accum) in {"zero2": (2, 1), "zero3": (3, 1)}.items():
        ds = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
        ds["gradient_accumulation_steps"] = accum  # one micro-batch per step: the same work as the plain loops
        ds["zero_optimization"]["overlap_comm"] = False
        (bench_tmp / f"{name}.json").write_text(json.dumps(ds))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    desc = (torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine())
    wanted = args.cases.split(",")
    res = ["--resolution", str(args.resolution)]
    cases: dict[str, list[dict]] = {}
    plan = {
        "naive": (["--case", "naive"], None),
        "plain-bf16": (["--case", "plain-bf16"], None),
        "zero2-1rank": (["--case", "trainer", "--ds", str(bench_tmp / "zero2.json")], None),
        "zero3-2rank": (["--case", "trainer", "--ds", str(bench_tmp / "zero3.json")],
                        ["deepspeed", "--num_gpus", "2", "--master_port", "29650", "--no_local_rank"]),
        "batching": (["--case", "batching"], None),
    }
    for name in wanted:
        case_args, launcher = plan[name]
        print(f"running {name} ...", flush=True)
        env_threads = {"zero3-2rank": "1"}.get(name)
        if env_threads:
            os.environ["BENCH_THREADS"] = env_threads
        cases[name] = run_case(case_args + res, launcher)
        os.environ.pop("BENCH_THREADS", None)
        print(json.dumps(cases[name])[:400], flush=True)

    rows = []
    for name in ("naive", "plain-bf16", "zero2-1rank", "zero3-2rank"):
        for r in cases.get(name, []):
            if "error" in r:
                rows.append(f"{name:<14} ERROR {r['error']}")
                continue
            rows.append(f"{name + ('/r' + str(r['rank']) if 'rank' in r else ''):<16}"
                        f"{r['param_bytes'] / GiB:>9.2f}{r['grad_bytes'] / GiB:>9.2f}{r['optimizer_bytes'] / GiB:>9.2f}"
                        f"{r['peak_rss_gib']:>10.2f}{r['step_s']:>9.1f}")
    ratios = {}
    naive = next((r for r in cases.get("naive", []) if "error" not in r), None)
    z3 = [r for r in cases.get("zero3-2rank", []) if "error" not in r]
    if naive and z3:
        ratios["zero3_2rank_peak_rss_vs_naive"] = max(r["peak_rss_gib"] for r in z3) / naive["peak_rss_gib"]
    plain = next((r for r in cases.get("plain-bf16", []) if "error" not in r), None)
    z2 = next((r for r in cases.get("zero2-1rank", []) if "error" not in r), None)
    if plain and z2:
        ratios["zero2_1rank_step_vs_plain_loop"] = z2["step_s"] / plain["step_s"]
    batching = next((r for r in cases.get("batching", []) if "error" not in r), None)
    if batching:
        ratios["batched_vs_separate_forwards"] = batching["ratio"]
    targets = {"zero3_2rank_peak_rss_vs_naive": 0.35, "zero2_1rank_step_vs_plain_loop": 1.10,
               "batched_vs_separate_forwards": 0.9}

    print(f"\ndevice: {device} ({desc}), {os.cpu_count()} cores; full SD1.5 UNet (FC, 8 ch), {args.resolution} px, "
          "batch 1 x 3 rows (vanilla + consistency)")
    print(f"{'case':<16}{'params':>9}{'grads':>9}{'optim':>9}{'peak RSS':>10}{'step s':>9}   (GiB per process)")
    print("\n".join(rows))
    for k, v in ratios.items():
        verdict = "meets" if v <= targets[k] else "MISSES"
        print(f"{k}: {v:.3f} (target <= {targets[k]}: {verdict})")
    out = args.out or REPO / "bench" / "results" / f"memory-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "device_name": desc, "cores": os.cpu_count(),
                               "resolution": args.resolution, "cases": cases, "ratios": ratios,
                               "targets": targets}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
