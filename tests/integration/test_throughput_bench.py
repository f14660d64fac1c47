"""bench/throughput.py on the CPU with the tiny model (its rows, FLOPs, the out-of-memory, build-failure, dead-case
and time-budget paths), bench/gpu_busy.py against a stand-in nvidia-smi, and the offload-tuning DeepSpeed variants
in bench/ds_variants/."""

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import gpu_busy  # noqa: E402
from bench import throughput as tp  # noqa: E402
from iclight_ds.train import engine as eng  # noqa: E402

pytestmark = pytest.mark.integration
TINY = ["--size", "tiny", "--resolution", "32", "--steps", "1", "--warmup", "1", "--min-time-s", "0", "--in-process"]


def _rows(path: Path) -> dict[tuple[str, int], dict]:
    return {(r["case"], r["micro_batch"]): r for r in json.loads(path.read_text())["rows"]}


def test_rows_of_a_tiny_cpu_run(tmp_path, monkeypatch):
    timed = tp._time_micro_batch

    def out_of_memory_at_4(trainer, sample, micro_batch, args):
        if micro_batch == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return timed(trainer, sample, micro_batch, args)

    monkeypatch.setattr(tp, "_time_micro_batch", out_of_memory_at_4)
    out = tmp_path / "throughput.json"
    assert tp.main(TINY + ["--cases", "base,xformers", "--micro-batches", "1,2,4,8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = _rows(out)
    assert sorted(rows) == [("base", mb) for mb in (1, 2, 4, 8)] + [("xformers", mb) for mb in (1, 2, 4, 8)]
    # an out-of-memory error ends the sweep: recorded, and the larger micro-batches are not run
    assert rows["base", 4]["error"].startswith("out of memory: CUDA out of memory")
    assert rows["base", 8]["error"] == "not run: out of memory at micro-batch 4"
    assert rows["base", 4]["samples_per_s"] is None and rows["base", 8]["tflops"] is None
    for mb in (1, 2):
        row = rows["base", mb]
        assert row["device"] == "cpu" and row["micro_batch"] == mb and row["unet_rows"] == 3 * mb
        assert row["samples_per_s"] > 0 and row["tflops"] > 0 and row["error"] is None
        assert row["samples_per_s"] == pytest.approx(mb / row["step_s"])
        assert row["tflops"] == pytest.approx(row["flops_per_step"] / row["step_s"] / 1e12)
        assert row["mfu"] is None and row["gpu_busy"] is None and row["device_peak_gib"] is None
        assert row["peak_rss_gib"] > 0.1
        # the step the trainer builds for zero2.json with the base switches
        assert (row["zero_stage"], row["offload"], row["optimizer"], row["attention"]) == (2, "none", "adamw8bit", "sdpa")
        assert (row["gradient_checkpointing"], row["channels_last"], row["compile"]) == (False, False, False)
    # FLOPs are linear in the micro-batch
    assert rows["base", 2]["flops_per_step"] == 2 * rows["base", 1]["flops_per_step"]
    # no xformers on a CPU: recorded, not measured
    assert all(rows["xformers", mb]["error"].startswith("unavailable: ") for mb in (1, 2, 4, 8))
    assert rows["xformers", 1]["samples_per_s"] is None and rows["xformers", 1]["tflops"] is None
    # what the file says about where it comes from
    assert result["device"] == "cpu" and result["device_count"] == 1 and result["device_name"]
    assert result["peak"]["dense_bf16_tflops"] is None
    run = result["runs"][0]
    assert run["git_commit"] and "--cases base,xformers" in run["command"] and run["date"]
    assert {"torch", "deepspeed", "diffusers", "transformers"} <= set(run["versions"])
    assert result["summary"]["best"]["case"] == "base"


@pytest.mark.skipif(torch.cuda.is_available(), reason="SuperOffload builds on CUDA; the test needs a case that cannot")
def test_a_case_that_cannot_build_is_recorded(tmp_path):
    out = tmp_path / "superoffload.json"
    tp.main(TINY + ["--cases", "zero3-superoffload", "--micro-batches", "1,2", "--out", str(out)])
    rows = _rows(out)
    for mb in (1, 2):  # DeepSpeed's SuperOffload asserts a CUDA accelerator
        assert rows["zero3-superoffload", mb]["error"].startswith("failed to build: AssertionError: SuperOffload")
        assert rows["zero3-superoffload", mb]["samples_per_s"] is None


def test_flops_of_the_full_unet_match_the_published_count():
    # ~2.03 TFLOP per 512 px UNet row forward + backward (../shared/DOMAIN.md), counted on a CPU, where torch's CPU
    # flash-attention kernel has no FLOP formula: attention counted 0 there. On the meta device SDPA runs as its math
    # (two bmm per attention: 126 GFLOP a forward, x3 with backward), so the count is that plus attention, per row,
    # and 3 rows per sample (plus the small environment encoder and merger)
    flops = tp.count_flops("full", 512, 1, checkpointing=False)
    assert flops == pytest.approx(3 * (2.03e12 + 3 * 126e9), rel=0.02)
    assert tp.count_flops("tiny", 32, 1, checkpointing=True) > tp.count_flops("tiny", 32, 1, checkpointing=False)


def test_cases_past_the_budget_are_recorded_not_run(tmp_path):
    out = tmp_path / "budget.json"
    tp.main(TINY + ["--cases", "offload,compile", "--budget-s", "1", "--min-case-s", "60", "--out", str(out)])
    rows = _rows(out)
    assert sorted(rows) == [("compile", 8), ("offload", 1), ("offload", 8)]
    assert {r["error"] for r in rows.values()} == {"not run: time budget"}


def test_a_dead_case_keeps_its_finished_rows(tmp_path):
    info = tp.device_info()
    results = tp.Results(tmp_path / "dead.json", info, {"command": "x"}, append=False)
    args = tp.parse_args(TINY)
    log = tmp_path / "case.log"
    log.write_text("...\nKilled\n")
    tp._record_failure("base", [1, 2, 4], {1}, 2, -9, log, results, info, args)
    rows = _rows(tmp_path / "dead.json")
    assert rows["base", 2]["error"] == "killed by signal 9 (out of host memory?)" and "Killed" in rows["base", 2]["log_tail"]
    assert rows["base", 4]["error"] == "not run: killed by signal 9 (out of host memory?) at micro-batch 2"


def _fake_nvidia_smi(folder: Path, values: list[str], *, idle_until: Path | None = None) -> None:
    """A stand-in nvidia-smi: with --loop-ms it prints `values` as utilization samples (after 10% samples until the
    file `idle_until` exists, when given); otherwise a card's name."""
    script = folder / "nvidia-smi"
    idle = f"while [ ! -e {idle_until} ]; do echo 10; sleep 0.05; done\n" if idle_until else ""
    lines = "".join(f"echo {v}; sleep 0.05\n" for v in values)
    script.write_text(f'#!/bin/bash\n[[ "$*" == *--loop-ms* ]] || {{ echo "NVIDIA Stand-in"; exit 0; }}\n'
                      f"{idle}{lines}exec sleep 30\n")  # exec: terminate() ends the sampler at once
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_busy_sampler_reads_utilization(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, ["40", "[N/A]", "80", "60"])
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with gpu_busy.BusySampler("0") as sampler:
        wait_until(lambda: len(sampler.samples) == 3, what="the stand-in's three samples", timeout=60)
    assert sampler.available and [v for _, v in sampler.samples] == [0.4, 0.8, 0.6]
    assert sampler.busy() == pytest.approx(0.6)
    assert sampler.busy(since=sampler.samples[1][0]) == pytest.approx(0.7)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with gpu_busy.BusySampler("0") as none:
        pass
    assert not none.available and none.busy() is None  # no nvidia-smi: no number, not a guess


def test_busy_of_a_command_counts_its_training_window(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    _fake_nvidia_smi(tmp_path, ["90"] * 30, idle_until=metrics)  # busy from the first logged loss on, whenever
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    train = f'sleep 0.6; echo \'{{"step": 10, "loss": 1.0, "samples_per_s": 123.0}}\' > {metrics}; sleep 30'
    out = tmp_path / "busy.json"
    gpu_busy.main(["--out", str(out), "--limit-s", "4", "--metrics", str(metrics), "--", "bash", "-c", train])
    result = json.loads(out.read_text())
    assert result["stopped_by_limit"] and result["wall_s"] < 60
    assert result["gpu_busy_training"] > 0.8 and result["gpu_busy_whole_run"] < result["gpu_busy_training"]
    assert 0.4 < result["training_started_after_s"] < 4 and result["logged_samples_per_s"] == [123.0]
    assert result["device_name"] == "NVIDIA Stand-in" and result["provenance"]["git_commit"]


@pytest.mark.parametrize("path", sorted((REPO / "bench" / "ds_variants").glob("*.json")), ids=lambda p: p.stem)
def test_offload_variants_change_only_their_offload_settings(path):
    variant = eng.read_ds_config(path)  # comment keys dropped, checked as the trainer checks a config
    raw = json.loads(path.read_text())
    base = eng.read_ds_config(REPO / "ds_configs" / raw["_base"])
    assert {k: v for k, v in variant.items() if k != "zero_optimization"} == \
        {k: v for k, v in base.items() if k != "zero_optimization"}
    assert variant["zero_optimization"] != base["zero_optimization"]
    assert eng.offloads_optimizer(variant) and variant["zero_optimization"]["stage"] == base["zero_optimization"]["stage"]
    assert any(c.ds_config == str(path) for c in tp.CASES.values())  # every variant is measured by a case
