"""The CPU default run's preset fine-tunes the shipped tiny pretrained base the way a real run fine-tunes SD1.5: the
base's UNet widened (zero foreground channels) is the step-0 model, and the offset export is against that base."""

import json

import torch
from safetensors.torch import load_file

from helpers import run_config
from iclight_ds.model.base import load_base
from iclight_ds.model.tinybase import TINY_BASE_ASSET
from iclight_ds.train.cli import CPU_DEFAULT_PRESET
from iclight_ds.train.export import main as export_main
from iclight_ds.train.trainer import Trainer


def test_the_cpu_default_run_starts_from_the_tiny_base_and_exports_offsets_against_it(synthetic, tmp_path):
    out = tmp_path / "run"
    cfg = run_config(out, synthetic(16, size=64, seed=9), {"train.steps": 2, "logging.eval_every": 0,
                                                           "logging.preview_every": 0},
                     config_file=CPU_DEFAULT_PRESET)
    assert cfg.model.base == str(TINY_BASE_ASSET)
    base = load_base(TINY_BASE_ASSET, unet_only=True).unet.state_dict()
    trainer = Trainer(cfg)
    unet = trainer.engine.module.unet
    dtype = unet.conv_in.weight.dtype
    # step 0: IC-Light's surgery on the base, nothing else
    assert unet.conv_in.weight.shape[1] == 8
    assert torch.equal(unet.conv_in.weight[:, :4], base["conv_in.weight"].to(dtype))
    assert unet.conv_in.weight[:, 4:].abs().sum() == 0
    assert torch.equal(unet.conv_out.weight, base["conv_out.weight"].to(dtype))
    assert json.loads((out / "base.json").read_text())["base"] == str(TINY_BASE_ASSET)
    trainer.train()

    trained = load_file(str(out / "unet.safetensors"))
    offset_file = tmp_path / "offset.safetensors"
    assert export_main(["--run", str(out), "--format", "iclight-offset", "--out", str(offset_file)]) == 0
    offset = load_file(str(offset_file))
    assert set(offset) == set(trained) == set(base)
    padded = torch.zeros_like(trained["conv_in.weight"], dtype=torch.float32)
    padded[:, :4] = base["conv_in.weight"]
    expected = {k: trained[k].float() - (padded if k == "conv_in.weight" else base[k].float()) for k in trained}
    for key in trained:
        assert torch.allclose(offset[key].float(), expected[key], atol=1e-6), key
    assert offset["conv_in.weight"][:, 4:].abs().sum() > 0  # the foreground channels trained
    assert offset["conv_in.weight"][:, :4].abs().max() > 0  # and the base's own weights moved
