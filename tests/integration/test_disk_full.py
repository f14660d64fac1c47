"""A disk that fills up for real: the run folder on a small tmpfs, where the first checkpoint fits and the next one
does not. The failed saves leave the previous checkpoint `latest`, intact and loadable; training goes on after a
failed periodic save, and the run ends with the save error (exit status 2 from the command line)."""

import os
import shutil
import subprocess

import pytest

from iclight_ds.config import load_config
from iclight_ds.train import checkpoint as ckpt
from iclight_ds.train.checkpoint import CheckpointError
from iclight_ds.train.trainer import Trainer

QUIET = {"logging.wandb": False, "logging.progress": False, "logging.preview_every": 0, "logging.eval_every": 0,
         "logging.tensorboard": False, "data.num_workers": 0, "train.ds_config": "cpu-1rank", "train.export": False,
         "train.keep": 0}
# one checkpoint of the tiny model (bf16 module, fp32 masters and moments) is about 50 MB
TMPFS_MB = 75


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    where = tmp_path / "small"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_keeps_the_last_checkpoint(small_disk, synthetic, caplog):
    out = small_disk / "run"
    cfg = load_config(None, {**QUIET, "train.output_dir": str(out), "data.path": str(synthetic(16, seed=7)),
                             "train.steps": 6, "train.checkpoint_every": 2})
    trainer = Trainer(cfg)
    with pytest.raises(CheckpointError, match="the previous checkpoint is untouched: .*step_00000002"):
        trainer.train()  # the final save at step 6 fails too, and ends the run
    assert trainer.step == 6  # the periodic save at step 2 fitted; the one at step 4 failed and training went on
    assert "saving checkpoint" in caplog.text and "step_00000004 failed" in caplog.text
    root = out / "checkpoints"
    assert ckpt.latest_tag(root) == "step_00000002"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp", "step_"))) == ["step_00000002"]
    ckpt.verify(root / "step_00000002")  # intact: every file matches its manifest
    resumed = Trainer(load_config(None, {**QUIET, "train.output_dir": str(out), "data.path": str(synthetic(16, seed=7)),
                                         "train.steps": 2, "train.resume": "latest"}))
    assert resumed.step == 2  # and loadable
