"""The IC-Light objectives as pure functions: (model, batch, noise, timesteps) -> dict of named loss terms.

The caller samples noise and timesteps, calls backward once on `terms["loss"]`, and steps.
Losses are computed in fp32 whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class ConditionedBatch:
    """One micro-batch after the frozen encoders (see conditioning.py). h, w = latent size; B = batch."""

    latents: torch.Tensor  # (B, 4, h, w) VAE latent of the relit target I_L, scaled
    foreground: torch.Tensor  # (B, 4, h, w) latent of the degraded foreground I_d over grey
    text: torch.Tensor  # (B, 77, D) text-encoder hidden states
    mask: torch.Tensor  # (B, 1, h, w) foreground mask at latent size, in [0, 1]
    background: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # FBC: latents of bg under L, L1, L2
    env: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # FC: env maps L, L1, L2, each (B, 3, He, We)

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor):
    """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps (DDPM forward process)."""
    abar = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return abar.sqrt() * latents.float() + (1 - abar).sqrt() * noise.float()


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) Min-SNR-gamma loss weights for noise prediction (Hang et al. 2023): min(SNR_t, gamma) / SNR_t.

    SNR_t = abar_t / (1 - abar_t). Steps with SNR above gamma (the nearly clean, low-t ones) count less, so the
    noisy steps, where a model must know the whole relit image, get a larger share of the gradient.
    """
    snr = signal_to_noise(timesteps, alphas_cumprod)
    return snr.clamp(max=gamma) / snr


