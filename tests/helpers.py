"""Helpers the tests of every tier share: the repository, free ports, subprocesses, run configs, tiny bases.

Fixtures built on these live in tests/conftest.py; test modules import this module as `helpers` (the `pythonpath`
setting of [tool.pytest.ini_options] puts tests/ on sys.path, and tests/e2e/ds_worker.py adds it itself).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# a wandb key in the environment of every subprocess: no log, config or metrics file may show it
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"
# what a test run overrides in the defaults: the CPU config, no wandb or progress bar, a metrics line per step,
# loading in the main process, the run's final evaluation on 2 scenes with 2 sampler steps
TEST_OVERRIDES: dict[str, Any] = {"train.ds_config": "cpu", "logging.wandb": False, "logging.progress": False,
                                  "logging.every": 1, "data.num_workers": 0, "logging.eval_samples": 2,
                                  "logging.eval_steps": 2}
# the same on a command line (the trainer's, or launch/train.sh's)
QUIET_ARGS = ["--logging.wandb", "false", "--logging.progress", "false"]


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it): a rendezvous port per launch."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a trainer (or CLI) started by a test: offline, wandb off, one BLAS thread, this checkout
    importable, no rendezvous variables of this process (in-process Trainers set them; a child forms its own
    group), and a fake wandb key that must not leak into any file."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", WANDB_API_KEY=FAKE_WANDB_KEY)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    env.update(extra)
    return env


def run_logged(cmd: list[str], log: Path, timeout: int = 400, **extra_env: str) -> None:
    """Run `cmd` in the repository with `subprocess_env`, its output into `log`; a non-zero exit raises an
    AssertionError that carries the command and the last 40 lines of its output."""
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(**extra_env), stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{tail}")


def wait_until(done, *, what: str, timeout: float = 600, procs: tuple = (), every: float = 0.2):
    """Poll `done()` until it returns something truthy and return that; an AssertionError naming `what` when a process
    in `procs` exits first or `timeout` seconds pass. Budgets are generous: a loaded 2-core machine runs a tiny
    trainer many times slower than an idle one, and a met condition returns at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = done()
        if result:
            return result
        exited = [p.returncode for p in procs if p.poll() is not None]
        if exited:
            raise AssertionError(f"waiting for {what}: a process exited first with {exited[0]}")
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")


def python_module(module: str, *args: str) -> list[str]:
    """The command line of `python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *map(str, args)]


def run_config(output_dir: str | Path | None = None, data: str | Path | None = None,
               overrides: dict[str, Any] | None = None, config_file: str | Path | None = None):
    """load_config with TEST_OVERRIDES, the run folder, the dataset (None: the trainer's synthetic scenes) and
    `overrides` (dotted keys) on top."""
    from iclight_ds.config import load_config

    values = dict(TEST_OVERRIDES)
    if output_dir is not None:
        values["train.output_dir"] = str(output_dir)
    if data is not None:
        values["data.path"] = str(data)
    values.update(overrides or {})
    return load_config(config_file, values)


def metrics(run: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run: Path) -> dict[int, float]:
    """step -> loss of a run's training records (evaluation records carry eval/* instead)."""
    return {m["step"]: m["loss"] for m in metrics(run) if "loss" in m}


def tiny_parts(seed: int = 0):
    """(UNet, VAE, text encoder, char tokenizer) of the tiny size, random weights drawn after manual_seed(seed)."""
    import torch

    from iclight_ds.model.arch import build_text_encoder, build_vae
    from iclight_ds.model.iclight import build_unet
    from iclight_ds.model.tokenizer import build_char_tokenizer

    torch.manual_seed(seed)
    tok = build_char_tokenizer()
    return build_unet("tiny"), build_vae("tiny"), build_text_encoder("tiny", tok), tok


def write_base_folder(root: Path, parts) -> Path:
    """`parts` (see tiny_parts) saved in the diffusers layout a user has on disk: unet/ vae/ text_encoder/
    tokenizer/."""
    unet, vae, text_encoder, tok = parts
    unet.save_pretrained(str(root / "unet"))
    vae.save_pretrained(str(root / "vae"))
    text_encoder.save_pretrained(str(root / "text_encoder"))
    tok.save_pretrained(str(root / "tokenizer"))
    return root


def write_pipeline_folder(root: Path, parts) -> Path:
    """`parts` (see tiny_parts) saved as a whole diffusers StableDiffusionPipeline folder (deterministic DDIM
    scheduler, no safety checker), the base a diffusers user loads."""
    from diffusers import StableDiffusionPipeline

    from iclight_ds.model.schedule import make_scheduler

    unet, vae, text_encoder, tok = parts
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                            scheduler=make_scheduler("ddim"), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(root))
    return root


