"""`python -m iclight_ds.train` / `iclight-train`: parse the command line, pick the config file, run the Trainer.

    iclight-train [--config FILE] [--output-dir DIR] [--resume latest|CHECKPOINT] [--ds-config NAME|FILE|auto]
                  [--section.key VALUE ...]

Normally started by launch/train.sh under the deepspeed launcher (or torchrun, or a plain single process); the
launcher's --output-dir, --resume and --ds-config are accepted here too. `-h` / `--help` lists every config key.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

from ..config import ConfigError, help_text, load_config, parse_overrides
from ..data.cache import CacheError
from ..data.dataset import DatasetError
from ..infer.eval import EvalError
from ..infer.sampling import RelightError
from ..model.base import BaseModelError
from ..model.frozen import TinyVaeError
from . import engine as eng
from .checkpoint import CheckpointError
from .checks import DeviceCheckError
from .trainer import NonFiniteError, Trainer

log = logging.getLogger("iclight_ds")

# Bad input: the message says what and where, so the trainer exits 2 with it and no traceback
USER_ERRORS = (BaseModelError, CacheError, CheckpointError, DeviceCheckError, DatasetError, eng.EngineConfigError,
               EvalError, RelightError, TinyVaeError, FileNotFoundError, ConfigError)
# The default runs: on a machine without a CUDA GPU the CPU one (the tiny pretrained base fine-tuned), on a GPU a
# bigger recipe for the same tiny model from random weights; and the overrides that leave a run the default run:
# launch/train.sh's own --output-dir and --resume
CPU_DEFAULT_PRESET = Path(__file__).parent / "presets" / "default-cpu.yaml"
GPU_DEFAULT_PRESET = Path(__file__).parent / "presets" / "default-gpu.yaml"
DEFAULT_RUN_KEYS = {"train.output_dir", "train.resume"}
# its micro-batch of 512 took 10.7 GiB of an H200 (nvidia-smi, CUDA context included); smaller GPUs keep the planner's
GPU_DEFAULT_MIN_GIB = 16
# the launcher's flags, accepted here as well: each is a config key (SWITCHES take no value)
LAUNCHER_FLAGS = {"--output-dir": "train.output_dir", "--resume": "train.resume", "--ds-config": "train.ds_config"}
SWITCHES = {"--resume-unverified": "train.resume_unverified"}


def default_config_file(config_path: str | None, overrides: dict, gpu_mem_gib: float | None) -> str | None:
    """The config file a run reads: the one given; else, when nothing but DEFAULT_RUN_KEYS is overridden, a default
    run's preset: the CPU one on a machine without a CUDA GPU, the GPU one where the first GPU has
    GPU_DEFAULT_MIN_GIB or more (a smaller GPU, or any other override, starts from the plain defaults)."""
    if config_path is not None or not set(overrides) <= DEFAULT_RUN_KEYS:
        return config_path
    if gpu_mem_gib is None:
        return str(CPU_DEFAULT_PRESET)
    return str(GPU_DEFAULT_PRESET) if gpu_mem_gib >= GPU_DEFAULT_MIN_GIB else None


def _gpu_memory_gib() -> float | None:
    """Memory of the first visible CUDA GPU in GiB, None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """(--config FILE or None, the override arguments): the launcher's flags become their config keys, and the
    deepspeed launcher's --local_rank=N is dropped (LOCAL_RANK in the environment carries the same)."""
    config_path, rest, i = None, [], 0
    while i < len(argv):
        flag, eq, inline = argv[i].partition("=")
        if flag in SWITCHES and not eq:
            rest += [f"--{SWITCHES[flag]}", "true"]
            i += 1
            continue
        if flag == "--config" or flag in LAUNCHER_FLAGS:
            if not eq and i + 1 >= len(argv):
                raise ConfigError(f"{flag} needs a value")
            value = inline if eq else argv[i + 1]
            i += 1 if eq else 2
            if flag == "--config":
                config_path = value
            else:
                rest += [f"--{LAUNCHER_FLAGS[flag]}", value]
            continue
        if not flag.startswith("--local_rank"):
            rest.append(argv[i])
        i += 1
    return config_path, rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\n" + help_text())
        return 0
    try:
        config_path, rest = split_argv(argv)
        overrides = parse_overrides(rest)
        chosen = default_config_file(config_path, overrides, _gpu_memory_gib())
        cfg = load_config(chosen, overrides)
        if chosen != config_path and os.environ.get("RANK", "0") == "0":
            machine = ("no CUDA GPU is visible" if chosen == str(CPU_DEFAULT_PRESET)
                       else f"a CUDA GPU of {GPU_DEFAULT_MIN_GIB} GiB or more is visible")
            print(f"iclight_ds.train: {machine} and no config or override but the run folder / resume was given: "
                  f"the default run uses {chosen}, into {cfg.train.output_dir}", file=sys.stderr)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer = None
    try:
        trainer = Trainer(cfg, preset=chosen if chosen != config_path else None)
        trainer.train()
    except NonFiniteError as e:
        log.error("%s", e)
        return 3
    except USER_ERRORS as e:
        log.error("%s: %s", type(e).__name__, e)
        return 2
    except RuntimeError as e:
        if not is_collective_failure(e):
            raise
        phase = trainer.phase if trainer is not None else "start-up"
        log.error("a collective with the other ranks failed while %s: %s. Another rank or node is gone or stuck (a "
                  "collective waits train.collective_timeout_s=%g s); the last complete checkpoint is intact: "
                  "relaunch every node with --resume latest", phase, str(e).splitlines()[0][:300],
                  cfg.train.collective_timeout_s)
        logging.shutdown()
        os._exit(COLLECTIVE_FAILED)  # not the process group's teardown: it would wait on the lost rank
    finally:
        eng.shutdown()
    return 0


# Exit status when a collective with the other ranks failed (a lost or stuck rank or node)
COLLECTIVE_FAILED = 4
# What gloo and NCCL say when a peer is gone (connection reset/closed) or never answered (timed out)
_COLLECTIVE_MESSAGES = ("Connection reset by peer", "Connection closed by peer", "Timed out waiting", "timed out",
                        "NCCL error", "Broken pipe", "ProcessGroupGloo", "ProcessGroupNCCL")


def is_collective_failure(error: RuntimeError) -> bool:
    """Did `error` come from a collective whose peer is gone or stuck? Only in a run of several ranks."""
    several = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    return several and any(m in str(error) for m in _COLLECTIVE_MESSAGES)
