"""data.buckets: aspect-ratio buckets, the dataset sized per bucket, micro-batches of one bucket, resumable."""

import json

import pytest
from PIL import Image

from iclight_ds.config import ConfigError, load_config
from iclight_ds.data.buckets import BucketBatchSampler, make_buckets, nearest_bucket, upright_size


def test_buckets_keep_the_area_and_the_step():
    for res in (64, 256, 512):
        buckets = make_buckets(res)
        step = max(8, res // 8)
        assert (res, res) in buckets and len(buckets) >= 3
        assert all(w * h <= res * res and w % step == 0 and h % step == 0 and 0.5 <= w / h <= 2 for w, h in buckets)
        assert all((h, w) in buckets for w, h in buckets)
    assert make_buckets(512) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]


def test_nearest_bucket_by_aspect():
    buckets = make_buckets(512)
    assert nearest_bucket(1920, 1080, buckets) == (640, 384)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    assert nearest_bucket(600, 800, buckets) == (448, 576)


def test_upright_size_swaps_for_exif_rotations(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (40, 20)).save(tmp_path / "r.jpg", exif=exif)
    Image.new("RGB", (40, 20)).save(tmp_path / "p.jpg")
    assert upright_size(tmp_path / "r.jpg") == (20, 40) and upright_size(tmp_path / "p.jpg") == (40, 20)


def _sampler(bucket_of, rank, world=2, mb=2, seed=0):
    return BucketBatchSampler(bucket_of, mb, world_size=world, rank=rank, seed=seed)


def test_each_micro_batch_is_one_bucket_and_the_ranks_are_disjoint():
    bucket_of = [(64, 64)] * 9 + [(80, 48)] * 7 + [(48, 80)] * 3  # the last bucket holds less than a group of 4
    per_rank = [list(_sampler(bucket_of, r)) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3 == len(_sampler(bucket_of, 0))  # 9 // 4 + 7 // 4
    for a, b in zip(*per_rank):
        assert len(a) == len(b) == 2 and len({bucket_of[i] for i in a + b}) == 1 and not set(a) & set(b)
    s = _sampler(bucket_of, 0)
    s.set_epoch(1)
    assert list(s) != per_rank[0]  # another epoch, another order
    s.set_epoch(0)
    assert list(s) == per_rank[0]  # the same seed and epoch, the same order


def test_start_skips_exactly_the_micro_batches_seen():
    bucket_of = [(64, 64)] * 8 + [(80, 48)] * 8
    whole = list(_sampler(bucket_of, 1))
    s = _sampler(bucket_of, 1)
    s.start = 2 * 2  # two micro-batches of 2 samples, as the trainer counts
    assert list(s) == whole[2:]
    assert list(s) == whole  # start applies once


def _dataset(root, sizes):
    for name in ("target", "fg", "mask"):
        (root / name).mkdir()
    lines = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (200, 90, 40)).save(root / f"target/{i}.png")
        Image.new("RGB", (w, h), (90, 90, 90)).save(root / f"fg/{i}.png")
        mask = Image.new("L", (w, h), 0)
        mask.paste(255, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
        mask.save(root / f"mask/{i}.png")
        lines.append(json.dumps({"id": str(i), "prompt": "p", "target": f"target/{i}.png", "foreground": f"fg/{i}.png",
                                 "mask": f"mask/{i}.png"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def test_the_dataset_sizes_each_sample_to_its_bucket(tmp_path):
    from iclight_ds.data.dataset import RelightDataset
    from iclight_ds.model.tokenizer import build_char_tokenizer

    _dataset(tmp_path, [(160, 96), (96, 160), (100, 100)])
    ds = RelightDataset(tmp_path, 64, build_char_tokenizer(), buckets=True)
    assert ds.bucket_of == [(80, 48), (48, 80), (64, 64)]
    item = ds[0]
    assert item["target"].shape == (3, 48, 80) and item["mask"].shape == (1, 48, 80)
    assert float(item["mask"][0, 24, 10]) == 0.0 and float(item["mask"][0, 24, 40]) == 1.0  # nothing cropped away
    assert ds.square()[0]["target"].shape == (3, 64, 64) and ds[0]["target"].shape == (3, 48, 80)
    assert RelightDataset(tmp_path, 64, build_char_tokenizer())[0]["target"].shape == (3, 64, 64)


def test_buckets_with_a_cache_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.buckets with data.cache"):
        load_config(None, {"data.buckets": True, "data.cache": str(tmp_path)})
