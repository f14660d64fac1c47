"""The Trainer in-process on one CPU rank: NaN guards, failed saves, the optimizer auto picks and the RAM it needs,
resumes that keep what the checkpoint holds, and datasets it validates or refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import losses, patch_everywhere, run_config
from iclight_ds.model.base import base_for_run
from iclight_ds.train.trainer import NonFiniteError, Trainer


@pytest.fixture(scope="module")
def data(synthetic) -> Path:
    return synthetic(32, size=64, seed=5)


@pytest.fixture
def make_trainer(data, tmp_path):
    def make(cls=Trainer, **overrides):
        return cls(run_config(tmp_path / "run", data, {"train.steps": 4, "train.lr": 1e-3, **overrides}))

    return make


class NaNTrainer:
    """Mixin: poisons the target image of chosen micro-batches (counted from 1)."""

    poison: set[int] = set()

    def _next_batch(self):
        batch = super()._next_batch()
        self.micro = getattr(self, "micro", 0) + 1
        if self.micro in self.poison:
            batch["target"][0, 0, 0, 0] = float("nan")
        return batch


def test_nan_batch_is_skipped_and_training_continues(make_trainer, caplog):
    cls = type("T", (NaNTrainer, Trainer), {"poison": {3}})
    trainer = make_trainer(cls)
    with caplog.at_level("WARNING", logger="iclight_ds"):
        trainer.train()
    assert trainer.skipped_total == 1 and trainer.step == 4
    assert "non-finite loss" in caplog.text and "sample indices" in caplog.text
    metrics = [m for x in (Path(trainer.out_dir) / "metrics.jsonl").read_text().splitlines()
               if "loss" in (m := json.loads(x))]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["skipped_micro_batches"] == 1
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    weights = load_file(str(Path(trainer.out_dir) / "unet.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_persistent_nan_stops_with_last_good_checkpoint(make_trainer):
    cls = type("T", (NaNTrainer, Trainer), {"poison": set(range(3, 100))})
    trainer = make_trainer(cls, **{"train.max_bad_steps": 2})
    with pytest.raises(NonFiniteError, match="3 non-finite losses in a row at step 3"):
        trainer.train()
    ckpts = Path(trainer.out_dir) / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    from iclight_ds.train.engine import fp32_state_dict_from_checkpoint

    state = fp32_state_dict_from_checkpoint(ckpts, "step_00000002")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_failed_save_leaves_previous_checkpoint(make_trainer, monkeypatch, caplog):
    from iclight_ds.train import checkpoint, engine

    real = engine.save_checkpoint

    def flaky(eng, root, tag, client_state):
        real(eng, root, tag, client_state)
        if client_state["step"] == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine, "save_checkpoint", flaky)
    trainer = make_trainer(**{"train.checkpoint_every": 1, "train.keep": 0})
    with caplog.at_level("ERROR", logger="iclight_ds"):
        trainer.train()
    ckpts = Path(trainer.out_dir) / "checkpoints"
    assert "No space left on device" in caplog.text and "previous checkpoint is untouched" in caplog.text
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith(("step", ".tmp"))) == [
        "step_00000001", "step_00000003", "step_00000004"]
    assert checkpoint.latest_tag(ckpts) == "step_00000004"


def test_auto_on_a_cpu_trains_with_fused_adamw_unless_the_ram_is_short(make_trainer, monkeypatch):
    """On a CPU-only machine auto builds torch's fused AdamW (bitsandbytes' 8-bit step costs ~30x more per parameter
    on the host); where its fp32 moments would not fit the RAM, 8-bit AdamW."""
    import psutil

    trainer = make_trainer(**{"train.ds_config": "cpu-1rank", "train.steps": 2})
    inner = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)
    assert trainer.run.optimizer == "adamw" and type(inner) is torch.optim.AdamW
    assert inner.defaults["fused"] is True
    assert trainer.run.gradient_checkpointing is False  # model.gradient_checkpointing=auto: off for the tiny UNet
    before = {k: v.detach().clone() for k, v in trainer.engine.module.unet.named_parameters()}
    trainer.train()
    moved = [k for k, v in trainer.engine.module.unet.named_parameters() if not torch.equal(before[k], v.detach())]
    assert len(moved) > len(before) // 2
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(total=int(1.2 * 2**30)))
    short = make_trainer(**{"train.ds_config": "cpu-1rank", "train.output_dir": str(trainer.out_dir) + "-short"})
    assert short.run.optimizer == "adamw8bit"


def test_offload_without_enough_host_ram_is_refused(make_trainer, monkeypatch):
    import psutil

    from iclight_ds.train.checks import DeviceCheckError, check_offload_ram

    with pytest.raises(DeviceCheckError, match=r"x.json: zero_optimization.offload_optimizer/offload_param put "
                                                r"~9.0 GiB per rank .*\(2 rank\(s\) here: 18.0 GiB\) but this machine has "
                                                r"16.0 GiB"):
        check_offload_ram(needed_gib=9.0, ranks_here=2, ram_gib=16.0, ds_path="x.json")
    check_offload_ram(needed_gib=7.0, ranks_here=2, ram_gib=16.0, ds_path="x.json")
    # the trainer asks the planner: a full-size model with offload on a "2 GiB" machine is refused before step 1
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(total=2 * 2**30))
    with pytest.raises(DeviceCheckError, match="zero2_offload.json: zero_optimization.offload_optimizer"):
        make_trainer(**{"train.ds_config": "zero2_offload", "model.size": "full", "data.resolution": 256})


def test_a_stage_0_run_resumes_exactly_from_a_mid_run_checkpoint(data, tmp_path):
    """ZeRO stage 0 on one rank (cpu-1rank.json; its checkpoint has its own layout, which the export reads): 4 steps in
    one go, and a second run resumed from the first one's step-2 folder (given as a path), have the same step 3-4
    losses and the same exported weights. Two ranks resume through launch/train.sh in tests/e2e (test_signals.py,
    test_fbc.py, test_multinode.py)."""
    common = {"train.ds_config": "cpu-1rank", "train.lr": 1e-3, "train.steps": 4, "train.checkpoint_every": 2}
    full, part = tmp_path / "full", tmp_path / "part"
    Trainer(run_config(full, data, common)).train()
    Trainer(run_config(part, data, {**common, "train.resume": str(full / "checkpoints" / "step_00000002")})).train()
    assert sorted(losses(full)) == [1, 2, 3, 4] and sorted(losses(part)) == [3, 4]
    assert losses(part) == {s: v for s, v in losses(full).items() if s > 2}
    a, b = load_file(str(full / "unet.safetensors")), load_file(str(part / "unet.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = base_for_run(full / "config.json").unet.state_dict()
    assert any(not torch.equal(a[k], v) for k, v in start.items() if k != "conv_in.weight")  # the steps moved them
    saved = json.loads((part / "checkpoints" / "step_00000004" / "config.json").read_text())
    assert saved["model"]["variant"] == "fc" and saved["train"]["resume"].endswith("step_00000002")


def test_resume_of_a_checkpoint_without_resolved_json_builds_its_optimizer(make_trainer):
    """Checkpoints written before resolved.json existed trained with AdamW8bit under auto, on a CPU too: a resume with
    auto builds that one, not the fused AdamW auto picks on a CPU now (8-bit states do not load into it)."""
    import json

    first = make_trainer(**{"train.ds_config": "cpu-1rank", "train.optimizer": "adamw8bit", "train.steps": 1})
    first.train()
    folder = first.ckpt_root / "step_00000001"
    (folder / "resolved.json").unlink()
    (folder / "manifest.json").unlink()  # such checkpoints had no manifest either: resumed unverified, by request
    config = json.loads((folder / "config.json").read_text())
    config["train"]["optimizer"] = "auto"  # what such a run recorded
    (folder / "config.json").write_text(json.dumps(config))
    again = make_trainer(**{"train.ds_config": "cpu-1rank", "train.resume": "latest", "train.steps": 2,
                            "train.resume_unverified": True})
    assert again.run.optimizer == "adamw8bit"
    again.train()
    assert again.step == 2


def test_resume_builds_the_optimizer_and_config_the_checkpoint_holds(make_trainer, monkeypatch):
    """auto may resolve differently on another machine (RAM, GPUs); a resume must load its states into the same
    optimizer under the same DeepSpeed config."""
    import json

    from iclight_ds.train import engine as eng
    from iclight_ds.train import plan

    first = make_trainer(**{"train.ds_config": "zero2_offload", "train.steps": 1})
    first.train()
    ckpt_dir = first.ckpt_root / "step_00000001"
    resolved = json.loads((ckpt_dir / "resolved.json").read_text())
    assert {k: resolved[k] for k in ("optimizer", "ds_config")} == {
        "optimizer": "cpu_adam", "ds_config": str(eng.REPO_DS_CONFIGS / "zero2_offload.json")}
    with pytest.raises(eng.EngineConfigError, match="train.optimizer=adamw8bit, but the checkpoint .* holds cpu_adam"):
        make_trainer(**{"train.ds_config": "zero2_offload", "train.resume": "latest", "train.optimizer": "adamw8bit"})
    # a machine where auto would now pick 8-bit states (and, on CPU, cpu-1rank.json) still resumes with the
    # checkpoint's CPU Adam and DeepSpeed config
    monkeypatch.setattr(plan, "optimizer_for", lambda *a, **k: "adamw8bit")
    again = make_trainer(**{"train.ds_config": "auto", "train.resume": "latest", "train.steps": 2})
    assert again.run.optimizer == "cpu_adam" and Path(again.run.ds_config).name == "zero2_offload.json"
    again.train()
    assert again.step == 2


def test_resume_refuses_another_model_or_synthetic_set(make_trainer):
    """A checkpoint resumed into another VAE or architecture would load and train on as something else: refused
    by name, with the command that resumes it as it was. What a resume may change (steps, LR) still resumes."""
    from iclight_ds.config import ConfigError

    first = make_trainer(**{"train.steps": 1, "model.vae": "tiny-4x"})
    first.train()
    with pytest.raises(ConfigError, match=r"model.vae='tiny-4x' there, 'auto' here.*--config .*step_00000001/config"):
        make_trainer(**{"train.resume": "latest"})
    with pytest.raises(ConfigError, match=r"model.merger_hidden=64 there, 32 here"):
        make_trainer(**{"train.resume": "latest", "model.vae": "tiny-4x", "model.merger_hidden": 32})
    again = make_trainer(**{"train.resume": "latest", "model.vae": "tiny-4x", "train.steps": 2, "train.lr": 5e-4})
    again.train()
    assert again.step == 2


def test_only_a_given_dataset_is_validated(make_trainer, monkeypatch, tmp_path):
    """data.validate checks a dataset at data.path; the synthetic scenes the trainer writes itself are not re-read."""
    from iclight_ds.train import build

    checked = []
    patch_everywhere(monkeypatch, build, "check_dataset", lambda root, cfg: checked.append(Path(root)))
    make_trainer(**{"data.path": None, "data.synth_samples": 8, "train.output_dir": str(tmp_path / "synthetic")})
    assert checked == []
    given = make_trainer()
    assert checked == [Path(given.cfg.data.path)]


def test_training_refuses_a_broken_dataset_unless_skipping(make_trainer, data, tmp_path, caplog):
    import shutil

    from iclight_ds.data.dataset import DatasetError

    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    first = json.loads((broken / "manifest.jsonl").read_text().splitlines()[0])
    png = broken / first["target"]
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])  # truncated PNG
    with pytest.raises(DatasetError, match=rf"(?s)set data.skip_bad=true.*manifest.jsonl:1: {first['target']}: "
                                           "cannot decode"):
        make_trainer(**{"data.path": str(broken)})
    with caplog.at_level("WARNING"):
        trainer = make_trainer(**{"data.path": str(broken), "data.skip_bad": True, "train.steps": 8})
        trainer.train()
    assert "1 sample line(s) have problems and will be skipped" in caplog.text
    assert trainer.step == 8 and trainer.dataset.skipped >= 1  # 8 steps x 8 samples visit every one of the 32
