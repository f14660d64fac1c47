"""Reliability: kill -9 and resume, kill during a save, SIGTERM, NaN guards, failed saves, refused configs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_distributed import REPO, _env, _run

COMMON = ["--logging.every", "1", "--logging.wandb", "false", "--logging.progress", "false", "--train.lr", "1e-3",
          "--data.num_workers", "1", "--ds-config", "cpu"]


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:  # training records (evaluation records carry eval/* instead)
            out[m["step"]] = m["loss"]
    return out


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}")
        path = run / "metrics.jsonl"
        if path.is_file():
            steps = [json.loads(x)["step"] for x in path.read_text().splitlines() if x.endswith("}")]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from iclight_ds.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, 32, size=64, seed=5)
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run of 6 steps."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _run(["bash", "launch/train.sh", "--num-gpus", "2", "--data.path", str(data), "--output-dir", str(out),
          "--train.steps", "6", "--master-port", "29611", *COMMON], out.parent / "log.txt")
    return out


def test_kill9_one_rank_then_resume_matches_uninterrupted(data, reference, tmp_path):
    import psutil

    kill_at = random.Random().randint(2, 4)
    print(f"killing rank 1 with SIGKILL after step {kill_at}")
    out = tmp_path / "run"
    cmd = ["bash", "launch/train.sh", "--num-gpus", "2", "--data.path", str(data), "--output-dir", str(out),
           "--train.steps", "6", "--train.checkpoint_every", "1", *COMMON]
    with (tmp_path / "a.txt").open("w") as log:
        proc = subprocess.Popen(cmd + ["--master-port", "29612"], cwd=REPO, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT)
        _wait_for_step(out, kill_at, proc)
        launcher = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                        if "deepspeed.launcher.launch" in p.cmdline())
        ranks = launcher.children()  # the rank processes (their data-loader workers are one level down)
        assert len(ranks) == 2, [p.cmdline() for p in ranks]
        victim = next(p for p in ranks if p.environ().get("RANK") == "1")
        victim.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
    assert proc.returncode != 0
    done = json.loads(Path(out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
                           / "config.json").read_text())
    assert done["train"]["steps"] == 6
    _run(cmd + ["--resume", "latest", "--master-port", "29613"], tmp_path / "b.txt")
    assert _losses(out) == _losses(reference)
    a, b = load_file(str(reference / "unet.safetensors")), load_file(str(out / "unet.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000005", "step_00000006"]  # train.keep = 3


def test_kill_during_save_keeps_previous_checkpoint(data, reference, tmp_path):
    """SIGKILL in the middle of writing the step-4 checkpoint: step 3 stays the latest and resumes exactly."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import os, sys\n"
        "from iclight_ds import engine, train\n"
        "real = engine.save_checkpoint\n"
        "def dying_save(eng, root, tag, client_state):\n"
        "    real(eng, root, tag, client_state)\n"
        "    if client_state['step'] == 4:\n"
        "        os.kill(os.getpid(), 9)  # files half written: the optimizer state is there, rng/config are not\n"
        "engine.save_checkpoint = dying_save\n"
        "sys.exit(train.main())\n"
    )
    out = tmp_path / "run"
    args = ["--train.ds_config", "cpu", "--data.path", str(data), "--train.output_dir", str(out),
            "--train.steps", "6", "--train.checkpoint_every", "1", "--logging.every", "1", "--logging.wandb",
            "false", "--logging.progress", "false", "--train.lr", "1e-3", "--data.num_workers", "1"]
    proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000003"
    assert (ckpts / ".tmp-step_00000004").is_dir() and not (ckpts / "step_00000004").exists()
    _run([sys.executable, "-m", "iclight_ds.train", *args, "--train.resume", "latest"], tmp_path / "b.txt")
    assert sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]
    assert not (ckpts / ".tmp-step_00000004").exists()  # debris cleaned by the next save of that step
    assert (ckpts / "latest").read_text() == "step_00000006"


def _signal_at_step_2(cmd: list[str], out: Path, log_path: Path, send) -> int:
    """Run `cmd` in a session of its own, call `send(proc)` once step 2 is logged, return its exit status. A run whose
    exit hangs is killed with its whole group, so it cannot outlive the test."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_for_step(out, 2, proc)
            send(proc)
            return proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("to", ["process", "group"])
def test_sigterm_saves_and_exits_zero(data, tmp_path, to):
    """SIGTERM to the trainer alone, or to its whole process group as `timeout` does: the DataLoader worker must not
    die first, or the main process stops on the dead worker without saving; nor may it hang the exit."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "iclight_ds.train", "--train.ds_config", "cpu", "--data.path", str(data),
           "--train.output_dir", str(out), "--train.steps", "100000", "--logging.every", "1",
           "--logging.wandb", "false", "--logging.progress", "false", "--data.num_workers", "1"]
    send = {"group": lambda p: os.killpg(p.pid, signal.SIGTERM), "process": lambda p: p.send_signal(signal.SIGTERM)}
    rc = _signal_at_step_2(cmd, out, tmp_path / "log.txt", send[to])
    assert rc == 0, (tmp_path / "log.txt").read_text()[-3000:]
    last = max(_losses(out))
    assert (out / "checkpoints" / "latest").read_text() == f"step_{last:08d}"
    assert "signal 15: saving at step" in (tmp_path / "log.txt").read_text()


