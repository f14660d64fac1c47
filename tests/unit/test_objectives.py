"""The objectives on known inputs, the batched forward, and the one-backward rule."""

import pytest
import torch

from iclight_ds.config import ModelConfig
from iclight_ds.data.imageio import linear_to_srgb, srgb_to_linear
from iclight_ds.data.split import split_background, split_masks
from iclight_ds.model.iclight import LatentMerger, build_iclight_model
from iclight_ds.model.schedule import alphas_cumprod
from iclight_ds.train.objectives import (
    ConditionedBatch,
    add_noise,
    consistency_loss,
    consistency_weights,
    iclight_losses,
    min_snr_weights,
    vanilla_loss,
)


def test_vanilla_loss_values():
    noise = torch.ones(2, 4, 3, 3)
    assert vanilla_loss(noise, noise) == 0
    assert vanilla_loss(noise * 3, noise).item() == pytest.approx(4.0)


def test_min_snr_weights_cap_the_clean_steps_only():
    ac = alphas_cumprod()
    t = torch.tensor([0, 100, 500, 999])
    w = min_snr_weights(t, ac, gamma=5.0)
    snr = ac[t] / (1 - ac[t])
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 0.01 and w[-1] == 1.0  # t=0 has SNR ~1e3; t=999 has SNR < 5: unweighted
    # weighted losses: per-sample weights scale each sample's mean squared error
    noise = torch.zeros(2, 4, 3, 3)
    pred = torch.stack([torch.full((4, 3, 3), 1.0), torch.full((4, 3, 3), 2.0)])  # per-sample MSE 1 and 4
    assert vanilla_loss(pred, noise, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 * 1 + 4 * 0.5) / 2)
    mask = torch.ones(2, 1, 3, 3)
    assert consistency_loss(pred, noise, mask, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 2) / 2)
    assert vanilla_loss(pred, noise, torch.ones(2)).item() == pytest.approx(vanilla_loss(pred, noise).item())


def test_consistency_zero_when_merged_equals_noise():
    noise = torch.randn(2, 4, 5, 5)
    mask = (torch.rand(2, 1, 5, 5) > 0.5).float()
    assert consistency_loss(noise.clone(), noise, mask) == 0


def test_consistency_ignores_masked_pixels():
    noise = torch.randn(2, 4, 5, 5)
    mask = torch.zeros(2, 1, 5, 5)
    mask[:, :, 1:3, 1:3] = 1
    merged = noise.clone()
    merged[:, :, 0, 0] += 100.0  # outside the mask: no contribution
    assert consistency_loss(merged, noise, mask) == 0
    merged[:, :, 1, 1] += 2.0  # inside: squared error 4 on 1 of 4 pixels, all 4 channels
    assert consistency_loss(merged, noise, mask).item() == pytest.approx(4.0 / 4)


def test_add_noise_matches_diffusers_scheduler():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x, n = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    t = torch.tensor([0, 400, 999])
    torch.testing.assert_close(add_noise(x, n, t, alphas_cumprod()), sched.add_noise(x, n, t))


def _batch(variant, b=2):
    g = torch.Generator().manual_seed(1)
    lat = lambda: torch.randn(b, 4, 8, 8, generator=g)  # noqa: E731
    env = torch.rand(b, 3, 16, 32, generator=g)
    m = split_masks(b, 2, (16, 32), g)
    return ConditionedBatch(
        latents=lat(),
        foreground=lat(),
        text=torch.randn(b, 77, 32, generator=g),
        mask=(torch.rand(b, 1, 8, 8, generator=g) > 0.3).float(),
        background=(lat(), lat(), lat()) if variant == "fbc" else None,
        env=(env, env * m, env * (1 - m)) if variant == "fc" else None,
    )


