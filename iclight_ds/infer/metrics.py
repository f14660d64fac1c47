"""Image metrics of a relight, on the foreground: PSNR, SSIM, albedo (chromaticity) drift, light additivity."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) PSNR in dB over the masked pixels (all pixels without a mask) of images in [0, 1] (peak 1)."""
    mask = torch.ones_like(pred[:, :1]) if mask is None else mask
    m = mask.expand_as(pred)
    mse = ((pred - target) ** 2 * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def masked_ssim(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) SSIM as Wang et al. 2004 define it and papers report it (11x11 Gaussian window, sigma 1.5, K1 0.01,
    K2 0.03, peak 1; torchmetrics' implementation, on each channel), averaged over the masked pixels."""
    _, ssim_map = structural_similarity_index_measure(
        pred.float(), target.float(), gaussian_kernel=True, kernel_size=11, sigma=1.5, data_range=1.0,
        reduction="none", return_full_image=True)
    m = mask.float().expand_as(ssim_map)
    return (ssim_map * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)


def chromaticity(linear: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(B, 3, H, W) linear rgb -> rgb / (r + g + b)."""
    return linear / linear.sum(1, keepdim=True).clamp_min(eps)


def chroma_drift(pred_linear: torch.Tensor, target_linear: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean L1 distance of the chromaticities over the masked pixels (0: same colours, up to 2)."""
    d = (chromaticity(pred_linear) - chromaticity(target_linear)).abs().sum(1, keepdim=True)  # (B, 1, H, W)
    return (d * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


def additivity_error(r_full: torch.Tensor, r_1: torch.Tensor, r_2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) || R(L1) + R(L2) - R(L) || / || R(L) || over the masked pixels, on linear images."""
    m = mask.expand_as(r_full)
    num = ((r_1 + r_2 - r_full) * m).flatten(1).norm(dim=1)
    return num / (r_full * m).flatten(1).norm(dim=1).clamp_min(1e-8)
