"""NVMe offload (ZeRO-Infinity) on the CPU: ds_configs/1gpu-6gb-nvme.json (weights and optimizer states swapped to
a folder through DeepSpeed's async_io op) trains the tiny model to exactly what the RAM-offload config 1gpu-6gb.json
trains, exports and resumes exactly; the NVMe folder is checked before step 1 (missing, not writable, too small) and
stage-2 NVMe offload, which DeepSpeed would quietly keep in RAM, is refused by name."""

import json

import pytest
import torch
from safetensors.torch import load_file

from iclight_ds.config import load_config
from iclight_ds.train import checks
from iclight_ds.train import engine as eng
from iclight_ds.train.checks import DeviceCheckError
from iclight_ds.train.export import checkpoint_state
from iclight_ds.train.plan import nvme_bytes, unet_parameters
from iclight_ds.train.trainer import Trainer

QUIET = {"logging.wandb": False, "logging.progress": False, "logging.every": 1, "logging.preview_every": 0,
         "logging.eval_every": 0, "logging.tensorboard": False, "data.num_workers": 0, "train.checkpoint_every": 0}
needs_aio = pytest.mark.skipif(eng.aio_problem() is not None,
                               reason=f"DeepSpeed's async_io op cannot be built here: {eng.aio_problem()}")


@pytest.fixture(scope="module")
def data(synthetic):
    return synthetic(8, size=64, seed=3)


def _cfg(out, data, **over):
    return load_config(None, {**QUIET, "train.output_dir": str(out), "data.path": str(data), **over})


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


NVME_RUN = {"train.ds_config": "1gpu-6gb-nvme", "train.steps": 2, "train.checkpoint_every": 1, "train.keep": 0}


@pytest.fixture(scope="module")
def nvme_run(data, tmp_path_factory):
    """Two steps of 1gpu-6gb-nvme.json (weights and optimizer states swapped to a folder), a checkpoint after each."""
    root = tmp_path_factory.mktemp("nvme")
    (root / "ssd").mkdir()
    trainer = Trainer(_cfg(root / "run", data, **NVME_RUN, **{"train.nvme_path": str(root / "ssd")}))
    trainer.train()
    return root, trainer.run


