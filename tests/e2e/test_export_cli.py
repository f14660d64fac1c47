"""The export CLI on a real (tiny, 2-step) run trained in a subprocess: every format, the random base rebuilt from the
run's seed, the run folder as a base, and a base other than the recorded one refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import QUIET_ARGS, python_module, run_logged, safetensors_metadata
from iclight_ds.model import formats as fmt


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """Two optimizer steps of the default tiny FC run (random base), single process."""
    run = tmp_path_factory.mktemp("run")
    run_logged(python_module("iclight_ds.train", "--train.steps", "2", "--train.output_dir", run,
                             "--data.synth_samples", "16", "--data.num_workers", "0", *QUIET_ARGS),
               run.parent / f"{run.name}-train.log", timeout=300)
    return run


def test_export_cli_from_a_real_run(trained_run, tmp_path):
    from diffusers import UNet2DConditionModel

    from iclight_ds.model.base import base_for_run, load_base
    from iclight_ds.train.export import main

    full = load_file(str(trained_run / "unet.safetensors"))  # the trainer's own end-of-run export
    for name in ("iclight-offset", "ldm", "diffusers"):
        main(["--run", str(trained_run), "--format", name, "--out", str(tmp_path / name)])
    offset = load_file(str(tmp_path / "iclight-offset" / "iclight_fc_offset.safetensors"))
    # The random base is rebuilt from the run's seed: after 2 warm-up steps (lr <= 1e-4) every weight is within a
    # few 1e-4 of it. A wrong rebuild would differ by ~0.1 (the init scale).
    assert max(v.abs().max().item() for v in offset.values()) < 1e-3
    assert max(v.abs().max().item() for v in offset.values()) > 0
    base = base_for_run(trained_run / "config.json")
    merged = fmt.apply_offset(base.unet.state_dict(), offset)
    for k, v in full.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)
    ldm = fmt.unet_from_ldm(load_file(str(tmp_path / "ldm" / "iclight_fc_unet_ldm.safetensors")), base.unet.config)
    assert all(torch.equal(ldm[k], offset[k]) for k in offset)
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "diffusers"), local_files_only=True)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in full.items())
    offset_meta = safetensors_metadata(tmp_path / "iclight-offset" / "iclight_fc_offset.safetensors")
    assert offset_meta["base_hash"] == base.unet_hash
    # the run folder itself is accepted as a base (its random base, VAE and text encoder)
    run_base = load_base(trained_run)
    assert run_base.unet_hash == base.unet_hash and run_base.vae is not None and not run_base.real_tokenizer


def test_export_refuses_a_base_other_than_the_recorded_one(trained_run, tmp_path):
    import shutil

    from iclight_ds.train.export import export_run_checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", run / "checkpoints")
    shutil.copy(trained_run / "config.json", run / "config.json")
    (run / "base.json").write_text(json.dumps({"source": "elsewhere", "unet_hash": "sha256:" + "0" * 64}))
    with pytest.raises(ValueError, match="would not give back the trained UNet"):
        export_run_checkpoint(run / "checkpoints", None, tmp_path / "out", fmt_name="iclight-offset")
