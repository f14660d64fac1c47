"""The figure of docs/data.md: photo | mask | four relight degradations, as `iclight-prepare` writes them.

    python bench/degradation_figure.py [--out docs/degradation.png]

Runs the prepare command on two inputs: matplotlib's sample clip-art of a gift box (an RGBA cut-out, public
domain, shipped in matplotlib's mpl-data/sample_data) and a rendered ball on a gradient with a mask file, 4 variants
each, seed 0, 192 px, and lays the written files out one row per input (foregrounds over grey 127, as training sees
them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iclight_ds.data import prepare as prep  # noqa: E402

CELL = 160


def _inputs(images: Path, masks: Path) -> None:
    from matplotlib import cbook

    box = Image.open(cbook.get_sample_data("Minduka_Present_Blue_Pack.png", asfileobj=False)).convert("RGBA")
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    canvas.alpha_composite(box.resize((128, 128), Image.LANCZOS), (16, 24))
    canvas.save(images / "gift.png")
    h = w = 160
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.hypot(xx - 80, yy - 84)
    mask = d < 56
    shade = np.clip(0.15 + 0.85 * np.sqrt(np.clip(1 - (d / 56) ** 2, 0, 1)) - 0.35 * (xx - 80) / 56, 0, 1)
    stripes = 0.75 + 0.25 * (np.sin(xx / 6.0) > 0)
    photo = np.where(mask[..., None], shade[..., None] * stripes[..., None] * np.array([0.9, 0.55, 0.2]),
                     np.stack([0.3 + 0.4 * yy / h, 0.35 + 0.2 * xx / w, np.full(xx.shape, 0.45)], -1))
    Image.fromarray(np.round(photo * 255).astype(np.uint8)).save(images / "ball.jpg", quality=95)
    Image.fromarray(mask.astype(np.uint8) * 255).save(masks / "ball.png")


def _over_grey(path: Path, mask: np.ndarray) -> Image.Image:
    rgb = np.asarray(Image.open(path).convert("RGB"), np.float32)
    return Image.fromarray(np.round(127 + (rgb - 127) * mask[..., None]).astype(np.uint8))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "degradation.png")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images, masks, out = tmp / "photos", tmp / "masks", tmp / "set"
        images.mkdir()
        masks.mkdir()
        _inputs(images, masks)
        prep.prepare(prep.Settings(images=images, out=out, masks=masks, variants=4, resolution=CELL,
                                   image_format="png"), workers=1, progress=False)
        lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        rows = []
        for source in ("gift.png", "ball.jpg"):
            mine = [x for x in lines if x["source"] == source]
            mask = np.asarray(Image.open(out / mine[0]["mask"]), np.float32) / 255.0
            cells = [_over_grey(out / mine[0]["target"], np.ones_like(mask)), Image.open(out / mine[0]["mask"])]
            cells += [_over_grey(out / x["foreground"], mask) for x in mine]
            rows.append([c.convert("RGB").resize((CELL, CELL)) for c in cells])
    grid = Image.new("RGB", (CELL * len(rows[0]), CELL * len(rows)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            grid.paste(cell, (c * CELL, r * CELL))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