class CountingModel(torch.nn.Module):
    """Wraps an ICLightModel and records the batch size of every forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, noisy, t, concat, text, env=None):
        self.calls.append(noisy.shape[0])
        return self.inner(noisy, t, concat, text, env)

    def merge(self, a, b):
        return self.inner.merge(a, b)


@pytest.mark.parametrize("variant", ["fc", "fbc"])
def test_three_evaluations_are_one_batched_forward(variant):
    torch.manual_seed(0)
    model = CountingModel(build_iclight_model(ModelConfig(size="tiny", variant=variant)))
    torch.nn.init.normal_(model.inner.unet.conv_in.weight, std=0.05)  # as after training: conditions matter
    batch = _batch(variant)
    noise = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    terms = iclight_losses(model, batch, noise, t, alphas_cumprod=alphas_cumprod())
    assert model.calls == [6]  # 3 x B in ONE forward
    assert set(terms) == {"loss", "loss_vanilla", "loss_consistency"}
    assert terms["loss_consistency"] > 0
    expected = 1.0 * terms["loss_vanilla"] + 0.1 * terms["loss_consistency"]
    torch.testing.assert_close(terms["loss"], expected)

    # The batched rows equal separate forwards under L, L1 and L2.
    noisy = add_noise(batch.latents, noise, t, alphas_cumprod())
    singles = []
    with torch.no_grad():
        for part in range(3):
            concat = batch.foreground if variant == "fc" else torch.cat([batch.foreground, batch.background[part]], 1)
            env = batch.env[part] if variant == "fc" else None
            singles.append(model.inner(noisy, t, concat, batch.text, env).float())
        separate_cons = consistency_loss(model.merge(singles[1], singles[2]), noise, batch.mask)
    torch.testing.assert_close(vanilla_loss(singles[0], noise), terms["loss_vanilla"].detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(separate_cons, terms["loss_consistency"].detach(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(singles[1], singles[2])  # the two light parts really differ

    # Vanilla only: one forward of B.
    model.calls.clear()
    terms0 = iclight_losses(model, batch, noise, t, alphas_cumprod=alphas_cumprod(), lambda_consistency=0.0)
    assert model.calls == [2] and terms0["loss_consistency"] == 0


def test_one_backward_per_combined_step():
    """Both terms hang off one graph: one backward fills every gradient, a second backward raises."""
    torch.manual_seed(0)
    model = build_iclight_model(ModelConfig(size="tiny", variant="fc"))
    terms = iclight_losses(model, _batch("fc"), torch.randn(2, 4, 8, 8), torch.tensor([5, 900]),
                           alphas_cumprod=alphas_cumprod())
    terms["loss"].backward()
    assert model.merger.mlp[-1].weight.grad.abs().sum() > 0  # consistency reached phi
    assert model.env_encoder.head.weight.grad.abs().sum() > 0  # the light condition is seen
    assert model.unet.conv_in.weight.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        terms["loss_consistency"].backward()


def test_split_is_complementary_and_linear():
    g = torch.Generator().manual_seed(0)
    m = split_masks(3, 4, (16, 32), g)  # (3, 1, 16, 32)
    assert m.shape == (3, 1, 16, 32) and set(m.unique().tolist()) == {0.0, 1.0}  # binary
    for sample in m:  # both parts of every sample hold light: neither L1 nor L2 is empty
        assert 0 < sample.mean() < 1
    other = split_masks(3, 4, (16, 32), g)
    assert not torch.equal(m, other)  # drawn, not fixed
    on, off = m == 1, 1 - m == 1  # the two parts' pixels: L1 = L * m lights `on`, L2 = L * (1 - m) lights `off`
    assert not (on & off).any() and (on | off).all()  # disjoint, and together they cover L
    bg = torch.rand(2, 3, 16, 16) * 2 - 1
    mb = split_masks(2, 2, (16, 16), g)
    b1, b2 = split_background(bg, mb)
    lin = lambda x: srgb_to_linear((x + 1) / 2)  # noqa: E731
    torch.testing.assert_close(lin(b1) + lin(b2), lin(bg), rtol=1e-4, atol=1e-5)
    x = torch.linspace(0, 1, 101)
    torch.testing.assert_close(srgb_to_linear(linear_to_srgb(x)), x, rtol=1e-5, atol=1e-6)


class AdditiveModel(torch.nn.Module):
    """Predicts the noise that implies x0 = share * z0 under each light part (rows [0:B] L, [B:2B] L1, [2B:3B] L2),
    with shares 1, 0.3 and 0.7: a model whose clean images under L1 and L2 add up to the one under L."""

    def __init__(self, z0, alphas):
        super().__init__()
        self.z0, self.alphas = z0, alphas

    def forward(self, noisy, t, concat, text, env=None):
        b = self.z0.shape[0]
        share = torch.tensor([1.0, 0.3, 0.7]).repeat_interleave(b).view(-1, 1, 1, 1)
        abar = self.alphas[t].view(-1, 1, 1, 1)
        return (noisy - abar.sqrt() * share * self.z0.repeat(3, 1, 1, 1)) / (1 - abar).sqrt()

    def merge(self, a, b):
        return a + b


def test_x0_estimate_inverts_the_forward_process_and_its_weights_follow_the_snr():
    from iclight_ds.train.objectives import x0_consistency_weights, x0_estimate

    ac = alphas_cumprod()
    z0, eps, t = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.tensor([0, 500, 999])
    torch.testing.assert_close(x0_estimate(add_noise(z0, eps, t, ac), eps, t, ac), z0, rtol=1e-4, atol=1e-3)
    snr = ac[t] / (1 - ac[t])
    torch.testing.assert_close(x0_consistency_weights(t, ac, 0.0), snr)
    torch.testing.assert_close(x0_consistency_weights(t, ac, 5.0), snr.clamp(max=5.0))


def test_the_x0_consistency_can_express_additive_light_and_the_paper_s_cannot():
    """A model whose x0 under L1 and L2 sum to its x0 under L, merged by a sum: zero x0-consistency loss, while the
    same model and merge on noise predictions (the paper's) is far from zero; the vanilla term is the same."""
    ac = alphas_cumprod()
    batch = _batch("fc")
    model = AdditiveModel(batch.latents, ac)
    noise, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([300, 800])
    x0 = iclight_losses(model, batch, noise, t, alphas_cumprod=ac, consistency="x0")
    paper = iclight_losses(model, batch, noise, t, alphas_cumprod=ac, consistency="paper")
    assert x0["loss_consistency"].item() < 1e-6 and paper["loss_consistency"].item() > 0.1
    torch.testing.assert_close(x0["loss_vanilla"], paper["loss_vanilla"])
    assert x0["loss_vanilla"].item() < 1e-6  # its prediction under L is the true noise


class SharesModel(AdditiveModel):
    """AdditiveModel with the shares of its light parts given and the project's own phi (LatentMerger) as merge."""

    def __init__(self, z0, alphas, shares, merger_init):
        super().__init__(z0, alphas)
        self.shares, self.merger = shares, LatentMerger(hidden=8, layers=2, init=merger_init)

    def forward(self, noisy, t, concat, text, env=None):
        b = self.z0.shape[0]
        share = torch.tensor(self.shares).repeat_interleave(b).view(-1, 1, 1, 1)
        abar = self.alphas[t].view(-1, 1, 1, 1)
        return (noisy - abar.sqrt() * share * self.z0.repeat(3, 1, 1, 1)) / (1 - abar).sqrt()

    def merge(self, a, b):
        return self.merger(a, b)


def test_phi_started_as_the_sum_makes_the_x0_term_reward_additive_light_not_light_blindness():
    """x0 form: with phi started as the mean (model.merger_init mean) a light-blind model (the same x0 under L, L1
    and L2) scores zero and an additive one does not; started as the sum, the other way round."""
    ac = alphas_cumprod()
    batch = _batch("fc")
    noise, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([300, 800])

    def loss(shares, init):
        model = SharesModel(batch.latents, ac, shares, init)
        return iclight_losses(model, batch, noise, t, alphas_cumprod=ac, consistency="x0")["loss_consistency"].item()

    blind, additive = (1.0, 1.0, 1.0), (1.0, 0.3, 0.7)
    assert loss(blind, "mean") < 1e-6 and loss(additive, "mean") > 0.1
    assert loss(additive, "sum") < 1e-6 and loss(blind, "sum") > 0.1


def _radiance(z: torch.Tensor) -> torch.Tensor:
    """A toy decoder into linear light whose latents are the square root of radiance: additive light is additive
    in its images, not in its latents (as sRGB-encoded VAE latents are not)."""
    return torch.nn.functional.interpolate(z[:, :3] ** 2, scale_factor=2, mode="nearest")


def test_the_linear_consistency_rewards_light_that_adds_in_linear_light_not_in_latents():
    """linear form: a model whose parts' images add up in linear light scores zero; one additive in the latents
    instead (x0 shares 0.3 and 0.7), and a light-blind one, do not; the x0 form with a sum merge says the opposite of
    the first two."""
    ac = alphas_cumprod()
    batch = _batch("fc")
    noise, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([300, 800])

    def loss(shares, form):
        model = SharesModel(batch.latents, ac, shares, "sum")
        return iclight_losses(model, batch, noise, t, alphas_cumprod=ac, consistency=form,
                              to_linear=_radiance)["loss_consistency"].item()

    in_light, in_latents, blind = (1.0, 0.3 ** 0.5, 0.7 ** 0.5), (1.0, 0.3, 0.7), (1.0, 1.0, 1.0)
    assert loss(in_light, "linear") < 1e-6
    assert loss(in_latents, "linear") > 0.01 and loss(blind, "linear") > 0.1
    assert loss(in_latents, "x0") < 1e-6 and loss(in_light, "x0") > 0.01


def test_the_linear_consistency_decodes_only_its_samples_and_needs_a_decoder():
    from iclight_ds.train.objectives import linear_consistency_loss

    g = torch.Generator().manual_seed(5)
    x1, x2, z0 = (torch.randn(4, 4, 8, 8, generator=g) for _ in range(3))
    mask, w = (torch.rand(4, 1, 8, 8, generator=g) > 0.4).float(), torch.rand(4, generator=g)
    decoded = []

    def decode(z):
        decoded.append(z.shape[0])
        return _radiance(z)

    first_two = linear_consistency_loss(x1, x2, z0, mask, decode, w, samples=2)
    assert decoded == [4, 2]  # the two parts of 2 samples with gradients, then their 2 targets
    torch.testing.assert_close(first_two, linear_consistency_loss(x1[:2], x2[:2], z0[:2], mask[:2], _radiance, w[:2]))
    assert not torch.allclose(first_two, linear_consistency_loss(x1, x2, z0, mask, _radiance, w))
    model = SharesModel(_batch("fc").latents, alphas_cumprod(), (1.0, 0.5, 0.5), "sum")
    with pytest.raises(ValueError, match="to_linear"):
        iclight_losses(model, _batch("fc"), torch.randn(2, 4, 8, 8), torch.tensor([1, 2]),
                       alphas_cumprod=alphas_cumprod(), consistency="linear")


@pytest.mark.parametrize("form", ["paper", "x0", "linear"])
def test_the_high_noise_only_term_drops_the_low_noise_samples_and_keeps_the_rest(form):
    """objective.consistency_min_timestep: each form's term at t = (300, 800) with the threshold at 500 equals the
    term with the first sample's weight zeroed by hand (its denominator unchanged), differs from the whole term, and
    is 0 when every sample is below it; the vanilla term does not change."""
    ac = alphas_cumprod()
    batch = _batch("fc")
    model = SharesModel(batch.latents, ac, (1.0, 0.3, 0.6), "sum")
    noise, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([300, 800])

    def terms(min_t, timesteps=t):
        return iclight_losses(model, batch, noise, timesteps, alphas_cumprod=ac, consistency=form, snr_gamma=5.0,
                              to_linear=_radiance, consistency_min_timestep=min_t)

    whole, high = terms(0), terms(500)
    assert high["loss_consistency"].item() > 0
    assert abs(high["loss_consistency"].item() - whole["loss_consistency"].item()) > 1e-4
    torch.testing.assert_close(high["loss_vanilla"], whole["loss_vanilla"])
    assert terms(500, torch.tensor([100, 499]))["loss_consistency"].item() == 0.0
    assert terms(500, torch.tensor([499, 500]))["loss_consistency"].item() > 0  # t = 500 counts
    # by hand: the second sample alone, over both samples' foreground
    second = ConditionedBatch(**{k: (tuple(p[1:] for p in v) if isinstance(v, tuple) else v[1:])
                                 for k, v in vars(batch).items() if v is not None})
    model.z0 = batch.latents[1:]
    one = iclight_losses(model, second, noise[1:], t[1:], alphas_cumprod=ac, consistency=form,
                         snr_gamma=5.0, to_linear=_radiance)["loss_consistency"]
    share = batch.mask[1:].sum() / batch.mask.sum()
    torch.testing.assert_close(high["loss_consistency"], one * share)


@pytest.mark.parametrize("form", ["paper", "x0", "linear"])
def test_the_noise_weighting_weighs_each_sample_by_its_noise(form):
    """objective.consistency_weighting noise: each sample's term weighs 1 - abar_t, so at t = (100, 900) the term is
    the two one-sample terms (unweighted) times those weights, over both samples' foreground; the threshold applies to
    it; the vanilla term does not change; the snr weighting of the x0 forms weighs the t = 100 sample more."""
    ac = alphas_cumprod()
    batch = _batch("fc")
    model = SharesModel(batch.latents, ac, (1.0, 0.3, 0.6), "sum")
    noise, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([100, 900])
    w = consistency_weights(form, "noise", t, ac, 5.0)
    torch.testing.assert_close(w, 1 - ac[t].float())
    assert w[0] < 0.15 and w[1] > 0.95
    if form != "paper":
        snr = consistency_weights(form, "snr", t, ac, 5.0)
        assert snr[0] > 1 > 0.1 > snr[1]  # min(SNR, 5): the low-noise sample weighs most
    assert consistency_weights(form, "noise", t, ac, 5.0, min_timestep=500)[0].item() == 0.0

    def terms(timesteps=t, weighting="noise", gamma=5.0, b=batch, n=noise, **kw):
        return iclight_losses(model, b, n, timesteps, alphas_cumprod=ac, consistency=form, snr_gamma=gamma,
                              to_linear=_radiance, consistency_weighting=weighting, **kw)

    noisy = terms()
    torch.testing.assert_close(noisy["loss_vanilla"], terms(weighting="snr")["loss_vanilla"])
    assert abs(noisy["loss_consistency"].item() - terms(weighting="snr")["loss_consistency"].item()) > 1e-4
    by_hand = 0.0
    for i in range(2):
        one = ConditionedBatch(**{k: (tuple(p[i:i + 1] for p in v) if isinstance(v, tuple) else v[i:i + 1])
                                  for k, v in vars(batch).items() if v is not None})
        model.z0 = batch.latents[i:i + 1]
        unweighted = terms(t[i:i + 1], weighting="snr", gamma=0.0, b=one, n=noise[i:i + 1])["loss_consistency"]
        if form != "paper":  # gamma 0 leaves the x0 forms weighted by SNR_t: divide it out
            unweighted = unweighted / (ac[t[i]] / (1 - ac[t[i]]))
        by_hand = by_hand + unweighted * w[i] * batch.mask[i].sum() / batch.mask.sum()
    model.z0 = batch.latents
    torch.testing.assert_close(noisy["loss_consistency"], by_hand, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="'flat'"):
        consistency_weights(form, "flat", t, ac, 5.0)
