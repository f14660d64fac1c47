"""The measurement tables in README.md and docs/, generated from bench/results/*.json.

    python bench/report.py            # rewrite every generated table in place
    python bench/report.py --check    # exit 1 and print the difference where a table differs from its results

A generated table sits between `<!-- report: NAME -->` and `<!-- /report -->` in the markdown; NAME is one of
TABLES below, each a function of the result files it reads. Everything outside the markers is left alone.

--check also finds every bench/results/ file the docs name that does not exist, and reads the prose: in every
paragraph, list item or table that names a file in bench/results/ (a table also by the paragraph that introduces it,
ending in a colon), each number with a unit (dB, GiB, MiB, KiB, s, ms, samples/s, steps/s, x, %; both ends of a
range), and each number without one that has two decimals or more (a ratio, an SSIM), must be a number of that file
at its printed precision (a value as stored, or bytes as GiB / MiB / KiB, seconds as ms, a fraction as %, a score's
gain over copy-the-input) or a number a generated table in README.md or docs/ prints (a mean over seeds, say).
NOT_MEASURED lists, per file, the few such numbers there that are not measurements, each with its reason.
"""

from __future__ import annotations

import argparse
import bisect
import difflib
import json
import math
import re
import statistics
import sys
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DOCS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
BLOCK = re.compile(r"(<!-- report: ([\w-]+) -->\n)(.*?)(<!-- /report -->)", re.S)
GiB = 2**30


