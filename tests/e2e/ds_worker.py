"""Run under the deepspeed launcher by tests/e2e/test_distributed.py: real ranks, real engines, recorded facts.

For each DeepSpeed config given, trains a tiny model for a few steps through the real Trainer, recording per
micro-step the engine's global step, the number of backward calls, and a weight checksum; then checks the
exported file against the engine's (gathered) weights. Rank 0 writes everything to --out/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]  # the checkout (iclight_ds) and tests/ (helpers)

from safetensors.torch import load_file  # noqa: E402

import helpers  # noqa: E402
from helpers import run_config  # noqa: E402
from iclight_ds.train import checkpoint as ckpt  # noqa: E402
from iclight_ds.train import engine as eng  # noqa: E402
from iclight_ds.train.trainer import Trainer  # noqa: E402


class ProbedTrainer(Trainer):
    """The real Trainer, with a record of what happens at every micro-step."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.trace: list[dict] = []
        self.backward_calls = 0
        inner_backward = self.engine.backward

        def counting_backward(loss, *a, **k):
            self.backward_calls += 1
            return inner_backward(loss, *a, **k)

        self.engine.backward = counting_backward

    def forward_backward(self, batch):
        before = self.backward_calls
        terms = super().forward_backward(batch)
        probe = self.engine.module.unet.conv_out.weight
        with eng.gathered_params(self.run.ds)([probe]):  # ZeRO-3: the whole tensor for the read, on every rank
            checksum = float(probe.float().sum())
        self.trace.append(
            {
                "global_steps": int(self.engine.global_steps),
                "backward_calls": self.backward_calls - before,
                "checksum": checksum,
                "loss": float(terms["loss"]),
            }
        )
        return terms


def optimizer_for(ds_config: str, optimizer: str) -> str:
    """`optimizer`, except that a GPU config without offload gets what auto picks on a GPU, 8-bit AdamW (auto on these
    CPU ranks would pick torch's AdamW): so bitsandbytes' optimizer is stepped under every ZeRO stage here."""
    ds_cfg = eng.read_ds_config(eng.resolve_ds_config_path(ds_config))
    gpu_config = not Path(ds_config).stem.startswith("cpu")
    if optimizer == "auto" and gpu_config and not eng.offloads_optimizer(ds_cfg):
        return eng.resolve_optimizer("auto", ds_cfg, on_gpu=True)
    return optimizer


def run_one(ds_config: str, args, rank: int) -> dict:
    out = Path(args.out) / Path(ds_config).stem
    overrides = {
        "train.ds_config": ds_config,
        "train.steps": args.steps,
        "train.optimizer": optimizer_for(ds_config, args.optimizer),
        "train.lr": 1e-3,
        "train.warmup_steps": 0,
        "model.variant": args.variant,
        "model.gradient_checkpointing": True,  # auto leaves it off for tiny UNets; here it runs under every stage
        "logging.preview_steps": 2,  # the final preview runs under every ZeRO stage on both ranks
        "logging.preview_samples": 2,
        # the run's final evaluation under every stage too, small: at its default size it takes 13 s under ZeRO-3
        "logging.eval_samples": 2,
        "logging.eval_steps": 2,
    }
    if "nvme" in helpers.offload_devices(eng.read_ds_config(eng.resolve_ds_config_path(ds_config))):
        swap = Path(args.out) / "nvme" / Path(ds_config).stem  # ZeRO-Infinity's swap folder, one per config
        swap.mkdir(parents=True, exist_ok=True)
        overrides["train.nvme_path"] = str(swap)
    trainer = ProbedTrainer(run_config(out, args.data, overrides))
    before = eng.gathered_state_dict(trainer.engine)
    trainer.train()
    after = eng.gathered_state_dict(trainer.engine)
    inner = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)  # the client optimizer
    result = {"trace": trainer.trace, "accumulation": trainer.geometry.accumulation,
              "optimizer": [trainer.run.optimizer, type(inner).__name__],
              "checkpointing": trainer.run.gradient_checkpointing}
    if rank == 0:
        # the fp32 masters of the final checkpoint against the weights the optimizer started from (DeepSpeed builds
        # its masters from the bf16 module): a bf16 parameter can round back to its old value, a master cannot
        masters = eng.fp32_state_dict_from_checkpoint(out / "checkpoints", ckpt.tag_for(args.steps))
        unchanged = [k for k in before if torch.equal(masters[k], before[k].float())]
        last = max(k for k in before if k.startswith("merger.mlp.") and k.endswith(".weight"))
        # surgery and zero-initialisation hold at step 0 under every stage (ZeRO-3 builds partitioned)
        result["init_zero"] = {
            "conv_in_new_channels": float(before["unet.conv_in.weight"][:, 4:].abs().max()),
            "merger_last": float(before[last].abs().max()),
            "conv_in_old_channels": float(before["unet.conv_in.weight"][:, :4].abs().max()),
        }
        exported = load_file(str(out / "unet.safetensors"))
        exported.update({k: v for k, v in load_file(str(out / "iclight_modules.safetensors")).items()})
        mismatched = [k for k, v in after.items() if not torch.equal(_exported(exported, k).to(v.dtype), v)]
        result.update(
            params=len(before),
            unchanged=unchanged,
            mismatched=mismatched[:5],
            n_mismatched=len(mismatched),
            exported_keys=len(exported),
            metrics=[m for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in (m := json.loads(line))],
            finite=all(math.isfinite(t["loss"]) for t in trainer.trace),
            checkpoint=sorted(p.name for p in (out / "checkpoints").iterdir()),
            previews=sorted(p.name for p in (out / "previews").glob("*.png")),
        )
    return result


def _exported(exported: dict, module_key: str) -> torch.Tensor:
    """ICLightModel key -> tensor in the exported files (UNet keys lose their 'unet.' prefix)."""
    return exported[module_key[len("unet."):]] if module_key.startswith("unet.") else exported[module_key]


def shm_comm_op_built() -> bool:
    """Whether DeepSpeed's backend built (and mapped the /dev/shm buffer of) its shared-memory all-reduce op."""
    from deepspeed.comm import comm

    return comm.cdb.shm_comm_op is not None


def group_timeouts() -> list[float]:
    """The collective timeout, in seconds, of every process group this rank holds: the world group and those DeepSpeed
    made for itself (gloo groups: this worker runs on CPU)."""
    from torch.distributed import distributed_c10d

    return [pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for pg in distributed_c10d._world.pg_map]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", required=True, help="comma-separated ds_configs names or paths")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--optimizer", default="auto")
    p.add_argument("--variant", default="fc")
    args = p.parse_args()
    results = {}
    acc = eng.init_distributed()
    try:
        for name in args.configs.split(","):
            results[Path(name).stem] = run_one(name, args, acc.rank)
        results["group_timeouts"] = group_timeouts()
        results["shm_comm_op_built"] = shm_comm_op_built()
    finally:
        if acc.rank == 0:
            Path(args.out, "results.json").write_text(json.dumps(results, indent=1))
        eng.shutdown()


if __name__ == "__main__":
    main()
