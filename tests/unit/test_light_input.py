"""model.light_input: text (the official FC: no env encoder, light in the prompt) beside env (the env-map FC)."""

import pytest
import torch

from iclight_ds.config import (
    ConfigError,
    ModelConfig,
    consistency_off_reason,
    load_config,
    trains_consistency,
)
from iclight_ds.model.iclight import build_iclight_model
from iclight_ds.train.objectives import ConditionedBatch, iclight_losses


def test_config_defaults_and_combinations():
    cfg = load_config(None)
    assert cfg.model.light_input == "env" and cfg.model.env_input and trains_consistency(cfg)
    text = load_config(None, {"model.light_input": "text"})
    assert not text.model.env_input and not trains_consistency(text)
    assert consistency_off_reason(text).startswith("model.light_input=text: the light is in the prompt")
    assert consistency_off_reason(load_config(None, {"model.light_input": "text",
                                                     "objective.lambda_consistency": 0})) is None
    assert load_config(None, {"model.light_input": "text", "model.env_tokens": 0}).model.env_tokens == 0
    with pytest.raises(ConfigError, match="model.light_input=text: applies to FC only"):
        load_config(None, {"model.light_input": "text", "model.variant": "fbc"})
    with pytest.raises(ConfigError, match=r"model.light_input: 'hdr' is not one of \['env', 'text'\]"):
        load_config(None, {"model.light_input": "hdr"})
    assert trains_consistency(load_config(None, {"model.variant": "fbc"}))  # FBC: the background is split


def test_the_text_model_has_no_env_encoder_and_ignores_env():
    torch.manual_seed(0)
    env_model = build_iclight_model(ModelConfig(size="tiny"))
    torch.manual_seed(0)
    text_model = build_iclight_model(ModelConfig(size="tiny", light_input="text"))
    assert env_model.env_encoder is not None and text_model.env_encoder is None
    assert {k.split(".")[0] for k in text_model.small_modules_state()} == {"merger"}
    noisy, concat = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, text = torch.tensor([10, 500]), torch.randn(2, 77, text_model.unet.config.cross_attention_dim)
    with torch.no_grad():
        plain = text_model(noisy, t, concat, text)
        with_env = text_model(noisy, t, concat, text, torch.rand(2, 3, 16, 32))
        env_out = env_model(noisy, t, concat, text, torch.rand(2, 3, 16, 32))
    assert torch.equal(plain, with_env) and plain.shape == (2, 4, 8, 8)
    assert not torch.allclose(plain, env_out)  # the env tokens change what the env model attends to
    with pytest.raises(ValueError, match="pass `env`"):
        env_model(noisy, t, concat, text)


def test_losses_without_env_and_without_the_consistency_rows():
    torch.manual_seed(0)
    model = build_iclight_model(ModelConfig(size="tiny", light_input="text"))
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: (calls.append(a[0].shape[0]), forward(*a, **k))[1]
    batch = ConditionedBatch(latents=torch.randn(2, 4, 8, 8), foreground=torch.randn(2, 4, 8, 8),
                             text=torch.randn(2, 77, model.unet.config.cross_attention_dim),
                             mask=torch.ones(2, 1, 8, 8))
    terms = iclight_losses(model, batch, torch.randn(2, 4, 8, 8), torch.tensor([3, 900]),
                           alphas_cumprod=torch.linspace(0.99, 0.01, 1000), lambda_consistency=0.0)
    assert calls == [2]  # one row per sample
    assert float(terms["loss_consistency"]) == 0.0 and torch.equal(terms["loss"], terms["loss_vanilla"])


def test_conditioning_under_text_draws_no_env():
    from iclight_ds.model.frozen import build_frozen
    from iclight_ds.model.tokenizer import build_char_tokenizer
    from iclight_ds.train.conditioning import condition_batch

    tok = build_char_tokenizer()
    vae, text_encoder = build_frozen("tiny", seed=0, tokenizer=tok, dtype=torch.float32, device=torch.device("cpu"))
    batch = {"target": torch.rand(2, 3, 32, 32) * 2 - 1, "foreground": torch.zeros(2, 3, 32, 32),
             "mask": torch.ones(2, 1, 32, 32), "env": torch.rand(2, 3, 16, 32),
             "input_ids": tok(["a", "b"], padding="max_length", max_length=tok.model_max_length,
                              return_tensors="pt").input_ids}
    how = dict(vae=vae, text_encoder=text_encoder, variant="fc", split_cells=4, with_split=True,
               device=torch.device("cpu"))
    text = condition_batch(batch, light_input="text", generator=torch.Generator().manual_seed(0), **how)
    env = condition_batch(batch, light_input="env", generator=torch.Generator().manual_seed(0), **how)
    assert text.env is None and env.env is not None and torch.equal(env.env[1] + env.env[2], env.env[0])
    assert torch.equal(text.latents, env.latents)


def test_cache_expectations_follow_the_light_input():
    from iclight_ds.data.cache import run_expectations

    text = run_expectations(load_config(None, {"model.light_input": "text"}), torch.bfloat16)
    env = run_expectations(load_config(None), torch.bfloat16)
    assert text["light_input"] == "text" and "env_shape" not in text
    assert env["env_shape"] == [16, 32] and "light_input" not in env
