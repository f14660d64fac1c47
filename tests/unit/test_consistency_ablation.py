"""bench/consistency_ablation.py's summary: each arm's spread over seeds and its ratios against vanilla, paired by seed."""

import pytest

from bench import consistency_ablation as ablation


def _run(seed: int, psnr: float, drift: float, additivity: float) -> dict:
    return {"seed": seed, "train_seconds": 100.0 + seed,
            "eval": {"psnr": psnr, "ssim": 0.5, "chroma_drift": drift, "additivity_error": additivity}}


def test_arms_are_paired_with_vanilla_by_seed():
    arms = {"vanilla": [_run(0, 18.0, 0.20, 0.40), _run(1, 17.0, 0.30, 0.50)],
            # listed in the other order: the ratio pairs seed with seed, not position with position
            "x0": [_run(1, 17.5, 0.25, 0.25), _run(0, 18.2, 0.18, 0.20)]}
    out = ablation.summarise(arms)
    x0 = out["x0"]
    assert x0["additivity_ratio"]["per_seed"] == pytest.approx([0.5, 0.5])
    assert x0["psnr_gain_db"]["mean"] == pytest.approx(0.35)
    assert x0["drift_change"]["mean"] == pytest.approx(-0.035)
    assert x0["target_met"] is True
    assert out["vanilla"]["metrics"]["psnr"]["mean"] == pytest.approx(17.5)
    assert out["vanilla"]["metrics"]["psnr"]["std"] == pytest.approx(0.7071, abs=1e-4)  # sample std of 18 and 17
    assert "additivity_ratio" not in out["vanilla"]


def test_a_lower_ratio_bought_with_psnr_does_not_meet_the_target():
    arms = {"vanilla": [_run(0, 18.0, 0.20, 0.40)], "paper": [_run(0, 17.0, 0.20, 0.10)]}
    paper = ablation.summarise(arms)["paper"]
    assert paper["additivity_ratio"]["mean"] == pytest.approx(0.25)
    assert paper["target_met"] is False


def test_each_arm_trains_its_own_objective():
    args = ablation.parse_args([])
    assert args.seeds == [0, 1, 2] and args.arms == ["vanilla", "paper", "x0", "x0-sum", "x0-sum-high",
                                                     "x0-sum-high-5", "x0-sum-noise", "x0-sum-noise-high", "linear"]
    assert {arm: ablation.ARMS[arm] for arm in args.arms} == {
        "vanilla": ("0", "paper", "mean", 0, "snr"), "paper": ("0.1", "paper", "mean", 0, "snr"),
        "x0": ("0.1", "x0", "mean", 0, "snr"), "x0-sum": ("0.1", "x0", "sum", 0, "snr"),
        "x0-sum-high": ("1.0", "x0", "sum", 500, "snr"), "x0-sum-high-5": ("5.0", "x0", "sum", 500, "snr"),
        "x0-sum-noise": ("0.1", "x0", "sum", 0, "noise"), "x0-sum-noise-high": ("0.1", "x0", "sum", 500, "noise"),
        "linear": ("1.0", "linear", "mean", 0, "snr")}