@cache
def result(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def sig(x: float, digits: int = 3) -> str:
    """`x` to `digits` significant digits, trailing zeros kept (22.0, 0.198, 367)."""
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def times_faster(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"
    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "**missed**"


# ------------------------------------------------------------------------------------------------ bench/memory.py

MEMORY_CASES = {  # case -> its row's label
    "naive": "naive: plain PyTorch, fp32, AdamW, no checkpointing",
    "naive-pinned": "the same with the malloc threshold pinned as for ZeRO-3",
    "plain-bf16": "plain PyTorch loop: bf16 + fp32 master, AdamW8bit, checkpointing",
    "cpu-1rank": "`cpu-1rank.json` (ZeRO stage 0), 1 rank, AdamW8bit, checkpointing",
    "zero2-1rank": "`zero2.json`, 1 rank, AdamW8bit, checkpointing",
    "zero3-2rank": "`cpu-zero3.json`, 2 CPU ranks, AdamW8bit, checkpointing (per rank)",
}
GPU_CASES = {
    "naive": "naive: plain PyTorch, fp32, AdamW, no checkpointing",
    "zero2-1rank": "`zero2.json`, AdamW8bit on the GPU, checkpointing",
    "offload-opt": "`1gpu-8gb.json`, ZeRO-2 + optimizer offload, AdamW8bit on the host",
    "offload-all": "`1gpu-6gb.json`, ZeRO-3 + parameter and optimizer offload, AdamW8bit on the host",
}  # memory-cuda.json names no optimizer: its states' bytes are 8-bit AdamW's
OPTIMIZER_NAMES = {"adamw8bit": "AdamW8bit", "cpu_adam": "DeepSpeed's CPU Adam", "adamw": "torch's AdamW"}


def _case(file: str, name: str) -> dict:
    return result(file)["cases"][name][0]  # rank 0 of a multi-rank case


def _memory_rows(file: str, labels: dict[str, str], gpu: bool) -> list[list[str]]:
    rows = []
    for name, label in labels.items():
        if name not in result(file)["cases"]:
            continue
        c = _case(file, name)
        rows.append([label.format(optimizer=OPTIMIZER_NAMES.get(c.get("optimizer"), "?")),
                     *(f"{c[k] / GiB:.2f}" for k in ("param_bytes", "grad_bytes", "optimizer_bytes")),
                     *([f"{c['device_peak_gib']:.2f}"] if gpu else []), f"{c['peak_rss_gib']:.2f}", sig(c["step_s"])])
    return rows


MEMORY_HEADER = ["case", "params", "grads", "optimizer (+ fp32 master)"]


def memory_cpu() -> list[str]:
    return table(MEMORY_HEADER + ["peak RSS", "step s"], _memory_rows("memory-cpu.json", MEMORY_CASES, gpu=False))


def memory_cpu_ratios() -> list[str]:
    d = result("memory-cpu.json")
    ratios, targets = d["ratios"], d["targets"]

    def over(a: str, b: str, field: str, key: str, digits: int) -> str:
        x, y = _case("memory-cpu.json", a)[field], _case("memory-cpu.json", b)[field]
        value = f"{ratios[key]:.{digits}f}x"
        shown = f"{x:.2f} / {y:.2f}" if field == "peak_rss_gib" else f"{sig(x)} / {sig(y)}"
        return f"{shown} = " + (f"**{value}**" if key in targets else value)

    def target(key: str) -> str:
        return f"<= {targets[key]:.2f}x: {verdict(ratios[key], targets[key])}" if key in targets else "-"

    def row(label: str, a: str, b: str, field: str, key: str, digits: int) -> list[str]:
        return [label, over(a, b, field, key, digits), target(key)]

    rows = [
        row("ZeRO-3 2-rank peak RSS per rank / the naive step", "zero3-2rank", "naive", "peak_rss_gib",
            "zero3_2rank_peak_rss_vs_naive", 3),
        row("the same against the naive step with the pinned threshold", "zero3-2rank", "naive-pinned",
            "peak_rss_gib", "zero3_2rank_peak_rss_vs_naive_pinned", 3),
        row("`cpu-1rank.json` step / the plain PyTorch loop (same math)", "cpu-1rank", "plain-bf16", "step_s",
            "cpu_1rank_step_vs_plain_loop", 2),
        row("`zero2.json` at one rank / the plain loop", "zero2-1rank", "plain-bf16", "step_s",
            "zero2_1rank_step_vs_plain_loop", 2),
        ["the three consistency evaluations as one batched forward / three separate (fwd + bwd)",
         f"**{ratios['batched_vs_separate_forwards']:.2f}x**", target("batched_vs_separate_forwards")],
    ]
    return table(["ratio", "measured", "target"], rows)


def memory_cuda() -> list[str]:
    return table(MEMORY_HEADER + ["GPU peak", "peak RSS", "step s"],
                 _memory_rows("memory-cuda.json", GPU_CASES, gpu=True))


def memory_cuda_offload() -> list[str]:
    labels = {"zero2-1rank": "`zero2.json`, {optimizer} on the GPU",
              "offload-opt": "`1gpu-8gb.json`, {optimizer} on the host"}
    return table(MEMORY_HEADER + ["GPU peak", "peak RSS", "step s"],
                 _memory_rows("memory-cuda-offload.json", labels, gpu=True))


def memory_cuda_targets() -> list[str]:
    d, cpu_adam = result("memory-cuda.json"), result("memory-cuda-offload.json")
    r, t = d["ratios"], d["targets"]
    offload, base = _case("memory-cuda-offload.json", "offload-opt"), _case("memory-cuda-offload.json", "zero2-1rank")
    steps = [cpu_adam["ratios"]["offload_opt_step_vs_no_offload"], r["offload_opt_step_vs_no_offload"],
             r["offload_all_step_vs_no_offload"]]
    rows = [
        [f"ZeRO-2 + optimizer offload, GPU peak <= {t['offload_opt_device_peak_gib']:.0f} GiB",
         f"{r['offload_opt_device_peak_gib']:.2f} GiB",
         verdict(r["offload_opt_device_peak_gib"], t["offload_opt_device_peak_gib"])],
        [f"ZeRO-3 + parameter and optimizer offload, GPU peak <= {t['offload_all_device_peak_gib']:.0f} GiB",
         f"{r['offload_all_device_peak_gib']:.2f} GiB",
         verdict(r["offload_all_device_peak_gib"], t["offload_all_device_peak_gib"])],
        [f"offload step <= {t['offload_opt_step_vs_no_offload']}x the no-offload step",
         f"ZeRO-2 offload with CPU Adam: {sig(offload['step_s'])} / {sig(base['step_s'])} = **{steps[0]:.2f}x**; "
         f"with AdamW8bit on the host: {steps[1]:.1f}x (ZeRO-2) and {steps[2]:.1f}x (ZeRO-3)",
         verdict(min(steps), t["offload_opt_step_vs_no_offload"])],
    ]
    return table(["GPU target", "measured", ""], rows)


# ------------------------------------------------------------------------------------------------ host optimizer

HOST_OPTIMIZERS = {"adamw8bit": "bitsandbytes `AdamW8bit` (CPU path)", "cpu_adam": "DeepSpeed `DeepSpeedCPUAdam`",
                   "torch_fused": "torch `AdamW`, fused", "torch_foreach": "torch `AdamW`, foreach"}


def host_optimizer() -> list[str]:
    rows = []
    for r in result("host-optimizer-x86_64-2cores.json")["results"]:
        if "error" in r:
            rows.append([HOST_OPTIMIZERS[r["optimizer"]], "failed", "-"])
            continue
        speed = r["speedup_vs_adamw8bit"]
        rows.append([HOST_OPTIMIZERS[r["optimizer"]], f"{r['ns_per_param']:.2f}",
                     "1x" if r["optimizer"] == "adamw8bit" else f"{times_faster(speed)} faster"])
    return table(["optimizer", "ns per parameter", "vs bitsandbytes"], rows)


# ------------------------------------------------------------------------------------------------ consumer grid, NVMe

GRID_RUNS = {"1gpu-nvme:0": "`1gpu-nvme.json` (optimizer on the SSD)",
             "1gpu-6gb-nvme:0": "`1gpu-6gb-nvme.json` (weights and optimizer on the SSD)",
             "1gpu-24gb:64": "`1gpu-24gb.json`, LoRA rank 64",
             "1gpu-8gb:0": "`1gpu-8gb.json` (optimizer in RAM, CPU Adam)",
             "1gpu-12gb:0": "`1gpu-12gb.json` (optimizer in RAM, CPU Adam)",
             "1gpu-24gb:0": "`1gpu-24gb.json` (no offload; torch's AdamW, as auto picks on a CPU)"}


def consumer_grid_cpu() -> list[str]:
    runs, rows = result("consumer-grid-cpu.json")["runs"], []
    for key, label in GRID_RUNS.items():
        r = runs.get(key)
        if r is None or "error" in r:
            rows.append([label, "-", "-", "-", "-", "-"])
            continue
        under = r["planner_cpu_gib"] / r["host_peak_gib"] - 1
        rows.append([label, f"{r['host_peak_gib']:.2f}", f"{r['init_rss_gib']:.2f}",
                     f"{r['planner_cpu_gib']:.2f} ({100 * under:+.0f}%)", sig(r["step_s"]),
                     f"{r['planner_disk_gib']:.1f}"])
    return table(["run", "peak RSS GiB", "after init GiB", "planner, same run on a CPU", "step s",
                  "SSD GiB (planner)"], rows)


def nvme() -> list[str]:
    ram = _case("memory-cpu-offload.json", "offload-opt")
    runs = result("consumer-grid-cpu.json")["runs"]
    rows = [["`1gpu-8gb.json`, optimizer in RAM (`memory-cpu-offload.json`)", f"{ram['peak_rss_gib']:.2f}",
             sig(ram["step_s"]), "1 / 1"]]
    for key, label in (("1gpu-nvme:0", "`1gpu-nvme.json`, optimizer on the disk"),
                       ("1gpu-6gb-nvme:0", "`1gpu-6gb-nvme.json`, weights and optimizer on the disk")):
        r = runs[key]
        rows.append([label, f"{r['host_peak_gib']:.2f}", sig(r["step_s"]),
                     f"{r['host_peak_gib'] / ram['peak_rss_gib']:.2f} / {r['step_s'] / ram['step_s']:.1f}"])
    return table(["config", "peak RSS GiB", "step s", "vs RAM offload: RSS / step"], rows)


def nvme_shipped() -> list[str]:
    """The RAM-offload and NVMe-offload configs at their own accumulation (8 micro-batches per optimizer step), all
    measured by one call of bench/consumer_grid.py."""
    d = result("nvme-offload-cpu.json")
    runs, ram = d["runs"], d["runs"]["1gpu-8gb:0"]
    rows = []
    for key, label in (("1gpu-8gb:0", "`1gpu-8gb.json`, optimizer in RAM"),
                       ("1gpu-nvme:0", "`1gpu-nvme.json`, optimizer on the disk"),
                       ("1gpu-6gb-nvme:0", "`1gpu-6gb-nvme.json`, weights and optimizer on the disk")):
        r = runs.get(key)
        if r is None or "step_s" not in r:
            continue
        rows.append([label, f"{r['host_peak_gib']:.2f}", sig(r["step_s"]), sig(r["step_s"] / r["accumulation"]),
                     f"{r['host_peak_gib'] / ram['host_peak_gib']:.2f} / {r['step_s'] / ram['step_s']:.2f}"])
    return table(["config (its own accumulation: 8)", "peak RSS GiB", "step s", "s per micro-batch",
                  "vs RAM offload: RSS / step"], rows)


# ------------------------------------------------------------------------------------------------ data

def cache_speed() -> list[str]:
    d = result("cache-speed-cpu.json")
    s, c = d["read_vs_step"], d["caching_throughput"]
    step = table([f"measurement (tiny FC, `ds_configs/cpu.json`: micro-batch {s['micro_batch']}, bf16, ZeRO-2, "
                  "AdamW8bit, 64 px, 1 rank)", "time"], [
        [f"read and collate one micro-batch ({s['micro_batch']} random samples) from the cache",
         f"{1000 * s['cache_read_batch_s_median']:.2f} ms"],
        [f"one training step from the cache (median of {s['steps_timed']})",
         f"{1000 * s['train_step_from_cache_s_median']:.0f} ms"],
        ["the same step encoding on the fly (PNG decode + tiny VAE + text encoder)",
         f"{1000 * s['train_step_on_the_fly_s_median']:.0f} ms"]])
    labels = {"tiny_fc_64px_bf16": "tiny models, FC, 64 px",
              "tiny_fbc_64px_bf16_k4": "tiny models, FBC with K = 4, 64 px",
              "full_sd15_fc_256px_bf16": "full-size SD1.5 VAE + CLIP text encoder (random weights), FC, 256 px, bf16",
              "full_sd15_fc_256px_fp32": "the same in fp32"}
    rows = [[label, sig(c[key]["samples_per_s"], 2 if c[key]["samples_per_s"] < 1 else 3)]
            for key, label in labels.items() if key in c]
    return step + [""] + table(["caching throughput (encode + write)", "samples/s"], rows)


def cpu_default_speed() -> list[str]:
    rows = [[r["case"], f"{1000 * r['step_s_median']:.0f} ms", sig(r["samples_per_s"]), f"{r['ratio_to_first']:.2f}",
             f"{r['warmup_5_steps_s']:.1f} s" if "warmup_5_steps_s" in r else ""]
            for r in result("cpu-default-speed-cpu.json")["rows"]]
    return table(["the CPU default's setup (tiny base, FC, vanilla, `cpu-1rank.json`, 64 px)", "step (median)",
                  "samples/s", "x the first row", "first 5 steps"], rows)


def prepare_speed() -> list[str]:
    labels = {"decode": "decoding the photos and masks alone", "prepare, 1 variant(s)": "prepare, 1 variant",
              "prepare, 2 variant(s)": "prepare, 2 variants (the default)"}
    rows = [[label, sig(r["photos_per_s"]), f"{r['ratio_to_decode']:.1f}"]
            for key, label in labels.items() if (r := result("prepare-speed-cpu.json")["rows"].get(key))]
    return table(["measurement", "photos/s", "x the decode time"], rows)


# ------------------------------------------------------------------------------------------------ quality

ABLATION_ARMS = {"vanilla": "vanilla (`lambda_c` 0)", "paper": "the paper's term (`lambda_c` 0.1, `paper`)",
                 "x0": "the x0 term (`lambda_c` 0.1, `x0`)",
                 "x0-sum": "the x0 term, phi started as the sum (`x0`, `model.merger_init sum`)",
                 "x0-sum-high": "the x0 term, phi started as the sum, at t >= 500 only (`lambda_c` 1.0)",
                 "x0-sum-high-5": "the x0 term, phi started as the sum, at t >= 500 only (`lambda_c` 5.0)",
                 "x0-sum-noise": "the x0 term, phi started as the sum, weighted 1 - abar_t (`lambda_c` 0.1)",
                 "x0-sum-noise-high": "the x0 term, phi started as the sum, weighted 1 - abar_t, at t >= 500 only",
                 "linear": "the linear-light term (`lambda_c` 1.0, `linear`)"}


def _spread(x: dict, digits: int, sign: str = "") -> str:
    return f"{x['mean']:{sign}.{digits}f} ± {x['std']:.{digits}f}"


def consistency_ablation(name: str) -> list[str]:
    d = result(name)
    b = d["baseline"]
    rows = []
    for arm, a in d["arms"].items():
        m = a["metrics"]
        ratio = a.get("additivity_ratio")
        rows.append([ABLATION_ARMS.get(arm, arm), _spread(m["psnr"], 2), _spread(m["ssim"], 3),
                     _spread(m["chroma_drift"], 3), _spread(m["additivity_error"], 3),
                     _spread(ratio, 2) if ratio else "", _spread(a["psnr_gain_db"], 2, "+") + " dB" if ratio else "",
                     f"{a['train_seconds']['mean']:.0f} s"])
    met = [arm for arm, a in d["arms"].items() if a.get("target_met")]
    return table([f"arm ({len(d['seeds'])} seeds, mean ± std)", f"PSNR fg, dB (copy {b['psnr']:.2f})",
                  f"SSIM fg (copy {b['ssim']:.3f})", f"albedo drift (copy {b['chroma_drift']:.3f})",
                  "additivity error", "additivity ratio to vanilla", "PSNR to vanilla", "training wall"], rows) + [
        "", f"{d['steps']} steps each {'from the tiny base' if d.get('base') else 'from random weights'}"
        + (f", targets shifted by {d['target_shift']:g} (imperfect supervision)" if d.get("target_shift") else "")
        + f", seeds {', '.join(map(str, d['seeds']))}; {d['eval_samples']} "
        f"held-out scenes; {d['device']}. Target (ratio <= {d['target_ratio']} at equal or better PSNR and drift): "
        + (f"met by {', '.join(met)}." if met else "met by no arm.")]


# ------------------------------------------------------------------------------------------------ bench/default_run.sh

CPU_DEFAULT_RUNS = ("default-run-cpu.json", "default-run-cpu-seed1.json", "default-run-cpu-seed2.json")
CPU_DEFAULT_TARGET_DB = 3.0
CPU_DEFAULT_LIMIT_S = 600  # the 10 minutes the CPU default is asked to take, start-up included


def _score_cells(e: dict) -> list[str]:
    return [f"{e['psnr']:.2f} ({e['psnr'] - e['baseline_psnr']:+.2f} dB)", f"{e['ssim']:.3f}",
            f"{e['chroma_drift']:.3f}", f"{e['additivity_error']:.3f}"]


def default_run_cpu() -> list[str]:
    """The CPU default at each seed, the base it starts from, and the seeds' mean and spread of the gain."""
    runs = [(name, result(name)) for name in CPU_DEFAULT_RUNS]
    first = runs[0][1]
    base = first["eval_32_base_before_finetune"]
    rows = [["the base, `conv_in` widened with zero channels, before fine-tuning", "", "0", "",
             *_score_cells(base), f"`{runs[0][0]}`"]]
    for name, d in runs:
        rows.append(["the CPU default (`bash launch/train.sh`)", str(d["seed"]), str(d["steps_reached"]),
                     f"{sum(c['wall_s'] for c in d['calls'])} s", *_score_cells(d["eval_32"]), f"`{name}`"])
    gains = [d["eval_32"]["psnr"] - d["eval_32"]["baseline_psnr"] for _, d in runs]
    mean, std = statistics.fmean(gains), statistics.stdev(gains)  # the sample std, as the ablation's spread
    walls = [sum(c["wall_s"] for c in d["calls"]) for _, d in runs]
    over = sum(w > CPU_DEFAULT_LIMIT_S for w in walls)
    e = first["eval_32"]
    return table(["model", "seed", f"steps (micro-batch {first['batch_per_rank']})", "wall, start-up included",
                  f"PSNR fg, dB (copy {e['baseline_psnr']:.2f})", f"SSIM fg (copy {e['baseline_ssim']:.3f})",
                  f"albedo drift (copy {e['baseline_chroma_drift']:.3f})", "additivity error", "result file"], rows) + [
        "", f"PSNR gain over copy-the-input, {len(gains)} seeds: {mean:+.2f} ± {std:.2f} dB (min {min(gains):+.2f}, "
        f"max {max(gains):+.2f}); target >= +{CPU_DEFAULT_TARGET_DB:g} dB: "
        f"{'met' if mean >= CPU_DEFAULT_TARGET_DB else '**missed**'}. Wall {min(walls)}-{max(walls)} s; within "
        f"{CPU_DEFAULT_LIMIT_S // 60} minutes: "
        f"{'every run' if not over else f'**{len(walls) - over} of {len(walls)} runs**'}. {e['samples']} held-out "
        f"scenes; {first['device']}."]


# ------------------------------------------------------------------------------------------------ reliability

FAULTS = {"kill9-step": "`kill -9` of one rank mid-step", "kill9-save": "`kill -9` of one rank during a save",
          "sigterm": "SIGTERM to the launcher's process group"}


def faults() -> list[str]:
    d = result("faults-cpu.json")
    kinds: dict[str, list[dict]] = {}
    for i in d["interruptions"]:
        kinds.setdefault(i["kind"], []).append(i)
    rows = [[FAULTS.get(k, k), str(len(v)), ", ".join(sorted({str(i["exit_status"]) for i in v}))]
            for k, v in kinds.items()]
    asked = f" (of the {d['faults_asked']} asked: the run finished first)" if d["tried"] < d["faults_asked"] else ""
    return table(["interruption", "times", "exit status"], rows) + [
        "", f"{d['steps']} steps in {d['launches']} launches; {d['tried']} interruptions{asked}, {d['survived']} "
        f"survived; final weights bit-identical to the uninterrupted run's: "
        f"{'yes' if d['final_weights_bit_identical'] else '**no**'}."]


TABLES = {"memory-cpu": memory_cpu, "memory-cpu-ratios": memory_cpu_ratios, "memory-cuda": memory_cuda,
          "memory-cuda-offload": memory_cuda_offload, "memory-cuda-targets": memory_cuda_targets,
          "host-optimizer": host_optimizer, "consumer-grid-cpu": consumer_grid_cpu, "nvme": nvme,
          "nvme-shipped": nvme_shipped,
          "cache-speed": cache_speed, "prepare-speed": prepare_speed, "faults": faults,
          "cpu-default-speed": cpu_default_speed,
          "default-run-cpu": default_run_cpu,
          "consistency-ablation-base": lambda: consistency_ablation("consistency-ablation-base.json"),
          "consistency-ablation-shift": lambda: consistency_ablation("consistency-ablation-shift.json"),
          "consistency-ablation-linear": lambda: consistency_ablation("consistency-ablation-linear.json"),
          "consistency-ablation-high": lambda: consistency_ablation("consistency-ablation-high.json")}


# ------------------------------------------------------------------------------------------------ cited numbers

CITED = re.compile(r"[\w.-]+\.json")
UNIT = r"(?:\s?(dB|GiB|MiB|KiB|ms|s|samples/s|steps/s)(?![\w/])|([x%])(?!\w))"
MEASURED = re.compile(r"(?<![\w.])[+-]?(?:(\d+(?:\.\d+)?)-)?(\d+(?:\.\d+)?)" + UNIT)  # a number or range, a unit
# a number without a unit with two decimals or more (a ratio, an SSIM, an additivity error), not a version's part
BARE = re.compile(r"(?<![\w.])[+-]?(?:(\d+\.\d{2,})-)?(\d+\.\d{2,})(?!\.\d)(?![\w%/-])"
                  r"(?!\s?(?:dB|GiB|MiB|KiB|ms|s|samples/s|steps/s)(?![\w/]))")
NUMBER = re.compile(r"\d+(?:\.\d+)?")
# a VAE's downsampling factor (the 4x VAE, a table's VAE column), not a measured ratio
NAMES = re.compile(r"\b\dx(?: and \dx)?(?= (?:tiny )?VAEs?\b| runs?\b| pair\b| model\b| one\b)|(?<=\| )\dx(?= (?:wide )?\|)")
# per file, numbers with a unit in a paragraph that names a result file but that are not in it, each with its reason
NOT_MEASURED = {
    "docs/data.md": {size: "a cache entry's size counted from its tensors' shapes (the measured sizes follow it)"
                     for size in ("200 KiB", "116 KiB", "64 KiB", "16 KiB", "6 KiB", "480 KiB")},
    "docs/performance.md": {
        "10 s": "12 ns per parameter times the UNet's 866M parameters: arithmetic on a measurement",
        "128 KiB": "the mmap threshold the trainer sets", "32 MiB": "glibc's largest dynamic mmap threshold",
        "15%": "the test's tolerance (tests/unit/test_consumer_grid.py)",
        "0.66 GiB": "a difference of two numbers of the LoRA run (host_peak_gib - planner_cpu_gib)",
        "1.2 GiB": "a difference of two numbers of the LoRA run (host_peak_gib - init_rss_gib)",
        "24 GiB": "the development machine's RAM",
    },
    "docs/quality.md": {
        "27.7 dB": "the shipped 8x VAE's own score, from its file's metadata (the VAE table above)",
        "1.97": "the ratio of two of its numbers: additivity 0.386 / 0.196 at step 1000 (quality-scale-h200.json)",
        "32x": "512k samples over the CPU default's 16k (2000 steps x 8): arithmetic on the settings",
        "22.8 dB": "the target: copy's 16.78 dB plus 6 dB",
        "2.5x": "the lowest-loss LR (min_loss_lr, 7.6e-3) over the default LR 3e-3",
    },
    "docs/testing.md": {"10%": "a test's tolerance", "15%": "a test's tolerance"},
}


SCALES = {"GiB": (1, 1 / GiB), "MiB": (1, 1 / 2**20), "KiB": (1, 1 / 1024), "ms": (1, 1000), "%": (1, 100)}
# what the docs print from a stored number, per unit: bytes as GiB / MiB / KiB, seconds as ms, a fraction as %;
# every other unit (dB, s, x, samples/s) as stored


def _numbers(x, out: list[float]) -> list[float]:
    """Every number in a result (bools aside) and each score's gain over copy-the-input (`psnr - baseline_psnr`)."""
    if isinstance(x, dict):
        if isinstance(x.get("psnr"), float) and isinstance(x.get("baseline_psnr"), float):
            out.append(x["psnr"] - x["baseline_psnr"])
        for v in x.values():
            _numbers(v, out)
    elif isinstance(x, list):
        for v in x:
            _numbers(v, out)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        out.append(x)
    return out


@cache
def numbers_in(name: str, unit: str) -> list[float]:
    return sorted(abs(v) * scale for v in _numbers(result(name), []) for scale in SCALES.get(unit, (1,)))


def holds(name: str, printed: str, unit: str = "") -> bool:
    """Whether result file `name` holds a number that rounds to `printed` (a number with `unit`) at its printed
    precision."""
    value, decimals = abs(float(printed)), len(printed.partition(".")[2])
    values = numbers_in(name, unit)
    i = bisect.bisect_left(values, value - 0.5 * 10**-decimals - 1e-9)
    return i < len(values) and values[i] <= value + 0.5 * 10**-decimals + 1e-9


NAMED = re.compile(r"bench/results/([\w.-]+\.(?:json|png))")


def missing_files(paths=None) -> list[str]:
    """Each `bench/results/NAME` the docs name that does not exist, as `path:line: NAME`."""
    return [f"{_rel(path)}:{n}: {name}" for path in paths or DOCS
            for n, line in enumerate(path.read_text().split("\n"), 1) for name in NAMED.findall(line)
            if not (RESULTS / name).is_file()]


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def paragraphs(text: str) -> list[tuple[int, str, str]]:
    """(first line number, text, what it inherits) of each paragraph, list item and table of a markdown text,
    generated tables and fenced code left out; a table inherits the text of the paragraph that introduces it (the
    one just above it, ending in a colon), where its result files are named."""
    text = BLOCK.sub(lambda m: m.group(1) + "\n" * m.group(3).count("\n") + m.group(4), text)
    blocks: list[list] = []  # [first line, lines, is a table]
    fenced, start = False, True
    for n, line in enumerate(text.split("\n"), 1):
        if line.startswith("```"):
            fenced, start = not fenced, True
            continue
        if line.startswith(("<!--", "#")):  # a heading or a generated table: introduces nothing below it
            blocks.append([n, [], None])
        if fenced or not line.strip() or line.startswith(("<!--", "#")):
            start = True
            continue
        table = line.startswith("|")
        if start or re.match(r"\s*(- |\d+\. )", line) or table != blocks[-1][2]:
            blocks.append([n, [], table])
        blocks[-1][1].append(line)
        start = False
    out = []
    for i, (first, lines, table) in enumerate(blocks):
        if table is None:
            continue
        above = " ".join(blocks[i - 1][1]) if i and table and not blocks[i - 1][2] else ""
        out.append((first, " ".join(lines), above if above.rstrip().endswith(":") else ""))
    return out


def generated_numbers(text: str) -> set[str]:
    """Every number printed in the generated tables of a markdown text (each computed from the results)."""
    return {n for m in BLOCK.finditer(text) for n in NUMBER.findall(m.group(3))}


def uncited_numbers(paths=None) -> list[str]:
    """Every number with a unit (dB, GiB, s, x, % ...), or without one but with two decimals or more, in a markdown
    paragraph, list item or table that names a file in bench/results/ (a table: or whose introducing paragraph
    does), which none of the files named holds and no generated table of these texts prints (a seeds' mean, say);
    generated tables aside. Each entry: `path:line: number (files)`, the line where the paragraph starts."""
    missing, paths = [], paths or DOCS
    printed = set().union(*(generated_numbers(path.read_text()) for path in paths))
    for path in paths:
        rel, text_all = _rel(path), path.read_text()
        allowed = NOT_MEASURED.get(rel, {})
        for first, text, above in paragraphs(text_all):
            files = sorted({f for f in CITED.findall(text + " " + above) if (RESULTS / f).is_file()})
            if not files:
                continue
            prose = CITED.sub("", NAMES.sub("", text))
            found = [(m.group(0).strip(), (m.group(1), m.group(2)), m.group(3) or m.group(4))
                     for m in MEASURED.finditer(prose)]
            found += [(m.group(0).strip(), (m.group(1), m.group(2)), "") for m in BARE.finditer(prose)]
            for token, values, unit in found:
                if token in allowed or all(v in printed or any(holds(f, v, unit) for f in files)
                                           for v in values if v):
                    continue
                missing.append(f"{rel}:{first}: {token} ({', '.join(files)})")
    return missing


def render(text: str, where: str = "") -> str:
    """`text` with every generated block rewritten; an unknown NAME is an error naming it."""
    def block(m: re.Match) -> str:
        if m.group(2) not in TABLES:
            raise SystemExit(f"{where}: unknown report table {m.group(2)!r}; known: {', '.join(TABLES)}")
        return m.group(1) + "\n".join(TABLES[m.group(2)]()) + "\n" + m.group(4)
    return BLOCK.sub(block, text)


def differences(paths=None) -> dict[Path, str]:
    """Each file whose generated tables differ from what the results give, with a unified diff."""
    out = {}
    for path in paths or DOCS:
        text = path.read_text()
        new = render(text, str(path))
        if new != text:
            out[path] = "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                     str(path), f"{path} (from bench/results)"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 where a table differs from its "
                   "results or a paragraph that names a result file states a number that file does not hold")
    args = p.parse_args(argv)
    diffs = differences()
    if args.check:
        missing, absent = uncited_numbers(), missing_files()
        for diff in diffs.values():
            print(diff, end="")
        for m in missing:
            print(f"not in the result it names: {m}")
        for m in absent:
            print(f"no such result file: {m}")
        return 1 if diffs or missing or absent else 0
    for path in diffs:
        path.write_text(render(path.read_text(), str(path)))
        print(f"rewrote {_rel(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
