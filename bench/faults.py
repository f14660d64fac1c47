"""Fault campaign: one run of the tiny model on 2 CPU ranks, interrupted again and again at random points (kill -9 of
a random rank during a step, kill -9 during a checkpoint save, SIGTERM of the whole launcher), and resumed with
`--resume latest` each time until it finishes. Its exported weights must equal, bit for bit, those of the same run
without interruptions.

    python bench/faults.py [--faults 20] [--steps 200] [--seed 0] [--out bench/results/faults-cpu.json]

Prints a table of the interruptions and writes the JSON (with provenance) after every one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.provenance import provenance  # noqa: E402

KINDS = ("kill9-step", "kill9-save", "sigterm")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(var, None)
    return env


def _launch(out: Path, steps: int, log: Path, resume: bool) -> subprocess.Popen:
    args = ["bash", str(REPO / "launch/train.sh"), "--num-gpus", "2", "--master-port", str(_port()),
            "--output-dir", str(out), "--ds-config", "cpu", "--train.steps", str(steps),
            "--train.checkpoint_every", "5", "--train.checkpoint_minutes", "0", "--train.keep", "2",
            "--data.synth_samples", "64", "--data.num_workers", "0", "--logging.preview_every", "0",
            "--logging.eval_every", "0", "--logging.every", "1", "--logging.progress", "false", "--logging.wandb", "false",
            "--logging.tensorboard", "false"] + (["--resume", "latest"] if resume else [])
    return subprocess.Popen(args, cwd=REPO, env=_env(), stdout=log.open("a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    try:
        kids = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in kids if _is_rank(p)]


def _is_rank(proc: psutil.Process) -> bool:
    """A training rank, as DeepSpeed's launcher starts it (python -u -m iclight_ds.train ...); not one that is gone."""
    try:
        return proc.cmdline()[1:4] == ["-u", "-m", "iclight_ds.train"]
    except psutil.Error:  # exited (or a zombie) since it was listed
        return False


def _wait_group_gone(pgid: int, budget_s: float = 300.0) -> None:
    """Until no process of the launch's process group is left: the next launch must not start (and its interruption
    point must not be judged) while the previous ranks still finish a step or a save."""
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        alive = []
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except (OSError, psutil.Error):
                continue
        if not alive:
            return
        time.sleep(0.2)
    raise SystemExit(f"the processes of launch group {pgid} did not exit within {budget_s:.0f} s")


def _saving(out: Path) -> bool:
    root = out / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp-") for p in root.iterdir())


def _logged_step(out: Path) -> int:
    """The last step in metrics.jsonl (logging.every 1: every step), 0 before the first."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.startswith("{")]
    return max(steps, default=0)


def _interrupt(proc: subprocess.Popen, out: Path, kind: str, rng: random.Random) -> str:
    """Once this launch has trained `ahead` steps past where it started (so that every interruption lands in
    training, not in start-up), wait for the moment `kind` asks for and interrupt; returns what was done ('' if the
    run ended first)."""
    deadline = time.monotonic() + 300
    first, ahead = _logged_step(out), rng.randint(1, 6)
    wait_until = None
    while proc.poll() is None and time.monotonic() < deadline:
        training = _logged_step(out) >= first + ahead
        if training and wait_until is None:
            wait_until = time.monotonic() + rng.uniform(0.0, 2.0)
        if training and kind == "kill9-save" and _saving(out):
            break
        if training and kind != "kill9-save" and time.monotonic() >= wait_until:
            break
        time.sleep(0.005 if kind == "kill9-save" else 0.05)
    if proc.poll() is not None:
        print(f"     launch ended (exit {proc.returncode}) before the {kind} point: logged step {_logged_step(out)}, "
              f"waited for {first + ahead}", flush=True)
        return ""
    if kind == "sigterm":
        os.killpg(proc.pid, signal.SIGTERM)
        return "SIGTERM to the launcher's process group"
    ranks = _ranks(proc)
    if not ranks:
        print(f"     no training rank under the launcher at the {kind} point", flush=True)
        return ""
    victim = rng.choice(ranks)
    victim.kill()
    return f"kill -9 of rank pid {victim.pid}" + (" during a save" if kind == "kill9-save" else "")


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def _provenance(argv: list[str]) -> dict:
    return {"provenance": provenance("bench/faults.py", argv), "ranks": "2 CPU ranks (gloo)"}


def campaign(args: argparse.Namespace, work: Path, argv: list[str]) -> dict:
    rng = random.Random(args.seed)
    report = {**_provenance(argv), "steps": args.steps, "faults_asked": args.faults, "interruptions": []}
    ref = work / "reference"
    code = _launch(ref, args.steps, work / "reference.log", resume=False).wait()
    if code != 0:
        raise SystemExit(f"the uninterrupted run failed ({code}); see {work / 'reference.log'}")
    run, launches = work / "run", 0
    while True:
        resume = (run / "checkpoints" / "latest").is_file()
        proc = _launch(run, args.steps, work / "run.log", resume=resume)
        launches += 1
        done = ""
        if len(report["interruptions"]) < args.faults:
            kind = KINDS[len(report["interruptions"]) % len(KINDS)]
            done = _interrupt(proc, run, kind, rng)
        code = proc.wait()
        _wait_group_gone(proc.pid)  # the launcher exits first; its ranks may still be saving after a SIGTERM
        if done:
            latest_file = run / "checkpoints" / "latest"
            latest = latest_file.read_text().strip() if latest_file.is_file() else None
            report["interruptions"].append({"kind": kind, "what": done, "exit_status": code, "latest_after": latest})
            print(f"{len(report['interruptions']):3d}  {kind:11s}  exit {code:4d}  latest {latest}", flush=True)
            _write(args.out, report)
            continue
        if code != 0:
            report["failure"] = f"a launch that was not interrupted exited {code}; see run.log"
            break
        if (run / "unet.safetensors").is_file():
            break
    a, b = load_file(str(ref / "unet.safetensors")), load_file(str(run / "unet.safetensors"))
    equal = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # an interruption survived when the launch after it resumed and the run went on to the reference's weights
    survived = len(report["interruptions"]) if equal and "failure" not in report else 0
    report.update(launches=launches, tried=len(report["interruptions"]), survived=survived,
                  final_weights_bit_identical=equal)
    _write(args.out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--faults", type=int, default=20)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/faults-cpu.json")
    p.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = p.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = campaign(args, args.keep, argv)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            report = campaign(args, Path(tmp), argv)
    print(f"interruptions tried {report['tried']}, survived {report['survived']}; final weights bit-identical: "
          f"{report['final_weights_bit_identical']} ({report['launches']} launches)")
    return 0 if report["final_weights_bit_identical"] and report["tried"] >= args.faults else 1


if __name__ == "__main__":
    sys.exit(main())
