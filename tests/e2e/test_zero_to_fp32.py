"""DeepSpeed's own recovery path: the `zero_to_fp32.py` DeepSpeed writes into a run's checkpoints/ folder rebuilds the
same fp32 weights as our export, for ZeRO-2 and ZeRO-3 checkpoints written by two CPU ranks (tiny model, 2 steps).
The ZeRO-2 run also goes through `--format checkpoint` on the command line (the whole random base)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import helpers
from iclight_ds.model import formats as fmt
from iclight_ds.model.base import base_for_run

REPO = helpers.REPO
CONFIGS = {"zero2": "cpu", "zero3": "cpu-zero3"}  # shipped ds_configs, ZeRO stage 2 and 3


@pytest.fixture(scope="module")
def runs(worker_results) -> dict[str, Path]:
    """The 2-rank runs of the shipped ZeRO-2 and ZeRO-3 CPU configs from the e2e tier's worker launch
    (tests/e2e/conftest.py): the default tiny FC, 2 optimizer steps without warm-up, so they move the weights."""
    return {name: Path(worker_results["out"]) / ds_config for name, ds_config in CONFIGS.items()}


@pytest.mark.parametrize("name", CONFIGS)
def test_zero_to_fp32_rebuilds_the_exported_weights(runs, name, tmp_path):
    from iclight_ds.train.export import main

    checkpoints = runs[name] / "checkpoints"
    script = checkpoints / "zero_to_fp32.py"  # DeepSpeed puts it beside the step folders, not inside one
    assert script.is_file()
    assert (checkpoints / "latest").read_text().strip() == "step_00000002"  # the tag the script reads by default
    assert len(list((checkpoints / "step_00000002").glob("*optim_states.pt"))) == 2  # one partition per rank
    helpers.run_logged([sys.executable, str(script), str(checkpoints), str(tmp_path / "fp32"), "--safe_serialization"],
         tmp_path / "zero_to_fp32.log")
    recovered = load_file(str(tmp_path / "fp32" / "model.safetensors"))

    main(["--run", str(runs[name]), "--format", "unet", "--dtype", "fp32", "--out", str(tmp_path / "ours")])
    ours = {"unet." + k: v for k, v in load_file(str(tmp_path / "ours" / fmt.UNET_FILE)).items()}
    ours.update(load_file(str(tmp_path / "ours" / fmt.MODULES_FILE)))
    assert set(recovered) == set(ours)
    assert any(k.startswith("env_encoder.") for k in ours) and any(k.startswith("merger.") for k in ours)
    assert all(v.dtype == torch.float32 for v in recovered.values())
    assert [k for k in ours if not torch.equal(recovered[k], ours[k])] == []
    # trained weights, not the initial ones: the step moved them away from the run's rebuilt random base
    base = base_for_run(runs[name] / "config.json").unet.state_dict()
    assert max((recovered["unet." + k] - v).abs().max().item() for k, v in base.items() if k != "conv_in.weight") > 0


def test_checkpoint_format_from_the_command_line(runs, tmp_path, caplog):
    from iclight_ds.train.export import main

    run = runs["zero2"]
    out = tmp_path / "ck.safetensors"
    main(["--run", str(run), "--format", "checkpoint", "--out", str(out)])
    state = load_file(str(out))
    unet = load_file(str(run / fmt.UNET_FILE))  # the trainer's own end-of-run export (fp32 masters)
    base = base_for_run(run / "config.json", unet_only=False)
    want = {**fmt.unet_to_ldm(unet, base.unet.config, prefix=fmt.LDM_UNET_PREFIX),
            **fmt.vae_to_ldm(base.vae.state_dict()), **fmt.text_encoder_to_ldm(base.text_encoder.state_dict())}
    assert set(state) == set(want)
    assert [k for k in want if not torch.equal(state[k], want[k].float())] == []
    assert state["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 8
    assert "environment-map encoder" in caplog.text  # the default tiny FC sees the light through its env encoder