def patch_everywhere(monkeypatch, module, name: str, value) -> None:
    """Replace `module.name`, and every `from module import name` copy of it in the loaded iclight_ds modules
    (callers bind the function at import time, so patching the defining module alone would miss them)."""
    original = getattr(module, name)
    monkeypatch.setattr(module, name, value)
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("iclight_ds") and mod is not module and getattr(mod, name, None) is original:
            monkeypatch.setattr(mod, name, value)


def file_bytes(root: Path) -> dict[str, bytes]:
    """relative path -> content of every file under `root` (two folders compare equal byte for byte)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header, read with safetensors itself."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def write_relight_inputs(root: Path) -> dict[str, Path]:
    """The relight CLI's inputs, 70x90 (not the output size, not square): an RGBA foreground (a red box on
    transparency), an RGB one with its mask, an 80x100 gradient background and a 16x32 environment map."""
    import numpy as np
    from PIL import Image

    rgba = np.zeros((90, 70, 4), np.uint8)
    rgba[20:70, 15:55] = (220, 40, 30, 255)
    Image.fromarray(rgba, "RGBA").save(root / "fg.png")
    rgb = np.full((90, 70, 3), 200, np.uint8)
    Image.fromarray(rgb).save(root / "fg_rgb.png")
    Image.fromarray((rgba[..., 3] > 0).astype(np.uint8) * 255).save(root / "mask.png")
    bg = np.linspace(0, 255, 80 * 100 * 3).reshape(80, 100, 3).astype(np.uint8)
    Image.fromarray(bg).save(root / "bg.png")
    np.save(root / "env.npy", np.random.default_rng(0).uniform(0, 4, (16, 32, 3)).astype(np.float32))
    return {"fg": root / "fg.png", "fg_rgb": root / "fg_rgb.png", "mask": root / "mask.png", "bg": root / "bg.png",
            "env": root / "env.npy"}


def offload_devices(ds_cfg: dict) -> set[str]:
    """Where a DeepSpeed config offloads (optimizer states, parameters): a subset of {'cpu', 'nvme'}."""
    zero = ds_cfg.get("zero_optimization", {})
    return {zero.get(k, {}).get("device") for k in ("offload_optimizer", "offload_param")} & {"cpu", "nvme"}


def shipped_ds_configs() -> list[str]:
    """The names of the shipped ds_configs/*.json, the ZeRO-3 ones first (a worker's first engine is then built under
    zero.Init in a fresh process: the case where importing diffusers/torch._dynamo under DeepSpeed's patched tensor
    constructors once broke)."""
    def stage(name: str) -> int:
        return json.loads((REPO / "ds_configs" / f"{name}.json").read_text()).get("zero_optimization", {}).get("stage")

    return sorted((p.stem for p in (REPO / "ds_configs").glob("*.json")), key=lambda n: (stage(n) != 3, n))


def nvme_ds_configs() -> set[str]:
    """The shipped configs that offload to NVMe (they need DeepSpeed's async_io op, i.e. libaio)."""
    from iclight_ds.train import engine as eng

    return {n for n in shipped_ds_configs()
            if "nvme" in offload_devices(eng.read_ds_config(REPO / "ds_configs" / f"{n}.json"))}


@functools.cache
def nvme_aio_problem() -> str | None:
    """Why the shipped NVMe configs cannot run here (DeepSpeed's async_io op cannot be built), or None; probed once
    per process (the probe compiles a test program)."""
    from iclight_ds.train import engine as eng

    return eng.aio_problem() if nvme_ds_configs() else None
