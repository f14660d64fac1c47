"""The memory planner: model-state arithmetic, activation measurement, and its choices per machine."""

import json

import pytest

from helpers import REPO
from iclight_ds.train import engine as eng
from iclight_ds.train import plan

P = 859_532_000  # ~ the full UNet


def test_model_state_bytes_follow_stage_and_offload():
    zero2 = eng.read_ds_config(eng.REPO_DS_CONFIGS / "zero2.json")
    device, host = plan.model_state_bytes(P, zero2, world=1, optimizer="adamw8bit")
    bucket = 2 * 200_000_000
    assert device == pytest.approx(2 * P + 2 * P + bucket + 4 * P + 2 * P) and host == 0
    device_adam, _ = plan.model_state_bytes(P, zero2, world=1, optimizer="adamw")
    assert device_adam - device == pytest.approx(6 * P)  # fp32 m, v instead of uint8
    off = eng.read_ds_config(eng.REPO_DS_CONFIGS / "zero2_offload.json")
    d_off, h_off = plan.model_state_bytes(P, off, world=1, optimizer="adamw8bit")
    # 8-bit states + fp32 master + the fp32 gradient copy and the bf16 copy-back buffer the offload keeps on the host
    assert h_off == pytest.approx(2 * P + 4 * P + 4 * P + 2 * P) and d_off < device / 2
    # on a GPU the pinned buffers (not the optimizer's states) pay torch's power-of-two rounding
    _, h_pinned = plan.model_state_bytes(P, off, world=1, optimizer="adamw8bit", pinned=True)
    assert h_pinned == pytest.approx(2 * P + plan.PINNED_ROUNDUP * 10 * P)
    # auto: DeepSpeed's CPU Adam (fp32 m, v on the host) where the optimizer is offloaded, 8-bit AdamW on a GPU,
    # torch's AdamW (fp32 m, v) on a CPU-only machine
    _, h_auto = plan.model_state_bytes(P, off, world=1, optimizer="auto")
    assert h_auto - h_off == pytest.approx(6 * P)
    assert plan.model_state_bytes(P, zero2, world=1, optimizer="auto", pinned=True) == plan.model_state_bytes(
        P, zero2, world=1, optimizer="adamw8bit", pinned=True)
    assert plan.model_state_bytes(P, zero2, world=1, optimizer="auto")[0] == device_adam


def _offload_host_at_init_gib(params: int) -> float:
    """The planner's host RAM for 1gpu-8gb.json on a GPU after init, in GiB: its pinned buffers and the process base,
    without the optimizer states (created at the first step)."""
    ds = eng.read_ds_config(eng.REPO_DS_CONFIGS / "1gpu-8gb.json")
    _, host = plan.model_state_bytes(params, ds, world=1, optimizer="adamw8bit", pinned=True)
    return (host - plan.OPTIMIZER_STATE_BYTES["adamw8bit"] * params + plan.HOST_BASE) / 2**30


def test_host_estimate_of_offload_pins_the_h200_run_it_was_fitted_to():
    """A regression pin, not a check of the model: PINNED_ROUNDUP (1.46) was set so that this count meets this run
    (1gpu-8gb.json with adamw8bit on an H200, bench/results/memory-cuda.json: 14.28 GiB of host RAM after init), so
    the test only keeps the count where it was fitted. The checks against runs the constants were not fitted to are
    the next two tests."""
    measured = json.loads((REPO / "bench/results/memory-cuda.json").read_text())
    case = measured["cases"]["offload-opt"][0]  # measured with adamw8bit
    at_init = _offload_host_at_init_gib(plan.unet_parameters("full", 8))
    assert abs(at_init - case["init_rss_gib"]) < 0.5, (at_init, case["init_rss_gib"])


@pytest.mark.parametrize("result", ["memory-cuda.json", "memory-cuda-offload.json"])
def test_host_base_matches_an_h200_rank_without_offload(result):
    """HOST_BASE (2.5 GiB), a rank's host RAM besides its model states, was not fitted to any H200 run: a ZeRO-2 rank
    with nothing offloaded holds about that much after init (2.45 GiB in both runs)."""
    case = json.loads((REPO / "bench/results" / result).read_text())["cases"]["zero2-1rank"][0]
    assert abs(plan.HOST_BASE / 2**30 - case["init_rss_gib"]) < 0.2, case["init_rss_gib"]


def test_offload_host_ram_with_cpu_adam_matches_the_h200_peak():
    """1gpu-8gb.json with DeepSpeed's CPU Adam on an H200 (bench/results/memory-cuda-offload.json, a run neither
    HOST_BASE nor PINNED_ROUNDUP was fitted to): 14.29 GiB after init and 21.07 GiB peak RSS. The planner's count
    (pinned buffers, fp32 master and moments, process base) is within 0.5 GiB of the first and 0.6 GiB of the second,
    and does not undercount the peak by more than that: an undercount sends a machine into an OOM."""
    measured = json.loads((REPO / "bench/results/memory-cuda-offload.json").read_text())
    case = measured["cases"]["offload-opt"][0]
    assert case["optimizer"] == "cpu_adam"
    params = plan.unet_parameters("full", 8)
    assert abs(_offload_host_at_init_gib(params) - case["init_rss_gib"]) < 0.5, case["init_rss_gib"]
    ds = eng.read_ds_config(eng.REPO_DS_CONFIGS / "1gpu-8gb.json")
    _, host = plan.model_state_bytes(params, ds, world=1, optimizer="cpu_adam", pinned=True)
    counted = (host + plan.HOST_BASE) / 2**30
    assert abs(counted - case["peak_rss_gib"]) < 0.6, (counted, case["peak_rss_gib"])


