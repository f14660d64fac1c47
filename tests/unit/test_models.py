"""Model surgery parity and the small IC-Light modules."""

import pytest
import torch

from iclight_ds.config import ModelConfig
from iclight_ds.model.arch import TINY_UNET, configure_attention, count_parameters, wants_checkpointing
from iclight_ds.model.iclight import EnvEncoder, LatentMerger, build_iclight_model, build_unet, widen_conv_in


@pytest.mark.parametrize("channels", [8, 12])
def test_widened_unet_equals_original_at_init(channels):
    torch.manual_seed(0)
    unet = build_unet("tiny", 4).eval()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    text = torch.randn(2, 77, 32)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=text).sample
    old_w, old_b = unet.conv_in.weight.clone(), unet.conv_in.bias.clone()
    widen_conv_in(unet, channels)
    assert unet.conv_in.weight.shape == (TINY_UNET["block_out_channels"][0], channels, 3, 3)
    assert unet.config.in_channels == channels
    assert torch.equal(unet.conv_in.weight[:, :4], old_w)
    assert torch.count_nonzero(unet.conv_in.weight[:, 4:]) == 0
    assert torch.equal(unet.conv_in.bias, old_b)
    extra = torch.randn(2, channels - 4, 8, 8) * 5  # whatever the new channels hold
    with torch.no_grad():
        after = unet(torch.cat([x, extra], 1), t, encoder_hidden_states=text).sample
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_widen_refuses_to_narrow():
    unet = build_unet("tiny", 8)
    with pytest.raises(ValueError, match="cannot narrow"):
        widen_conv_in(unet, 4)


def test_full_size_config_has_sd15_shapes():
    from iclight_ds.model.arch import SD15_UNET

    with torch.device("meta"):
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**SD15_UNET)
    n = sum(p.numel() for p in unet.parameters())
    assert abs(n - 859.52e6) < 0.1e6, n
    assert unet.up_blocks[1].resnets[1].conv1.weight.numel() == 29_491_200


def test_merger_starts_as_mean_and_is_per_pixel():
    merger = LatentMerger(hidden=16, layers=5)
    e1, e2 = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(merger(e1, e2), 0.5 * (e1 + e2))
    for p in merger.parameters():
        torch.nn.init.normal_(p, std=0.3)
    out = merger(e1, e2)
    e1b = e1.clone()
    e1b[:, :, 0, 0] += 1.0  # changing one pixel changes only that pixel's output
    diff = (merger(e1b, e2) - out).abs().sum(1)
    assert diff[:, 0, 0].min() > 0
    diff[:, 0, 0] = 0
    assert diff.max() == 0
    assert sum(isinstance(m, torch.nn.Conv2d) for m in merger.mlp) == 5


def test_merger_started_as_the_sum_and_an_unknown_prior_refused():
    e1, e2 = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(LatentMerger(hidden=16, layers=5, init="sum")(e1, e2), e1 + e2)
    with pytest.raises(ValueError, match="'product'"):
        LatentMerger(init="product")


def test_env_encoder_tokens_depend_on_light():
    enc = EnvEncoder(tokens=4, dim=32)
    env = torch.rand(2, 3, 16, 32) * 10
    tokens = enc(env)
    assert tokens.shape == (2, 4, 32)
    assert not torch.allclose(tokens, enc(env * 0.1))


@pytest.mark.parametrize("variant,channels", [("fc", 8), ("fbc", 12)])
def test_iclight_model_sees_conditions(variant, channels):
    torch.manual_seed(0)
    model = build_iclight_model(ModelConfig(size="tiny", variant=variant)).eval()
    assert model.unet.conv_in.in_channels == channels
    assert (model.env_encoder is not None) == (variant == "fc")
    for p in model.unet.conv_in.parameters():  # make the new channels matter
        torch.nn.init.normal_(p, std=0.1)
    noisy = torch.randn(2, 4, 8, 8)
    concat = torch.randn(2, channels - 4, 8, 8)
    text = torch.randn(2, 77, 32)
    env = torch.rand(2, 3, 16, 32)
    t = torch.tensor([1, 2])
    with torch.no_grad():
        out = model(noisy, t, concat, text, env)
        assert out.shape == (2, 4, 8, 8)
        assert not torch.allclose(out, model(noisy, t, concat * 0, text, env))
        if variant == "fc":
            assert not torch.allclose(out, model(noisy, t, concat, text, env * 5 + 1))
            with pytest.raises(ValueError, match="env"):
                model(noisy, t, concat, text, None)


def test_attention_falls_back_to_sdpa_on_cpu():
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = build_unet("tiny")
    assert configure_attention(unet, "auto", "cpu") == "sdpa"
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    with pytest.raises(RuntimeError, match="xformers"):
        configure_attention(unet, "xformers", "cpu")


def test_checkpointing_auto_by_size_and_parity():
    """auto: on for SD1.5's UNet, off for the tiny one; recomputation gives the same gradients as keeping activations."""
    from iclight_ds.train.plan import unet_parameters

    assert wants_checkpointing("auto", unet_parameters("full", 8)) is True
    assert wants_checkpointing("auto", unet_parameters("tiny", 8)) is False
    assert wants_checkpointing(True, 1) is True and wants_checkpointing(False, 10**9) is False
    torch.manual_seed(0)
    model = build_iclight_model(ModelConfig(size="tiny")).train()
    assert not wants_checkpointing("auto", count_parameters(model.unet))
    for p in model.unet.conv_in.parameters():
        torch.nn.init.normal_(p, std=0.1)
    args = (torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32),
            torch.rand(2, 3, 16, 32))

    def grads():
        model.zero_grad()
        model(*args).square().mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    kept = grads()
    model.unet.enable_gradient_checkpointing()
    recomputed = grads()
    assert kept.keys() == recomputed.keys() and len(kept) > 50
    assert all(torch.allclose(kept[k], recomputed[k], atol=1e-6) for k in kept)


@pytest.mark.gpu
def test_iclight_model_on_cuda_matches_cpu():
    """The same tiny FC model and inputs on the first CUDA GPU give the CPU's output (fp32; cuDNN may use TF32)."""
    torch.manual_seed(0)
    model = build_iclight_model(ModelConfig(size="tiny", variant="fc")).eval()
    for p in model.unet.conv_in.parameters():  # make the condition channels matter
        torch.nn.init.normal_(p, std=0.1)
    args = (torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32),
            torch.rand(2, 3, 16, 32))
    with torch.no_grad():
        on_cpu = model(*args)
        on_gpu = model.to("cuda")(*(a.to("cuda") for a in args))
    assert on_gpu.device.type == "cuda" and on_gpu.shape == on_cpu.shape
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-2, atol=1e-2)