@needs_aio
def test_nvme_offload_trains_exactly_as_ram_offload(nvme_run, data, tmp_path):
    root, run = nvme_run
    assert run.nvme_swap.startswith(str(root / "ssd")) and run.optimizer == "cpu_adam"
    zero = run.ds["zero_optimization"]
    assert zero["offload_optimizer"]["nvme_path"] == zero["offload_param"]["nvme_path"] == run.nvme_swap
    assert list((root / "ssd").iterdir()) == []  # the run's swap folder goes at the end
    folder = root / "run" / "checkpoints" / "step_00000002"
    assert (folder / eng.NVME_GROUPS).is_file() and any((folder / "offloaded_tensors").rglob("*.tensor.swp"))
    ram = tmp_path / "ram"
    Trainer(_cfg(ram, data, **{"train.ds_config": "1gpu-6gb", "train.steps": 2})).train()
    a, b = load_file(str(root / "run" / "unet.safetensors")), load_file(str(ram / "unet.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the export reads the swap files
    assert _losses(root / "run") == _losses(ram)


@needs_aio
@pytest.mark.slow
def test_nvme_resume_equals_the_uninterrupted_run(nvme_run, data, tmp_path):
    """One step, a checkpoint, a resume in a new engine for the second: the weights, Adam moments, step count and
    learning rate continue from the checkpoint (DeepSpeed skips the optimizer's state under NVMe swapping;
    engine._restore_swapped_optimizer_states puts it back), so the export equals the two-step run's bit for bit."""
    root, _ = nvme_run
    over = {**NVME_RUN, "train.nvme_path": str(root / "ssd")}
    split = tmp_path / "split"
    Trainer(_cfg(split, data, **{**over, "train.steps": 1, "train.export": False})).train()
    Trainer(_cfg(split, data, **{**over, "train.resume": "latest"})).train()
    assert _losses(split) == _losses(root / "run")
    saved = torch.load(next((split / "checkpoints" / "step_00000002").glob("*optim_states.pt")), weights_only=False)
    assert saved["optimizer_state_dict"]["optimizer_state_dict"]["state"][0]["step"] == 2  # not restarted at 1
    a, c = load_file(str(root / "run" / "unet.safetensors")), load_file(str(split / "unet.safetensors"))
    before = checkpoint_state(root / "run" / "checkpoints" / "step_00000001", "raw")
    assert any(not torch.equal(a[k], before["unet." + k]) for k in a)  # the second step moved the weights
    assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_the_nvme_folder_is_checked_before_step_1(data, tmp_path, monkeypatch):
    over = {"train.ds_config": "1gpu-nvme", "train.steps": 1}
    with pytest.raises(DeviceCheckError, match=r"train.nvme_path=.*missing: no such folder"):
        Trainer(_cfg(tmp_path / "a", data, **over, **{"train.nvme_path": str(tmp_path / "missing")}))
    with pytest.raises(DeviceCheckError, match=r"zero_optimization.offload_optimizer.nvme_path=/local_nvme: no such"):
        Trainer(_cfg(tmp_path / "b", data, **over))  # the shipped placeholder, when train.nvme_path is not set
    with pytest.raises(DeviceCheckError, match=r"train.nvme_path=/proc: not writable"):
        Trainer(_cfg(tmp_path / "c", data, **over, **{"train.nvme_path": "/proc"}))
    folder = tmp_path / "ssd"
    folder.mkdir()
    monkeypatch.setattr(checks.os, "access", lambda path, mode: False)
    with pytest.raises(DeviceCheckError, match="not writable by this user"):
        Trainer(_cfg(tmp_path / "d", data, **over, **{"train.nvme_path": str(folder)}))
    monkeypatch.undo()
    full = type("Usage", (), {"free": 2**20, "total": 2**30, "used": 2**30 - 2**20})()
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda path: full)
    need = nvme_bytes(unet_parameters("tiny", 8), eng.read_ds_config(eng.resolve_ds_config_path("1gpu-nvme")), 1,
                      "cpu_adam") / 2**30
    with pytest.raises(DeviceCheckError, match=rf"needs {need:.1f} GiB there .* has 0.0 GiB free"):
        Trainer(_cfg(tmp_path / "e", data, **over, **{"train.nvme_path": str(folder)}))


def test_nvme_offload_below_zero3_is_refused_by_name(tmp_path):
    cfg = json.loads(eng.resolve_ds_config_path("1gpu-8gb").read_text())
    cfg["zero_optimization"]["offload_optimizer"].update(device="nvme", nvme_path=str(tmp_path))
    (tmp_path / "z2.json").write_text(json.dumps(cfg))
    with pytest.raises(eng.EngineConfigError, match="'nvme' needs ZeRO stage 3 .*keeps the optimizer states in host RAM"):
        eng.read_ds_config(tmp_path / "z2.json")
    cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    cfg["zero_optimization"]["offload_optimizer"]["device"] = "cpu"
    (tmp_path / "p2.json").write_text(json.dumps(cfg))
    with pytest.raises(eng.EngineConfigError, match="offload_param needs ZeRO stage 3"):
        eng.read_ds_config(tmp_path / "p2.json")


def test_nvme_path_goes_into_every_nvme_section():
    ds = eng.read_ds_config(eng.resolve_ds_config_path("1gpu-6gb-nvme"))
    assert eng.nvme_paths(ds) == {"offload_optimizer": "/local_nvme", "offload_param": "/local_nvme"}
    moved = eng.with_nvme_path(ds, "/ssd/swap")
    assert eng.nvme_paths(moved) == {"offload_optimizer": "/ssd/swap", "offload_param": "/ssd/swap"}
    assert eng.nvme_paths(ds)["offload_param"] == "/local_nvme"  # a copy, not the shipped dict
    ram = eng.read_ds_config(eng.resolve_ds_config_path("1gpu-8gb"))
    assert eng.with_nvme_path(ram, "/ssd") is ram and eng.nvme_paths(ram) == {}