def test_auto_optimizer_falls_back_to_8bit_states_where_cpu_adam_does_not_fit():
    kw = dict(gpu_mem_gib=8, gpus=1, resolution=512, variant="fc", consistency=True)
    roomy = {e.config: e for e in plan.plan(ram_gib=32, **kw)[0]}
    tight = {e.config: e for e in plan.plan(ram_gib=24, **kw)[0]}
    assert roomy["1gpu-8gb"].optimizer == "cpu_adam" and roomy["1gpu-8gb"].fits
    assert tight["1gpu-8gb"].optimizer == "adamw8bit" and tight["1gpu-8gb"].fits
    assert roomy["1gpu-8gb"].host_gib - tight["1gpu-8gb"].host_gib == pytest.approx(6 * plan.unet_parameters(
        "full", 8) / 2**30)
    assert roomy["zero2"].optimizer == tight["zero2"].optimizer == "adamw8bit"  # nothing offloaded
    explicit = {e.config: e for e in plan.plan(ram_gib=24, optimizer="cpu_adam", **kw)[0]}
    assert explicit["1gpu-8gb"].optimizer == "cpu_adam" and not explicit["1gpu-8gb"].fits  # named: kept, and counted
    z3 = eng.read_ds_config(eng.REPO_DS_CONFIGS / "zero3.json")
    d1, _ = plan.model_state_bytes(P, z3, world=1, optimizer="adamw8bit")
    d4, _ = plan.model_state_bytes(P, z3, world=4, optimizer="adamw8bit")
    assert d4 < d1 / 3  # ZeRO-3 shards everything


def test_auto_optimizer_on_a_cpu_is_adamw_where_its_states_fit():
    """A CPU-only machine steps the optimizer on the host: auto picks torch's AdamW (fp32 m, v) where the RAM allows,
    counted with the activations that share it, and 8-bit AdamW where it does not."""
    kw = dict(gpu_mem_gib=None, gpus=1, resolution=256, variant="fc", consistency=True)
    roomy = {e.config: e for e in plan.plan(ram_gib=64, **kw)[0]}
    tight = {e.config: e for e in plan.plan(ram_gib=16, **kw)[0]}
    assert roomy["cpu-1rank"].optimizer == "adamw" and roomy["cpu-1rank"].fits
    assert tight["cpu-1rank"].optimizer == "adamw8bit"
    assert roomy["cpu-1rank"].host_gib - tight["cpu-1rank"].host_gib == pytest.approx(6 * plan.unet_parameters(
        "full", 8) / 2**30)
    tiny = {e.config: e for e in plan.plan(gpu_mem_gib=None, gpus=1, ram_gib=8, resolution=64, variant="fc",
                                           consistency=True, size="tiny")[0]}
    assert tiny["cpu-1rank"].optimizer == "adamw" and tiny["cpu-1rank"].fits


def test_on_a_cpu_a_config_that_keeps_fused_adamw_goes_first():
    """Full UNet on one CPU rank with 22 GiB: cpu-1rank fits only with 8-bit states (2.8x slower step), cpu.json
    (ZeRO-2) fits with fused AdamW: the planner takes the latter; with 24 GiB both keep AdamW and cpu-1rank wins."""
    kw = dict(gpu_mem_gib=None, gpus=1, resolution=256, variant="fc", consistency=True)
    estimates, choice = plan.plan(ram_gib=22, **kw)
    by = {e.config: e for e in estimates}
    assert by["cpu-1rank"].fits and by["cpu-1rank"].optimizer == "adamw8bit"
    assert choice == "cpu" and by["cpu"].optimizer == "adamw"
    assert plan.plan(ram_gib=24, **kw)[1] == "cpu-1rank"
    assert plan.plan(ram_gib=22, optimizer="adamw8bit", **kw)[1] == "cpu-1rank"  # named: the speed order as measured


def test_auto_optimizer_on_a_cpu_counts_the_activations():
    """On a CPU-only machine the activations share the RAM with the fp32 moments: a machine where the model states fit
    but states plus activations do not gets 8-bit states."""
    ds = eng.read_ds_config(eng.REPO_DS_CONFIGS / "cpu-1rank.json")
    params = plan.unet_parameters("full", 8)
    device, host = plan.model_state_bytes(params, ds, world=1, optimizer="adamw")
    activations = plan.activation_bytes("full", 8, 256) * 8 * 3
    ram_gib = (device + host + plan.HOST_BASE_CPU + activations / 2) / plan.HEADROOM / 2**30
    kw = dict(world=1, ranks_here=1, ram_gib=ram_gib, on_gpu=False)
    assert plan.optimizer_for("auto", params, ds, **kw) == "adamw"
    assert plan.optimizer_for("auto", params, ds, activations=activations, **kw) == "adamw8bit"
    assert plan.optimizer_for("adamw", params, ds, activations=activations, **kw) == "adamw"  # named: kept


