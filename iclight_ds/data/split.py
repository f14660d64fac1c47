"""The complementary split of the illumination (the consistency objective's L1 = L * m, L2 = L * (1 - m))."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .imageio import linear_to_srgb, srgb_to_linear


def split_grid(batch: int, cells: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 1, cells, 2*cells) bool: which cells of the light go to L1. A grid drawn all one way (L1 or L2 empty, a
    split that teaches nothing: 1 in 2 at one row of cells) gets one random cell flipped, so both parts are lit."""
    grid = torch.rand(batch, 1, cells, 2 * cells, generator=generator) < 0.5
    flat = grid.view(batch, -1)
    degenerate = (flat.all(1) | ~flat.any(1)).nonzero().flatten()
    if len(degenerate):  # rare at the default 4 rows (2^-31): the random stream is only drawn from then
        flip = torch.randint(flat.shape[1], (len(degenerate),), generator=generator)
        flat[degenerate, flip] = ~flat[degenerate, flip]
    return grid


def split_masks(batch: int, cells: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Random binary masks m (B, 1, H, W): each of cells x 2*cells regions belongs to L1 (m=1) or L2 (m=0), both
    non-empty.

    L1 = L * m and L2 = L * (1 - m) are complementary, so L1 + L2 = L exactly.
    """
    return F.interpolate(split_grid(batch, cells, generator).float(), size=size, mode="nearest")


def split_background(background: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a background image in [-1, 1] in LINEAR light: returns (bg under m, bg under 1 - m), both in [-1, 1]."""
    linear = srgb_to_linear((background + 1) / 2)
    return tuple(linear_to_srgb(linear * m) * 2 - 1 for m in (mask, 1 - mask))