def signal_to_noise(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """(B,) SNR_t = abar_t / (1 - abar_t) of each sample's timestep."""
    abar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return abar / (1 - abar)


def vanilla_loss(eps_pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_vanilla = || eps - eps_theta(z_t, t, E(I_d), L, text) ||^2, mean over all elements.

    weights: optional (B,) per-sample weights (e.g. `min_snr_weights`); the mean of the weighted per-sample means.
    """
    sq = (noise.float() - eps_pred.float()) ** 2
    if weights is None:
        return torch.mean(sq)
    return torch.mean(sq.mean(dim=(1, 2, 3)) * weights)


def consistency_loss(merged: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """L_consistency = || M * (eps - phi(eps_1, eps_2)) ||^2, averaged over the foreground (latent-size M).

    merged, noise: (B, 4, h, w); mask: (B, 1, h, w). Background pixels do not contribute at all.
    weights: optional (B,) per-sample weights, applied to each sample's squared errors.
    """
    sq = mask.float() * (noise.float() - merged.float()) ** 2  # (B, 4, h, w)
    if weights is not None:
        sq = sq * weights.view(-1, 1, 1, 1)
    denom = (mask.float().sum() * noise.shape[1]).clamp_min(1.0)
    return sq.sum() / denom


def x0_estimate(noisy: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor,
                alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): the clean latent a noise prediction implies, (B, 4, h, w)."""
    abar = alphas_cumprod.to(noisy.device)[timesteps].float().view(-1, 1, 1, 1)
    return (noisy.float() - (1 - abar).sqrt() * eps.float()) / abar.sqrt()


def x0_consistency_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) weights of the x0-space consistency loss: SNR_t, which makes an x0 error cost what the same error in
    noise space costs (||x0 - x0'||^2 SNR_t = ||eps - eps'||^2 for a linear merge), capped at gamma with Min-SNR
    (the x0-space form of `min_snr_weights`)."""
    snr = signal_to_noise(timesteps, alphas_cumprod)
    return snr.clamp(max=gamma) if gamma > 0 else snr


def high_noise_only(weights: torch.Tensor | None, timesteps: torch.Tensor, min_timestep: int) -> torch.Tensor | None:
    """(B,) consistency weights (None: all 1) with the samples at t < min_timestep zeroed; min_timestep 0 returns
    them unchanged. At low noise z_t, noised from the target under L, pins the clean estimates under L1 and L2 to that
    one image, so there the term rewards a merge that averages and light-blind predictions. The zeroed samples still
    count in the term's denominator."""
    if min_timestep <= 0:
        return weights
    keep = (timesteps >= min_timestep).float()
    return keep if weights is None else weights * keep.to(weights.device)


def consistency_weights(form: str, weighting: str, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                        gamma: float, min_timestep: int = 0) -> torch.Tensor | None:
    """(B,) per-sample weights of the consistency term (None: all 1), zeroed below min_timestep (`high_noise_only`).
    weighting "snr": the form's Min-SNR weights (paper: `min_snr_weights`, None when gamma is 0; x0 and linear:
    `x0_consistency_weights`); "noise": 1 - abar_t for every form, small where z_t pins the clean image and near 1
    where the noise leaves the light open."""
    if weighting == "noise":
        weights = 1 - alphas_cumprod.to(timesteps.device)[timesteps].float()
    elif weighting != "snr":
        raise ValueError(f"consistency weighting {weighting!r}: expected 'snr' or 'noise'")
    elif form in ("x0", "linear"):
        weights = x0_consistency_weights(timesteps, alphas_cumprod, gamma)
    else:
        weights = min_snr_weights(timesteps, alphas_cumprod, gamma) if gamma > 0 else None
    return high_noise_only(weights, timesteps, min_timestep)


def linear_consistency_loss(x0_1: torch.Tensor, x0_2: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                            to_linear: Callable[[torch.Tensor], torch.Tensor],
                            weights: torch.Tensor | None = None, samples: int = 0) -> torch.Tensor:
    """The light-transport equation where it holds, in linear light: || M * (R(x0_1) + R(x0_2) - R(z_0)) ||^2 with
    R = `to_linear` (latents -> linear-light images through the frozen VAE decoder: the caller's), averaged over the
    foreground. The target's image carries no gradient; the mask is the latent-size one, upsampled (nearest).
    samples > 0: only the first `samples` of the batch are decoded (a decode with gradients costs more than the
    UNet rows of small models)."""
    if 0 < samples < target.shape[0]:
        x0_1, x0_2, target, mask = x0_1[:samples], x0_2[:samples], target[:samples], mask[:samples]
        weights = weights[:samples] if weights is not None else None
    lin_1, lin_2 = to_linear(torch.cat([x0_1, x0_2], dim=0)).float().chunk(2, dim=0)
    with torch.no_grad():
        lin = to_linear(target).float()
    pixel_mask = F.interpolate(mask.float(), size=lin.shape[-2:], mode="nearest")
    return consistency_loss(lin_1 + lin_2, lin, pixel_mask, weights)


def _concat_conditions(batch: ConditionedBatch, part: int) -> torch.Tensor:
    """Channel-concatenated conditions for illumination `part` (0: L, 1: L1, 2: L2): (B, 4 or 8, h, w)."""
    if batch.background is None:
        return batch.foreground
    return torch.cat([batch.foreground, batch.background[part]], dim=1)


def iclight_losses(
    model,
    batch: ConditionedBatch,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    lambda_vanilla: float = 1.0,
    lambda_consistency: float = 0.1,
    snr_gamma: float = 0.0,
    consistency: str = "paper",
    to_linear: Callable[[torch.Tensor], torch.Tensor] | None = None,
    linear_samples: int = 0,
    consistency_min_timestep: int = 0,
    consistency_weighting: str = "snr",
) -> dict[str, torch.Tensor]:
    """Vanilla + light-transport consistency (paper Sec. 3), the three UNet evaluations as ONE batched forward.

    `model(noisy, t, concat, text, env)` predicts noise; `model.merge(a, b)` is the latent MLP phi.
    Returns {"loss", "loss_vanilla", "loss_consistency"}; only "loss" carries the graph the caller backprops.
    snr_gamma > 0 weights both terms per sample with Min-SNR-gamma (`min_snr_weights`); 0 leaves them unweighted.
    consistency: "paper" merges the two noise predictions, phi(eps_1, eps_2) against eps; "x0" merges the clean
    latents they imply (`x0_estimate`), phi(x0_1, x0_2) against the target latent, weighted by
    `x0_consistency_weights`: an additive image is an additive x0, which a merge of noise predictions that sees
    neither z_t nor t cannot express (docs/method.md); "linear" decodes those clean latents with `to_linear` (the
    frozen VAE decoder into linear light, where light adds: `linear_consistency_loss`) and compares the sum of the
    two parts' images with the target's, phi unused, for the first `linear_samples` of the batch (0: all).
    consistency_weighting and consistency_min_timestep: the term's per-sample weights (`consistency_weights`).
    """
    weights = min_snr_weights(timesteps, alphas_cumprod, snr_gamma) if snr_gamma > 0 else None
    noisy = add_noise(batch.latents, noise, timesteps, alphas_cumprod)  # (B, 4, h, w)
    parts = 3 if lambda_consistency > 0 else 1
    # Rows [0:B] see L, [B:2B] see L1, [2B:3B] see L2; the noisy target and timestep are the same for all three.
    concat = torch.cat([_concat_conditions(batch, p) for p in range(parts)], dim=0)
    env = torch.cat(batch.env[:parts], dim=0) if batch.env is not None else None
    eps_all = model(
        noisy.repeat(parts, 1, 1, 1), timesteps.repeat(parts), concat, batch.text.repeat(parts, 1, 1), env
    ).float()  # (parts * B, 4, h, w)
    eps_full = eps_all[: batch.batch_size]
    terms = {"loss_vanilla": vanilla_loss(eps_full, noise, weights)}
    c_weights = (consistency_weights(consistency, consistency_weighting, timesteps, alphas_cumprod, snr_gamma,
                                     consistency_min_timestep) if parts == 3 else None)
    if parts == 3 and consistency in ("x0", "linear"):
        x0_1, x0_2 = (x0_estimate(noisy, eps, timesteps, alphas_cumprod)
                      for eps in eps_all[batch.batch_size :].chunk(2, dim=0))
        if consistency == "linear":
            if to_linear is None:
                raise ValueError("consistency='linear' needs to_linear (latents -> linear-light images)")
            terms["loss_consistency"] = linear_consistency_loss(x0_1, x0_2, batch.latents, batch.mask, to_linear,
                                                                c_weights, samples=linear_samples)
        else:
            terms["loss_consistency"] = consistency_loss(model.merge(x0_1, x0_2).float(), batch.latents, batch.mask,
                                                         c_weights)
    elif parts == 3:
        eps_1, eps_2 = eps_all[batch.batch_size :].chunk(2, dim=0)
        terms["loss_consistency"] = consistency_loss(model.merge(eps_1, eps_2).float(), noise, batch.mask, c_weights)
    else:
        terms["loss_consistency"] = torch.zeros((), device=noise.device)
    terms["loss"] = lambda_vanilla * terms["loss_vanilla"] + lambda_consistency * terms["loss_consistency"]
    return terms
