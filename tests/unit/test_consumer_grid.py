"""The planner over the consumer grid (6-24 GB GPUs x 16/32/64 GB RAM, and 2 x 12 GB): every cell gets a config
that fits with headroom, a full fine-tune wherever an NVMe SSD makes one fit, LoRA where nothing else does, and
the planner's host estimates against what was measured (bench/results/)."""

import json
from pathlib import Path

import pytest

from iclight_ds.train import engine as eng
from iclight_ds.train import plan

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


@pytest.fixture(scope="module")
def cells():
    return plan.grid()


@pytest.fixture(scope="module")
def cells_without_ssd():
    return plan.grid(nvme_gib=None)


def test_every_cell_has_a_config_that_fits_with_headroom(cells, cells_without_ssd):
    assert len(cells) == len(cells_without_ssd) == 5 * 3 + 3
    for c in cells + cells_without_ssd:
        assert c.config != "nothing fits", c
        assert c.device_gib <= plan.HEADROOM * c.gpu_gib and c.host_gib * c.gpus <= plan.HEADROOM * c.ram_gib, c
        assert c.trades


def test_with_an_ssd_every_cell_is_a_full_fine_tune(cells):
    assert {c.lora_rank for c in cells} == {0}
    by_machine = {(c.gpus, c.gpu_gib, c.ram_gib): c for c in cells}
    small = by_machine[(1, 8, 16)]  # the commonest consumer machine: 8 GB GPU, 16 GB RAM
    assert small.config == "1gpu-nvme" and 12 < small.disk_gib < 16 and small.host_gib < 8
    assert by_machine[(1, 6, 16)].config in ("1gpu-nvme", "1gpu-6gb-nvme")
    assert by_machine[(1, 8, 32)].config == "1gpu-8gb" and by_machine[(1, 8, 32)].disk_gib == 0
    assert by_machine[(1, 24, 16)].config == "1gpu-24gb" and by_machine[(1, 24, 16)].trades.startswith("nothing")
    assert by_machine[(2, 12, 16)].config == "multi-gpu"
    assert "LoRA rank 64" in small.without_nvme  # what the same machine trains without the SSD


def test_without_an_ssd_lora_takes_the_small_ram_cells(cells_without_ssd):
    lora = {(c.gpu_gib, c.ram_gib) for c in cells_without_ssd if c.lora_rank}
    assert lora == {(6, 16), (8, 16), (12, 16)}
    for c in cells_without_ssd:
        if c.lora_rank:
            assert c.lora_rank == plan.GRID_LORA_RANK and "trains 64M parameters" in c.trades


def test_lora_rank_64_fits_4_gib_of_gpu_without_the_cuda_context():
    """LoRA rank 64, consistency on, 512 px, micro-batch 1, no offload (zero2.json): the planner's device estimate
    less the CUDA context it adds (the measured peaks of bench/results/memory-cuda.json exclude it)."""
    estimates, _ = plan.plan(gpu_mem_gib=6, gpus=1, ram_gib=16, lora_rank=64)
    z2 = next(e for e in estimates if e.config == "zero2")
    assert z2.device_gib - plan.CUDA_CONTEXT / plan.GiB <= 4.0


def test_nvme_configs_need_a_folder_and_count_their_disk():
    params = plan.unet_parameters("full", 8)
    for name, per_param in (("1gpu-nvme", 16), ("1gpu-6gb-nvme", 18)):  # fp32 master + Adam m, v + fp32 grads (+ bf16)
        ds = eng.read_ds_config(eng.resolve_ds_config_path(name))
        assert plan.nvme_bytes(params, ds, 1, "cpu_adam") == per_param * params
    estimates, _ = plan.plan(gpu_mem_gib=8, gpus=1, ram_gib=16)  # no NVMe folder
    nvme = next(e for e in estimates if e.config == "1gpu-nvme")
    assert not nvme.fits and "train.nvme_path" in nvme.why
    estimates, choice = plan.plan(gpu_mem_gib=8, gpus=1, ram_gib=16, nvme_gib=10)  # a folder with too little room
    assert "13 GiB on the NVMe folder, 10 free" in next(e for e in estimates if e.config == "1gpu-nvme").why
    assert plan.plan(gpu_mem_gib=8, gpus=1, ram_gib=16, nvme_gib=100)[1] == "1gpu-nvme"


def test_grid_cli_prints_every_cell(capsys):
    assert plan.main(["--grid"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| GPU | RAM | config | LoRA rank |") and len(table) == 2 + 18
    assert "| 8 GB | 16 GB | `1gpu-nvme` |" in "\n".join(table)
    assert plan.main(["--grid", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 18


def test_the_host_estimates_are_within_10_percent_of_the_h200_offload_measurements():
    """bench/results/memory-cuda.json (and -offload): peak RSS of the offload configs on an H200, full UNet, 512 px,
    against the planner's host estimate for the same run (HOST_BASE included)."""
    measured = {("1gpu-8gb", "adamw8bit"): "memory-cuda.json", ("1gpu-6gb", "adamw8bit"): "memory-cuda.json",
                ("1gpu-8gb", "cpu_adam"): "memory-cuda-offload.json"}
    case_of = {"1gpu-8gb": "offload-opt", "1gpu-6gb": "offload-all"}
    for (config, optimizer), name in measured.items():
        cases = json.loads((RESULTS / name).read_text())["cases"]
        run = next(r for key, runs in cases.items() for r in runs if key.startswith(case_of[config])
                   and r.get("optimizer", "adamw8bit") == optimizer)  # memory-cuda.json: all 8-bit
        estimates, _ = plan.plan(gpu_mem_gib=141, gpus=1, ram_gib=1000, optimizer=optimizer)
        estimate = next(e for e in estimates if e.config == config).host_gib
        assert abs(estimate - run["peak_rss_gib"]) <= 0.10 * run["peak_rss_gib"], (config, optimizer, estimate, run)


def test_the_cpu_estimates_are_within_15_percent_of_the_consumer_grid_measurements():
    """bench/results/consumer-grid-cpu.json (one micro-batch per step) and nvme-offload-cpu.json (the configs' own
    accumulation of 8, with the RAM-offload 1gpu-8gb.json): each run measured on the CPU against the planner's
    estimate of the same run with everything in RAM. 15%, not the 10% the H200 host estimates
    meet: the LoRA run's peak is 14% above its count (docs/performance.md)."""
    checked = [r for name in ("consumer-grid-cpu.json", "nvme-offload-cpu.json")
               for r in json.loads((RESULTS / name).read_text())["runs"].values() if "error" not in r]
    assert len(checked) >= 4
    for r in checked:
        assert abs(r["planner_cpu_gib"] - r["host_peak_gib"]) <= 0.15 * r["host_peak_gib"], r
