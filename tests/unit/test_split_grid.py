"""The light split's cell grid: never all one way, so L1 and L2 are both lit."""

import torch

from iclight_ds.data.cache import split_grids
from iclight_ds.data.split import split_grid, split_masks


def test_one_row_of_cells_never_leaves_a_part_empty():
    """At one row (two cells) half the plain draws would put the whole light in L1 or in L2."""
    grid = split_grid(4096, 1, torch.Generator().manual_seed(0)).flatten(1)
    assert grid.any(1).all() and (~grid).any(1).all()
    assert grid.float().mean().item() == 0.5  # two cells, one each way: exactly half


def test_masks_are_binary_complementary_and_both_non_empty():
    m = split_masks(512, 1, (8, 8), torch.Generator().manual_seed(1))
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert (m.flatten(1).sum(1) > 0).all() and ((1 - m).flatten(1).sum(1) > 0).all()


def test_the_cache_draws_the_same_grids():
    a = split_grids(64, 1, torch.Generator().manual_seed(2))
    b = split_grid(64, 1, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_a_healthy_grid_keeps_the_plain_draw():
    """At the default 4 rows no grid of this seed is degenerate: the masks are the plain draw, so the random stream
    (and every run's numbers) are those of a plain `rand < 0.5`."""
    plain = torch.rand(256, 1, 4, 8, generator=torch.Generator().manual_seed(3)) < 0.5
    assert torch.equal(split_grid(256, 4, torch.Generator().manual_seed(3)), plain)
