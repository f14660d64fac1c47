"""Training metrics: metrics.jsonl (one JSON object per logged step), TensorBoard events and wandb, rank 0 only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from ..config import RunConfig, to_dict


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint's step (they will be logged again) and any torn last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


class MetricsWriter:
    """metrics.jsonl (one JSON object per logged step), TensorBoard (logging.tensorboard) and wandb, rank 0 only.

    `start_step`: the step a resumed run continues from; TensorBoard drops the events it had written past it."""

    def __init__(self, path: Path, cfg: RunConfig, *, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.file = path.open("a") if enabled else None
        self.tensorboard = None
        if enabled and cfg.logging.tensorboard:
            self.tensorboard = SummaryWriter(log_dir=str(path.parent / "tensorboard"), purge_step=start_step or None)
        self.wandb = None
        # WANDB_MODE=disabled (wandb's own switch) turns it off without a config override, so a default run stays
        # the default run (train.default_config_file), and needs no wandb installed
        if enabled and cfg.logging.wandb and os.environ.get("WANDB_MODE", "").lower() != "disabled":
            os.environ.setdefault("WANDB_MODE", "offline")  # never phone home unless the user asks for it
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project, dir=str(path.parent), config=to_dict(cfg), reinit="finish_previous"
            )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def image(self, key: str, path: Path, step: int) -> None:
        if self.tensorboard is not None:
            with Image.open(path) as img:
                self.tensorboard.add_image(key, np.asarray(img.convert("RGB")), step, dataformats="HWC")
            self.tensorboard.flush()
        if self.enabled and self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
