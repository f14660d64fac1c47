"""Interruptions of real runs: kill -9 of one rank and resume, kill during a save, SIGTERM to the trainer or its
group, Ctrl-C through the deepspeed launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (QUIET_ARGS, REPO, find_free_port, losses, run_config, run_logged, subprocess_env,
                     wait_until)
from iclight_ds.train.trainer import Trainer

COMMON = ["--logging.every", "1", *QUIET_ARGS, "--train.lr", "1e-3", "--data.num_workers", "1", "--ds-config", "cpu"]


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen) -> int:
    """The last logged step once it is `step` or later (the run's metrics.jsonl is the event)."""
    def reached() -> int:
        path = run / "metrics.jsonl"
        steps = [json.loads(x)["step"] for x in path.read_text().splitlines() if x.endswith("}")] if path.is_file() else []
        return steps[-1] if steps and steps[-1] >= step else 0

    return wait_until(reached, what=f"step {step} of {run}", procs=(proc,))


@pytest.fixture(scope="module")
def data(synthetic) -> Path:
    return synthetic(32, size=64, seed=5)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run of 6 steps."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_logged(["bash", "launch/train.sh", "--num-gpus", "2", "--data.path", str(data), "--output-dir", str(out),
                "--train.steps", "6", "--master-port", str(find_free_port()), *COMMON], out.parent / "log.txt")
    return out


def test_kill9_one_rank_then_resume_matches_uninterrupted(data, reference, tmp_path):
    import psutil

    kill_at = 2  # fixed: a checkpoint behind it (one every step) and four steps left, so the run is still going
    out = tmp_path / "run"
    cmd = ["bash", "launch/train.sh", "--num-gpus", "2", "--data.path", str(data), "--output-dir", str(out),
           "--train.steps", "6", "--train.checkpoint_every", "1", *COMMON]
    with (tmp_path / "a.txt").open("w") as log:
        proc = subprocess.Popen(cmd + ["--master-port", str(find_free_port())], cwd=REPO, env=subprocess_env(),
                                stdout=log, stderr=subprocess.STDOUT)
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
    run_logged(cmd + ["--resume", "latest", "--master-port", str(find_free_port())], tmp_path / "b.txt")
    assert losses(out) == losses(reference)
    a, b = load_file(str(reference / "unet.safetensors")), load_file(str(out / "unet.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000005", "step_00000006"]  # train.keep = 3


def test_kill_during_save_keeps_previous_checkpoint(data, tmp_path):
    """SIGKILL in the middle of writing the step-4 checkpoint: step 3 stays the latest and resumes exactly."""
    script = tmp_path / "crash.py"
    script.write_text(
        "import os, sys\n"
        "from iclight_ds.train import cli, engine\n"
        "real = engine.save_checkpoint\n"
        "def dying_save(eng, root, tag, client_state):\n"
        "    real(eng, root, tag, client_state)\n"
        "    if client_state['step'] == 4:\n"
        "        os.kill(os.getpid(), 9)  # files half written: the optimizer state is there, rng/config are not\n"
        "engine.save_checkpoint = dying_save\n"
        "sys.exit(cli.main())\n"
    )
    out = tmp_path / "run"
    args = ["--train.ds_config", "cpu", "--data.path", str(data), "--train.output_dir", str(out),
            "--train.steps", "6", "--train.checkpoint_every", "1", "--logging.every", "1", "--logging.wandb",
            "false", "--logging.progress", "false", "--train.lr", "1e-3", "--data.num_workers", "1"]
    proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000003"
    assert (ckpts / ".tmp-step_00000004").is_dir() and not (ckpts / "step_00000004").exists()
    # resumed in this process: the same run's settings, the cheap evaluation of in-process tests
    Trainer(run_config(out, data, {"train.steps": 6, "train.checkpoint_every": 1, "train.lr": 1e-3,
                                   "data.num_workers": 1, "train.resume": "latest"})).train()
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    assert not (ckpts / ".tmp-step_00000004").exists()  # debris cleaned by the next save of that step
    assert (ckpts / "latest").read_text() == "step_00000006"


def _signal_at_step_2(cmd: list[str], out: Path, log_path: Path, send) -> int:
    """Run `cmd` in a session of its own, call `send(proc)` once step 2 is logged, return its exit status. A run whose
    exit hangs is killed with its whole group, so it cannot outlive the test."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
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
    last = max(losses(out))
    assert (out / "checkpoints" / "latest").read_text() == f"step_{last:08d}"
    assert "signal 15: saving at step" in (tmp_path / "log.txt").read_text()


def test_ctrl_c_through_the_deepspeed_launcher_saves(data, tmp_path, free_port):
    """`bash launch/train.sh` and Ctrl-C: SIGINT reaches the whole process group, and the deepspeed launcher then sends
    SIGTERM to every process under the rank, DataLoader workers included. The rank must still save its last step."""
    out = tmp_path / "run"
    cmd = ["bash", "launch/train.sh", "--ds-config", "cpu", "--output-dir", str(out), "--data.path", str(data),
           "--train.steps", "100000", "--logging.every", "1", "--logging.wandb", "false", "--logging.progress",
           "false", "--data.num_workers", "1", "--master-port", str(free_port)]
    # its exit status is the deepspeed runner's (KeyboardInterrupt), not the rank's
    _signal_at_step_2(cmd, out, tmp_path / "log.txt", lambda p: os.killpg(p.pid, signal.SIGINT))
    text = (tmp_path / "log.txt").read_text()
    assert "signal 2: saving at step" in text, text[-3000:]
    assert "is killed by signal" not in text, text[-3000:]
    last = max(losses(out))
    assert (out / "checkpoints" / "latest").read_text() == f"step_{last:08d}"
