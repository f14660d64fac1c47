"""How fast `iclight-prepare` turns photos into samples without a matting model, against decoding the same images.

    python bench/prepare_speed.py [--photos 48] [--size 768 512] [--resolution 512] [--out bench/results/...json]

Writes `--photos` synthetic JPEG photos (a shaded ball on a gradient, quality 92) with same-stem PNG masks, then
times, on one process (one core):
  decode     open + fully decode + convert every photo and its mask, as prepare does first;
  prepare    the whole command in-process (--workers 1) with --variants 1 and 2: decode, resize, albedo estimate,
             degradations, PNG writes, manifest.
Prints a table and writes JSON with photos/s and the ratio prepare / decode (how many times decoding's cost).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.provenance import cpu_name, provenance, write_result  # noqa: E402
from iclight_ds.data import prepare as prep  # noqa: E402
from iclight_ds.data.imageio import open_decoded, to_rgba  # noqa: E402


def make_photos(folder: Path, masks: Path, n: int, size: tuple[int, int]) -> None:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    for i in range(n):
        cx, cy, r = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2, rng.uniform(0.25, 0.4) * h
        d = np.hypot(xx - cx, yy - cy)
        mask = d < r
        shade = np.clip(0.2 + 0.8 * np.sqrt(np.clip(1 - (d / r) ** 2, 0, 1)) - 0.3 * (xx - cx) / r, 0, 1)
        noise = rng.normal(0, 0.03, (h, w, 1))
        bg = np.stack([xx / w, yy / h, np.full(xx.shape, 0.5)], -1)
        img = np.where(mask[..., None], shade[..., None] * rng.uniform(0.3, 1, 3), bg) + noise
        Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"p{i:03d}.jpg",
                                                                                   quality=92)
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"p{i:03d}.png")


def time_decode(folder: Path, masks: Path) -> float:
    start = time.perf_counter()
    for photo in sorted(folder.glob("*.jpg")):
        to_rgba(open_decoded(photo))
        open_decoded(masks / (photo.stem + ".png")).convert("L")
    return time.perf_counter() - start


def time_prepare(folder: Path, masks: Path, out: Path, *, variants: int, resolution: int) -> float:
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    prep.prepare(prep.Settings(images=folder, out=out, masks=masks, variants=variants, resolution=resolution),
                 workers=1, progress=False)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--photos", type=int, default=48)
    p.add_argument("--size", type=int, nargs=2, default=(768, 512), metavar=("W", "H"))
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="best of N for each measurement")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prepare-speed-cpu.json")
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, masks = tmp / "photos", tmp / "masks"
        folder.mkdir()
        masks.mkdir()
        make_photos(folder, masks, args.photos, tuple(args.size))
        decode = min(time_decode(folder, masks) for _ in range(args.repeats))
        rows = {"decode": decode}
        for k in (1, 2):
            rows[f"prepare, {k} variant(s)"] = min(time_prepare(folder, masks, tmp / "out", variants=k,
                                                                resolution=args.resolution)
                                                   for _ in range(args.repeats))
    n = args.photos
    result = {
        "provenance": provenance("bench/prepare_speed.py", sys.argv[1:]),
        "device": f"{os.cpu_count()}-core CPU ({cpu_name()}), one process",
        "photos": n, "photo_size": list(args.size), "resolution": args.resolution, "repeats": args.repeats,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after (2 cores)
        "rows": {name: {"seconds": round(t, 3), "photos_per_s": round(n / t, 1), "ratio_to_decode": round(t / decode, 2)}
                 for name, t in rows.items()},
    }
    print(f"{'measurement':<26}{'photos/s':>10}{'x decode':>10}")
    for name, row in result["rows"].items():
        print(f"{name:<26}{row['photos_per_s']:>10.1f}{row['ratio_to_decode']:>10.2f}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