def test_ctrl_c_through_the_deepspeed_launcher_saves(data, tmp_path):
    """`bash launch/train.sh` and Ctrl-C: SIGINT reaches the whole process group, and the deepspeed launcher then sends
    SIGTERM to every process under the rank, DataLoader workers included. The rank must still save its last step."""
    out = tmp_path / "run"
    cmd = ["bash", "launch/train.sh", "--ds-config", "cpu", "--output-dir", str(out), "--data.path", str(data),
           "--train.steps", "100000", "--logging.every", "1", "--logging.wandb", "false", "--logging.progress",
           "false", "--data.num_workers", "1"]
    # its exit status is the deepspeed runner's (KeyboardInterrupt), not the rank's
    _signal_at_step_2(cmd, out, tmp_path / "log.txt", lambda p: os.killpg(p.pid, signal.SIGINT))
    text = (tmp_path / "log.txt").read_text()
    assert "signal 2: saving at step" in text, text[-3000:]
    assert "is killed by signal" not in text, text[-3000:]
    last = max(_losses(out))
    assert (out / "checkpoints" / "latest").read_text() == f"step_{last:08d}"


# ------------------------------------------------------------------------------------------------- in-process


@pytest.fixture
def make_trainer(data, tmp_path):
    from iclight_ds.config import load_config
    from iclight_ds.train import Trainer

    def make(cls=Trainer, **overrides):
        base = {"train.ds_config": "cpu", "data.path": str(data), "train.output_dir": str(tmp_path / "run"),
                "train.steps": 4, "logging.every": 1, "logging.wandb": False, "logging.progress": False,
                "data.num_workers": 0, "train.lr": 1e-3}
        base.update(overrides)
        return cls(load_config(None, base))

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
    from iclight_ds.train import Trainer

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
    from iclight_ds.train import NonFiniteError, Trainer

    cls = type("T", (NaNTrainer, Trainer), {"poison": set(range(3, 100))})
    trainer = make_trainer(cls, **{"train.max_bad_steps": 2})
    with pytest.raises(NonFiniteError, match="3 non-finite losses in a row at step 3"):
        trainer.train()
    ckpts = Path(trainer.out_dir) / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    from iclight_ds.engine import fp32_state_dict_from_checkpoint

    state = fp32_state_dict_from_checkpoint(ckpts, "step_00000002")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_failed_save_leaves_previous_checkpoint(make_trainer, monkeypatch, caplog):
    from iclight_ds import checkpoint, engine

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


def test_optimizer_combinations_refused():
    from iclight_ds.checks import DeviceCheckError, check_optimizer

    with pytest.raises(DeviceCheckError, match="cpu_adam keeps its states on the CPU.*zero2.json"):
        check_optimizer("cpu_adam", accelerator="cuda", stage=2, offload_optimizer=False, ds_path="zero2.json")
    with pytest.raises(DeviceCheckError, match="needs ZeRO"):
        check_optimizer("cpu_adam", accelerator="cpu", stage=0, offload_optimizer=False, ds_path="x.json")
    check_optimizer("cpu_adam", accelerator="cuda", stage=2, offload_optimizer=True, ds_path="zero2_offload.json")
    check_optimizer("adamw8bit", accelerator="cuda", stage=3, offload_optimizer=False, ds_path="zero3.json")


def test_optimizer_auto_follows_where_the_step_runs():
    """auto: a fast fp32 optimizer where the step runs on the host (DeepSpeed's CPU Adam with offload, torch's AdamW on
    a CPU-only machine); 8-bit AdamW on a GPU."""
    from iclight_ds import engine as eng

    offload = eng.read_ds_config(eng.REPO_DS_CONFIGS / "1gpu-8gb.json")
    plain = eng.read_ds_config(eng.REPO_DS_CONFIGS / "zero2.json")
    cpu = eng.read_ds_config(eng.REPO_DS_CONFIGS / "cpu-1rank.json")
    assert eng.resolve_optimizer("auto", offload, on_gpu=True) == "cpu_adam"
    assert eng.resolve_optimizer("auto", plain, on_gpu=True) == "adamw8bit"
    assert eng.resolve_optimizer("auto", cpu, on_gpu=False) == "adamw"
    assert eng.resolve_optimizer("auto", plain, on_gpu=False) == "adamw"
    assert eng.resolve_optimizer("adamw8bit", offload, on_gpu=True) == "adamw8bit"  # an explicit choice is kept
    assert eng.resolve_optimizer("adamw8bit", cpu, on_gpu=False) == "adamw8bit"