def test_activations_grow_with_resolution_and_checkpointing_saves():
    a256 = plan.activation_bytes("full", 8, 256)
    a512 = plan.activation_bytes("full", 8, 512)
    assert 3.0 < a512 / a256 < 5.0  # ~ the pixel count
    assert 0.05 * 2**30 < a256 < 2 * 2**30


@pytest.mark.parametrize("gib,expected", [(6, "1gpu-6gb"), (8, "1gpu-8gb"), (12, "1gpu-12gb"), (24, "1gpu-24gb")])
def test_choice_per_gpu_size(gib, expected):
    estimates, choice = plan.plan(gpu_mem_gib=gib, gpus=1, ram_gib=64, resolution=512, variant="fc",
                                  consistency=True)
    assert choice == expected
    chosen = next(e for e in estimates if e.config == choice)
    assert chosen.device_gib <= plan.HEADROOM * gib


def test_choice_on_cpu_and_nothing_fits():
    _, choice = plan.plan(gpu_mem_gib=None, gpus=1, ram_gib=24, resolution=64, variant="fc", consistency=True,
                          size="tiny")
    assert choice == "cpu-1rank"  # one rank: ZeRO stage 0, nothing to partition
    _, none = plan.plan(gpu_mem_gib=2, gpus=1, ram_gib=8, resolution=512, variant="fbc", consistency=True)
    assert none is None
    _, multi = plan.plan(gpu_mem_gib=24, gpus=4, ram_gib=128, resolution=512, variant="fc", consistency=True)
    assert multi == "multi-gpu"


def test_the_default_runs_configs_are_never_planned():
    """ds_configs/default-gpu.json (micro-batch 512, stage 0) and default-cpu.json (micro-batch 32, stage 0, fp32)
    would fit a tiny model anywhere; only their presets name them."""
    for gib, gpus in ((80, 1), (141, 1), (24, 4), (None, 1)):
        estimates, choice = plan.plan(gpu_mem_gib=gib, gpus=gpus, ram_gib=128, resolution=64, variant="fc",
                                      consistency=True, size="tiny")
        assert choice not in (None, "default-gpu", "default-cpu")
        by = {e.config: e for e in estimates}
        for name in ("default-gpu", "default-cpu"):
            assert not by[name].fits and "default run" in by[name].why


def test_cpu_ranks_short_of_ram_get_zero3():
    """Full UNet on 2 CPU ranks: ZeRO-2 (`cpu`) when RAM allows, else `cpu-zero3`, which shards the model states."""
    kw = dict(gpu_mem_gib=None, gpus=2, resolution=256, variant="fc", consistency=True)
    estimates, roomy = plan.plan(ram_gib=64, **kw)
    assert roomy == "cpu"
    by = {e.config: e for e in estimates}
    assert by["cpu-zero3"].host_gib < by["cpu"].host_gib - 2  # half the model states
    assert not by["cpu-1rank"].fits and "for one rank" in by["cpu-1rank"].why  # replicas would repeat the step
    _, tight = plan.plan(ram_gib=16, **kw)
    assert tight == "cpu-zero3"
    assert not by["zero3"].fits and "needs a GPU" in by["zero3"].why  # GPU configs stay off CPU machines


def test_cli_prints_table_and_json(capsys):
    assert plan.main(["--gpu-mem", "8", "--ram", "32", "--resolution", "512"]) == 0
    out = capsys.readouterr().out
    assert "choice: 1gpu-8gb" in out and "zero3_offload" in out
    plan.main(["--gpu-mem", "8", "--ram", "32", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["choice"] == "1gpu-8gb" and len(data["estimates"]) == len(list(eng.REPO_DS_CONFIGS.glob("*.json")))


def test_auto_counts_the_ranks_on_this_machine(monkeypatch):
    """CPU ranks are not detectable: `auto` must plan for the ranks the trainer was started with."""
    monkeypatch.setattr(plan, "detect", lambda: {"gpus": 0, "gpu_mem_gib": None, "ram_gib": 16.0})
    kw = dict(resolution=256, variant="fc", consistency=True, size="full", optimizer="adamw8bit")
    assert plan.choose_config(**kw).stem == "cpu"  # one rank: ZeRO-2 fits 16 GiB, stage 0's fp32 gradients do not
    assert plan.choose_config(**kw, ranks=2).stem == "cpu-zero3"  # two ranks would not, with ZeRO-2
    monkeypatch.setattr(plan, "detect", lambda: {"gpus": 0, "gpu_mem_gib": None, "ram_gib": 24.0})
    assert plan.choose_config(**kw).stem == "cpu-1rank"  # they do in 24 GiB (measured 13 GiB: bench/memory.py)
