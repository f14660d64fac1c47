"""The fine-tuning options: EMA weights, TensorBoard, periodic checkpoints, previews of the user's own images, and
precision by name. Each trains a few steps of the tiny model in-process on the CPU."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import patch_everywhere
from iclight_ds.config import TrainConfig, load_config
from iclight_ds.dtypes import DTYPES
from iclight_ds.model.iclight import build_initial_model
from iclight_ds.train import engine as eng
from iclight_ds.train.ema import EMA_FILE, read_ema_file
from iclight_ds.train.export import checkpoint_state
from iclight_ds.train.trainer import Trainer

QUIET = {"logging.wandb": False, "logging.progress": False, "logging.every": 1, "logging.preview_every": 0,
         "logging.eval_every": 0, "data.num_workers": 0, "train.ds_config": "cpu-1rank"}


@pytest.fixture(scope="module")
def data(synthetic):
    return synthetic(16, seed=3)


def _cfg(out, data, **over):
    return load_config(None, {**QUIET, "train.output_dir": str(out), "data.path": str(data), **over})


def _independent_ema(weights: list[dict], decay: float) -> dict:
    """EMA of weights[0] (the initial ones), then one update per later entry, with the documented schedule: at the
    n-th update the decay is min(decay, (1 + k) / (10 + k)) with k = n - 1, and 0 at the first (diffusers' EMAModel)."""
    ema = {k: v.clone().double() for k, v in weights[0].items()}
    for n, w in enumerate(weights[1:], start=1):
        k = n - 1
        d = 0.0 if k <= 0 else min(decay, (1 + k) / (10 + k))
        ema = {key: d * ema[key] + (1 - d) * w[key].double() for key in ema}
    return ema


def test_ema_export_equals_an_independent_ema_of_the_saved_weights(data, tmp_path):
    out, decay = tmp_path / "run", 0.8
    cfg = _cfg(out, data, **{"train.steps": 5, "train.checkpoint_every": 1, "train.keep": 0, "train.ema_decay": decay,
                             "train.precision": "fp32"})
    initial = build_initial_model(cfg.model, seed=cfg.train.seed, dtype=torch.float32).state_dict()
    Trainer(cfg).train()
    raw = [checkpoint_state(out / "checkpoints" / f"step_{s:08d}", "raw") for s in range(1, 6)]
    expected = _independent_ema([initial] + raw, decay)
    exported = load_file(str(out / "unet.safetensors"))  # the end-of-run export takes the EMA by default
    small = load_file(str(out / "iclight_modules.safetensors"))
    assert set(exported) == {k[len("unet."):] for k in expected if k.startswith("unet.")}
    worst = max(float((exported[k[len("unet."):]].double() - v).abs().max()) for k, v in expected.items()
                if k.startswith("unet."))
    worst = max([worst] + [float((small[k].double() - v).abs().max()) for k, v in expected.items() if k in small])
    assert worst < 1e-6
    # and the EMA is not the raw weights (the test could not tell them apart otherwise)
    last = raw[-1]
    assert max(float((exported[k[len("unet."):]] - last[k]).abs().max()) for k in last if k.startswith("unet.")) > 1e-4
    state, meta = read_ema_file(out / "checkpoints" / "step_00000005" / EMA_FILE)
    assert meta["optimization_step"] == "5"


def test_ema_resumes_exactly(data, tmp_path):
    over = {"train.ema_decay": 0.7, "train.precision": "fp32", "train.checkpoint_every": 0}
    straight = tmp_path / "straight"
    Trainer(_cfg(straight, data, **{**over, "train.steps": 4})).train()
    split = tmp_path / "split"
    Trainer(_cfg(split, data, **{**over, "train.steps": 2})).train()
    Trainer(_cfg(split, data, **{**over, "train.steps": 4, "train.resume": "latest"})).train()
    a, _ = read_ema_file(straight / "checkpoints" / "step_00000004" / EMA_FILE)
    b, _ = read_ema_file(split / "checkpoints" / "step_00000004" / EMA_FILE)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ema_refused_with_zero3(data, tmp_path):
    from iclight_ds.config import ConfigError

    with pytest.raises(ConfigError, match="ZeRO-3"):
        Trainer(_cfg(tmp_path / "run", data, **{"train.ema_decay": 0.9, "train.ds_config": "cpu-zero3",
                                                  "train.steps": 1}))


def test_tensorboard_events_hold_the_logged_scalars(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    Trainer(_cfg(out, data, **{"train.steps": 3, "logging.tensorboard": True})).train()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [e.value for e in events.Scalars("loss")]
    assert [e.step for e in events.Scalars("loss")] == [r["step"] for r in logged]
    assert loss == pytest.approx([r["loss"] for r in logged], rel=1e-6)
    assert {"lr", "loss_vanilla", "loss_consistency", "samples_per_s"} <= set(events.Tags()["scalars"])


def test_periodic_checkpoints_by_steps_and_by_time(data, tmp_path):
    defaults = TrainConfig()
    assert (defaults.checkpoint_every, defaults.checkpoint_minutes) == (500, 30.0)  # docs/configuration.md
    out = tmp_path / "steps"
    Trainer(_cfg(out, data, **{"train.steps": 7, "train.checkpoint_every": 3, "train.keep": 0,
                               "train.checkpoint_minutes": 0})).train()
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == [
        "step_00000003", "step_00000006", "step_00000007"]
    out = tmp_path / "time"  # a cadence shorter than a step: a save after every step, `keep` honoured
    Trainer(_cfg(out, data, **{"train.steps": 4, "train.checkpoint_every": 0, "train.keep": 2,
                               "train.checkpoint_minutes": 1e-6})).train()
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]


def test_previews_of_the_users_own_images(data, tmp_path):
    rgba = np.zeros((48, 40, 4), np.uint8)
    rgba[8:40, 8:32] = (220, 90, 30, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "mine.png")
    np.save(tmp_path / "env.npy", np.full((16, 32, 3), 0.5, np.float32))
    out = tmp_path / "run"
    trainer = Trainer(_cfg(out, data, **{
        "train.steps": 2, "logging.preview_every": 2, "logging.preview_samples": 1, "logging.preview_steps": 2,
        "logging.preview_images": f"{tmp_path / 'mine.png'},{tmp_path / 'mine.png'}",
        "logging.preview_envs": str(tmp_path / "env.npy"), "logging.preview_prompts": '["warm light, from the left"]',
        "logging.preview_image_steps": 2}))
    trainer.train()
    grid = Image.open(out / "previews" / "user_step_00000002.png")
    assert grid.size == (2 * 64, 2 * 64)  # rows: the two images; columns: input | relit (no target of their own)
    cells = np.asarray(grid, dtype=np.float32)
    assert np.abs(cells[:64, 64:] - cells[:64, :64]).mean() > 1.0  # the relit column is not the input


def test_precision_by_name_derives_the_config_and_records_it(data, tmp_path):
    shipped = eng.read_ds_config(eng.resolve_ds_config_path("cpu-1rank"))
    assert shipped["bf16"]["enabled"]
    fp16 = eng.with_precision(shipped, "fp16")
    assert fp16["fp16"]["enabled"] and not fp16["bf16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0
    assert {k: v for k, v in fp16.items() if k not in ("bf16", "fp16")} == {
        k: v for k, v in shipped.items() if k not in ("bf16", "fp16")}
    assert eng.with_precision(shipped, "auto") is shipped
    out = tmp_path / "run"
    trainer = Trainer(_cfg(out, data, **{"train.steps": 1, "train.precision": "fp32"}))
    assert trainer.dtype == DTYPES["fp32"]
    assert next(trainer.engine.module.parameters()).dtype == torch.float32
    recorded = json.loads((out / "ds_config.json").read_text())
    assert not recorded["bf16"]["enabled"] and not recorded["fp16"]["enabled"]
    from iclight_ds.train.checks import DeviceCheckError

    with pytest.raises(DeviceCheckError, match="fp16"):  # fp16 is refused on a CPU, by name
        Trainer(_cfg(tmp_path / "fp16", data, **{"train.steps": 1, "train.precision": "fp16"}))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_logged_lr_follows_the_schedule(data, tmp_path, schedule):
    """train.schedule through the Trainer: a linear warm-up to train.lr over 2 steps, then the peak at every later step
    (constant), or a decay below it (cosine). The logged lr is the one the next step uses."""
    peak, steps = 1e-3, 5
    out = tmp_path / "run"
    Trainer(_cfg(out, data, **{"train.steps": steps, "train.lr": peak, "train.warmup_steps": 2,
                               "train.schedule": schedule})).train()
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) == steps and lrs[0] == pytest.approx(peak / 2)
    if schedule == "constant":
        assert lrs[1:] == [peak] * (steps - 1)
    else:
        assert lrs[1] == pytest.approx(peak) and peak > lrs[2] > lrs[3] > lrs[4] > 0


def test_noise_offset_shifts_each_channel_of_the_drawn_noise(data, tmp_path, monkeypatch):
    """objective.noise_offset through the Trainer: at the same seed the noise the objective gets is the plain draw
    plus one constant per sample and latent channel (of the offset's scale), and the loss differs from offset 0."""
    from iclight_ds.train import objectives

    drawn: list[torch.Tensor] = []  # the noise of every micro-batch, as the objective receives it
    real = objectives.iclight_losses

    def spy(engine, cond, noise, timesteps, **kw):
        drawn.append(noise.clone())
        return real(engine, cond, noise, timesteps, **kw)

    patch_everywhere(monkeypatch, objectives, "iclight_losses", spy)
    first_noise, logged = {}, {}
    for offset in (0.0, 0.5):
        out = tmp_path / f"offset-{offset}"
        Trainer(_cfg(out, data, **{"train.steps": 1, "objective.noise_offset": offset})).train()
        first_noise[offset] = drawn[0]
        drawn.clear()
        logged[offset] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    plain, shifted = first_noise[0.0], first_noise[0.5]  # (B, 4, h, w)
    shift = shifted - plain
    per_channel = shift[..., :1, :1]  # (B, 4, 1, 1)
    torch.testing.assert_close(shift, per_channel.expand_as(shift), rtol=0, atol=1e-6)  # constant over the image
    assert 0.05 < per_channel.abs().mean() < 1.5  # 0.5 * |N(0, 1)| on average is 0.4
    assert len(set(per_channel.flatten().tolist())) == per_channel.numel()  # one draw per sample and channel
    assert logged[0.5] != logged[0.0]


def test_eval_at_start_scores_the_starting_weights_once(data, tmp_path):
    """logging.eval_at_start: an evaluation before the first step, logged as step 0, of the weights the run starts
    from (the same score at any learning rate); a resumed run does not score again."""
    runs = {}
    for name, lr in (("a", 1e-3), ("b", 1e-1)):
        runs[name] = tmp_path / name
        Trainer(_cfg(runs[name], data, **{"train.steps": 1, "train.lr": lr, "logging.eval_at_start": True,
                                          "logging.eval_samples": 2, "logging.eval_steps": 2})).train()
    evals = {n: [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/psnr" in r]
             for n, run in runs.items()}
    assert [r["step"] for r in evals["a"]] == [0]  # eval_every 0: only the one before the first step
    assert evals["a"][0]["eval/psnr"] == evals["b"][0]["eval/psnr"]  # the starting weights, whatever the lr
    Trainer(_cfg(runs["a"], data, **{"train.steps": 2, "train.resume": "latest", "logging.eval_at_start": True,
                                      "logging.eval_samples": 2, "logging.eval_steps": 2})).train()
    records = [json.loads(x) for x in (runs["a"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/psnr" in r] == [0] and [r["step"] for r in records] == [0, 1, 2]


def test_the_linear_consistency_alone_trains_the_unet_through_the_frozen_vae(data, tmp_path):
    """objective.consistency linear with the vanilla term off: the only gradient is the one through the frozen VAE
    decoder, and it reaches the UNet; phi (the latent merger) takes no part."""
    out = tmp_path / "run"
    cfg = _cfg(out, data, **{"train.steps": 3, "train.precision": "fp32", "objective.lambda_vanilla": 0,
                             "objective.lambda_consistency": 1.0, "objective.consistency": "linear",
                             "objective.linear_samples": 2})
    initial = build_initial_model(cfg.model, seed=cfg.train.seed, dtype=torch.float32).state_dict()
    Trainer(cfg).train()
    records = [r for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in (r := json.loads(line))]
    assert len(records) == 3 and all(np.isfinite(r["loss_consistency"]) and r["loss_consistency"] > 0 for r in records)
    assert all(r["loss"] == r["loss_consistency"] for r in records)
    unet, small = load_file(str(out / "unet.safetensors")), load_file(str(out / "iclight_modules.safetensors"))
    assert (unet["conv_out.weight"] - initial["unet.conv_out.weight"]).abs().max() > 0
    merger = [k for k in small if k.startswith("merger.")]
    assert merger
    for k in merger:  # no gradient reached phi: AdamW's weight decay scaled each tensor, nothing else moved it
        old, new = initial[k].double(), small[k].double()
        scale = float((new * old).sum() / (old * old).sum()) if old.abs().max() > 0 else 1.0
        assert 0.99 < scale <= 1.0 and float((new - scale * old).abs().max()) < 1e-7, k