def test_auto_on_a_cpu_trains_with_fused_adamw_unless_the_ram_is_short(make_trainer, monkeypatch):
    """On a CPU-only machine auto builds torch's fused AdamW (bitsandbytes' 8-bit step costs ~30x more per parameter
    on the host); where its fp32 moments would not fit the RAM, 8-bit AdamW."""
    import psutil

    trainer = make_trainer(**{"train.ds_config": "cpu-1rank", "train.steps": 2})
    inner = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)
    assert trainer.optimizer_name == "adamw" and type(inner) is torch.optim.AdamW
    assert inner.defaults["fused"] is True
    assert trainer.checkpointing is False  # model.gradient_checkpointing=auto: off for the tiny UNet
    before = {k: v.detach().clone() for k, v in trainer.engine.module.unet.named_parameters()}
    trainer.train()
    moved = [k for k, v in trainer.engine.module.unet.named_parameters() if not torch.equal(before[k], v.detach())]
    assert len(moved) > len(before) // 2
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(total=int(1.2 * 2**30)))
    short = make_trainer(**{"train.ds_config": "cpu-1rank", "train.output_dir": str(trainer.out_dir) + "-short"})
    assert short.optimizer_name == "adamw8bit"


def test_cpu_adam_that_cannot_be_built_says_what_to_do(monkeypatch):
    """DeepSpeed compiles its CPU Adam at first use: a machine without a compiler gets a message, not a traceback."""
    import deepspeed.ops.adam

    from iclight_ds import engine as eng

    class Unbuildable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", Unbuildable)
    with pytest.raises(eng.EngineConfigError, match="cpu_adam.*Ninja is required.*train.optimizer=adamw8bit"):
        eng.build_optimizer("cpu_adam", [torch.nn.Parameter(torch.zeros(3))], lr=1e-3, weight_decay=0.0,
                            betas=(0.9, 0.999))


def test_offload_without_enough_host_ram_is_refused(make_trainer, monkeypatch):
    import psutil

    from iclight_ds.checks import DeviceCheckError, check_offload_ram

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


def test_resume_of_a_checkpoint_without_resolved_json_builds_its_optimizer(make_trainer):
    """Checkpoints written before resolved.json existed trained with AdamW8bit under auto, on a CPU too: a resume with
    auto builds that one, not the fused AdamW auto picks on a CPU now (8-bit states do not load into it)."""
    import json

    first = make_trainer(**{"train.ds_config": "cpu-1rank", "train.optimizer": "adamw8bit", "train.steps": 1})
    first.train()
    folder = first.ckpt_root / "step_00000001"
    (folder / "resolved.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["train"]["optimizer"] = "auto"  # what such a run recorded
    (folder / "config.json").write_text(json.dumps(config))
    again = make_trainer(**{"train.ds_config": "cpu-1rank", "train.resume": "latest", "train.steps": 2})
    assert again.optimizer_name == "adamw8bit"
    again.train()
    assert again.step == 2


def test_resume_builds_the_optimizer_and_config_the_checkpoint_holds(make_trainer, monkeypatch):
    """auto may resolve differently on another machine (RAM, GPUs); a resume must load its states into the same
    optimizer under the same DeepSpeed config."""
    import json

    from iclight_ds import engine as eng
    from iclight_ds import plan

    first = make_trainer(**{"train.ds_config": "zero2_offload", "train.steps": 1})
    first.train()
    ckpt_dir = first.ckpt_root / "step_00000001"
    assert json.loads((ckpt_dir / "resolved.json").read_text()) == {
        "optimizer": "cpu_adam", "ds_config": str(eng.REPO_DS_CONFIGS / "zero2_offload.json")}
    with pytest.raises(eng.EngineConfigError, match="train.optimizer=adamw8bit, but the checkpoint .* holds cpu_adam"):
        make_trainer(**{"train.ds_config": "zero2_offload", "train.resume": "latest", "train.optimizer": "adamw8bit"})
    # a machine where auto would now pick 8-bit states (and, on CPU, cpu-1rank.json) still resumes with the
    # checkpoint's CPU Adam and DeepSpeed config
    monkeypatch.setattr(plan, "optimizer_for", lambda *a, **k: "adamw8bit")
    again = make_trainer(**{"train.ds_config": "auto", "train.resume": "latest", "train.steps": 2})
    assert again.optimizer_name == "cpu_adam" and again.ds_path.name == "zero2_offload.json"
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
    from iclight_ds.train import Trainer

    checked = []
    monkeypatch.setattr(Trainer, "_validate_dataset", lambda self, root: checked.append(Path(root)))
    make_trainer(**{"data.path": None, "data.synth_samples": 8, "train.output_dir": str(tmp_path / "synthetic")})
    assert checked == []
    given = make_trainer()
    assert checked == [Path(given.cfg.data.path)]


def test_refused_configurations(tmp_path, data):
    from iclight_ds.config import ConfigError, load_config
    from iclight_ds.engine import EngineConfigError, batch_geometry, read_ds_config

    with pytest.raises(ConfigError, match="train.keep"):
        load_config(None, {"train.keep": -1})
    ds = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    ds["train_batch_size"] = 5
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(EngineConfigError, match="train_batch_size=5 != train_micro_batch_size_per_gpu x "
                                                 "gradient_accumulation_steps x world size"):
        batch_geometry(read_ds_config(tmp_path / "ds.json"), world_size=1)


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
