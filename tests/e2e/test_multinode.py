"""Several nodes on one machine, through the path users take: launch/train.sh with a hostfile and --no-ssh, one
launcher per "node" (DeepSpeed's --node_rank), master 127.0.0.1. Two nodes must train exactly as one node with the
same world size; a lost node or a stuck rank must end the run with a message, not hang it."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import helpers
import psutil
import pytest
from safetensors.torch import load_file

from iclight_ds.train import checkpoint as ckpt

REPO = helpers.REPO
pytestmark = pytest.mark.multinode
RUN = ["--train.steps", "4", "--data.synth_samples", "32", "--data.num_workers", "0", "--logging.preview_every", "0",
       "--logging.eval_every", "0", "--logging.progress", "false", "--logging.every", "1", "--logging.wandb", "false",
       "--logging.tensorboard", "false"]


def _launch(out: Path, args: list[str], log: Path) -> subprocess.Popen:
    """One launcher, in its own process group (so that a node can be killed whole)."""
    return subprocess.Popen(["bash", str(REPO / "launch/train.sh"), "--output-dir", str(out), *args],
                            cwd=REPO, env=helpers.subprocess_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _nodes(tmp: Path, out: Path, ranks_per_node: int, extra: list[str], port: int) -> list[subprocess.Popen]:
    hostfile = tmp / "hostfile"
    hostfile.write_text(f"node0 slots={ranks_per_node}\nnode1 slots={ranks_per_node}\n")
    common = ["--hostfile", str(hostfile), "--no-ssh", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    return [_launch(out, [*common, "--node-rank", str(n), *extra], tmp / f"{out.name}-node{n}.log") for n in (0, 1)]


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 420) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError("a launcher did not finish:\n" + "\n".join(log.read_text()[-3000:] for log in logs))
    return codes


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in helpers.metrics(out) if "loss" in r]


def _ok(codes, logs):
    assert codes == [0] * len(codes), "\n".join(log.read_text()[-3000:] for log in logs)


def test_two_nodes_train_as_one_node_of_the_same_world_size(tmp_path):
    """Two ranks per node (each node's local ranks against the global ones), ZeRO-2. The node boundary is the
    launchers' and the rendezvous', the same for every ZeRO stage: ZeRO-3 across ranks is in test_distributed.py."""
    ds_config, per_node = "cpu", 2
    one = tmp_path / "one-node"
    log = tmp_path / "one-node.log"
    port = str(helpers.find_free_port())
    _ok(_wait([_launch(one, ["--num-gpus", str(2 * per_node), "--master-port", port, "--ds-config", ds_config, *RUN],
                       log)], [log]), [log])
    two = tmp_path / "two-nodes"
    procs = _nodes(tmp_path, two, per_node, ["--ds-config", ds_config, *RUN], helpers.find_free_port())
    logs = [tmp_path / f"two-nodes-node{n}.log" for n in (0, 1)]
    _ok(_wait(procs, logs), logs)
    assert json.loads((two / "resolved.json").read_text())["world_size"] == 2 * per_node
    assert _losses(two) == _losses(one) and len(_losses(one)) == 4
    a, b = load_file(str(one / "unet.safetensors")), load_file(str(two / "unet.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _python_ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    def is_rank(proc: psutil.Process) -> bool:  # as DeepSpeed's launcher starts a rank, and still there
        try:
            return proc.cmdline()[1:4] == ["-u", "-m", "iclight_ds.train"]
        except psutil.Error:
            return False

    return [p for p in psutil.Process(launcher.pid).children(recursive=True) if is_rank(p)]


def _wait_for_checkpoint(out: Path, procs, logs) -> None:
    """Until the run's first checkpoint is published (its `latest` file); on failure every launcher is killed."""
    try:
        helpers.wait_until((out / "checkpoints" / "latest").is_file, what=f"a checkpoint in {out}", procs=procs)
    except AssertionError as e:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(f"{e}:\n" + "\n".join(log.read_text()[-3000:] for log in logs)) from None


# A run long enough to be interrupted; a constant LR, so that resuming it to fewer steps trains as a run of that
# many steps would
LONG = [*RUN[:1], "400", *RUN[2:], "--train.checkpoint_every", "2", "--train.collective_timeout_s", "30",
        "--train.schedule", "constant", "--ds-config", "cpu"]


def test_a_lost_node_ends_the_run_and_a_relaunch_resumes_exactly(tmp_path):
    reference = tmp_path / "reference"
    procs = _nodes(tmp_path, reference, 1, [*LONG, "--train.steps", "8"], helpers.find_free_port())
    logs = [tmp_path / f"reference-node{n}.log" for n in (0, 1)]
    _ok(_wait(procs, logs), logs)

    out = tmp_path / "run"
    procs = _nodes(tmp_path, out, 1, LONG, helpers.find_free_port())
    logs = [tmp_path / f"run-node{n}.log" for n in (0, 1)]
    _wait_for_checkpoint(out, procs, logs)
    os.killpg(procs[1].pid, signal.SIGKILL)  # kill -9 every process of node 1
    started = time.monotonic()
    code = procs[0].wait(timeout=120)
    assert code != 0 and time.monotonic() - started < 30  # a lost peer is seen at once (connection reset)
    text = logs[0].read_text()
    assert "a collective with the other ranks failed while" in text, text[-3000:]
    assert "relaunch every node with --resume latest" in text
    saved = ckpt.latest_tag(out / "checkpoints")
    ckpt.verify(out / "checkpoints" / saved)  # the last checkpoint is intact

    procs = _nodes(tmp_path, out, 1, [*LONG, "--train.steps", "8", "--resume", "latest"], helpers.find_free_port())
    logs = [tmp_path / f"resume-node{n}.log" for n in (0, 1)]
    _ok(_wait(procs, logs), logs)
    a, b = load_file(str(reference / "unet.safetensors")), load_file(str(out / "unet.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)
    assert _losses(out)[-4:] == _losses(reference)[-4:]


def test_a_stuck_rank_ends_the_run_within_the_timeout(tmp_path):
    out = tmp_path / "run"
    procs = _nodes(tmp_path, out, 1, [*LONG, "--train.collective_timeout_s", "20"], helpers.find_free_port())
    logs = [tmp_path / f"run-node{n}.log" for n in (0, 1)]
    _wait_for_checkpoint(out, procs, logs)
    for rank in _python_ranks(procs[1]):
        rank.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    try:
        code = procs[0].wait(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        raise AssertionError("node 0 did not stop after its peer was stopped:\n" + logs[0].read_text()[-4000:])
    finally:
        os.killpg(procs[1].pid, signal.SIGKILL)
        procs[1].wait()
    assert code != 0 and time.monotonic() - started < 90  # the 20 s timeout, plus the exit
    text = logs[0].read_text()
    assert "a collective with the other ranks failed while" in text and "Timed out" in text, text[-3000:]
    tag = ckpt.latest_tag(out / "checkpoints")
    ckpt.verify(out / "checkpoints" / tag)
    helpers.run_logged(helpers.python_module("iclight_ds.train.export", "--run", out, "--out", tmp_path / "exported"),
                       tmp_path / "export.log")
    assert (tmp_path / "exported" / "unet.safetensors").is_file()
