"""Aspect-ratio buckets (data.buckets, kohya-style): photos of any aspect train without cropping the object away.

The buckets for a resolution R are the sizes (W, H), both multiples of R / 8 (64 px at 512, kohya's step; 8 latent
pixels), with W * H <= R * R, the largest such H for each W, and an aspect within MAX_RATIO either way; (R, R) is
always one. A sample goes to the bucket whose
aspect is nearest its own (in log ratio), is resized to cover it and centre-cropped (a few pixels at most, not the
sides of a wide photo), and every micro-batch is drawn from one bucket. No bucket has more pixels than R x R, so the
memory planner's estimate at data.resolution holds for all of them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

MAX_RATIO = 2.0
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def make_buckets(resolution: int, max_ratio: float = MAX_RATIO) -> list[tuple[int, int]]:
    """[(W, H), ...] sorted by aspect W / H; (resolution, resolution) among them."""
    step = max(8, resolution // 8)
    area = resolution * resolution
    found = {(resolution, resolution)}
    for w in range(step, int(resolution * math.sqrt(max_ratio)) + step, step):
        h = (area // w) // step * step
        if h >= step and 1 / max_ratio <= w / h <= max_ratio:
            found.add((w, h))
            found.add((h, w))
    return sorted(found, key=lambda b: b[0] / b[1])


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect is nearest width / height (ties: the larger one)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def upright_size(path: Path) -> tuple[int, int]:
    """(W, H) of an image as shown, from its header (EXIF orientations 5-8 swap the sides)."""
    with Image.open(path) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in _TRANSPOSED else (w, h)


class BucketBatchSampler:
    """Micro-batches of one bucket each, for one rank; resumable mid-epoch like train.loader.ResumableSampler.

    Per epoch (seed + epoch): the indices of each bucket are shuffled and cut into groups of micro_batch x
    world_size (a bucket's remainder is dropped for that epoch), the groups are shuffled, and rank r takes slice r
    of each group, so the ranks see disjoint samples of the same bucket at each step. `start` (in samples, a multiple
    of micro_batch) skips this rank's first micro-batches of the epoch, once.
    """

    def __init__(self, bucket_of: list[tuple[int, int]], micro_batch: int, *, world_size: int, rank: int, seed: int):
        self.bucket_of, self.micro_batch = bucket_of, micro_batch
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _groups(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in torch.randperm(len(self.bucket_of), generator=g).tolist():
            by_bucket.setdefault(self.bucket_of[i], []).append(i)
        size = self.micro_batch * self.world_size
        groups = [idx[a:a + size] for _, idx in sorted(by_bucket.items()) for a in range(0, len(idx) - size + 1, size)]
        return [groups[j] for j in torch.randperm(len(groups), generator=g).tolist()]

    def __iter__(self):
        skip, self.start = self.start // self.micro_batch, 0
        mb, r = self.micro_batch, self.rank
        for group in self._groups()[skip:]:
            yield group[r * mb:(r + 1) * mb]

    def __len__(self) -> int:
        return len(self._groups())
