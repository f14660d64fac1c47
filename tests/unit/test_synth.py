"""Synthetic generator: determinism, exact light transport additivity, masks, prompts, tone curve."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import file_bytes
from iclight_ds.data import synth
from iclight_ds.data.imageio import float_to_uint8, linear_to_srgb, srgb_to_linear

N, SIZE = 6, 32


@pytest.fixture(scope="module")
def synth_dir(synthetic) -> Path:
    return synthetic(N, size=SIZE, seed=7)


def records(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def test_same_seed_gives_identical_files(synth_dir, tmp_path):
    again = synth.generate(tmp_path / "again", N, size=SIZE, seed=7)
    a, b = file_bytes(synth_dir), file_bytes(again)
    assert len(a) == 2 + N * 10  # manifest, synth.json + 4 PNG + 6 npy per sample
    assert a == b


def test_different_seed_gives_different_scenes(synth_dir, tmp_path):
    other = synth.generate(tmp_path / "other", N, size=SIZE, seed=8)
    for rec in records(synth_dir):
        for key in ("target_linear", "env"):
            assert not np.array_equal(np.load(synth_dir / rec[key]), np.load(other / rec[key]))


def test_sample_depends_only_on_seed_and_index(synth_dir, tmp_path):
    prefix = synth.generate(tmp_path / "prefix", 2, size=SIZE, seed=7)
    for rec in records(prefix):
        assert (prefix / rec["target"]).read_bytes() == (synth_dir / rec["target"]).read_bytes()


def test_parallel_workers_write_the_same_files(synth_dir, tmp_path):
    parallel = synth.generate(tmp_path / "parallel", N, size=SIZE, seed=7, workers=2)
    assert file_bytes(parallel) == file_bytes(synth_dir)


def test_light_transport_is_additive(synth_dir):
    for rec in records(synth_dir):
        env = np.load(synth_dir / rec["env"])
        l1, l2 = (np.load(synth_dir / p) for p in rec["env_parts"])
        assert env.dtype == np.float32 and env.shape == (16, 32, 3) and (env > 0).all()  # ambient light everywhere
        # a binary mask: every pixel's light (all three channels) lies wholly in L1 or wholly in L2, never in both
        in_l1, in_l2 = (np.all(part == env, axis=-1) for part in (l1, l2))
        assert (in_l1 ^ in_l2).all() and (l1[~in_l1] == 0).all() and (l2[~in_l2] == 0).all()
        assert in_l1.any() and in_l2.any()  # neither part is empty
        whole = np.load(synth_dir / rec["target_linear"])
        p1, p2 = (np.load(synth_dir / p) for p in rec["target_parts_linear"])
        assert whole.shape == (SIZE, SIZE, 3) and whole.dtype == np.float32
        assert np.allclose(p1 + p2, whole, rtol=1e-5, atol=1e-6)
        assert not np.allclose(p1, whole)  # each part really is a part


def test_shading_is_linear_in_the_env_map():
    rng = np.random.default_rng(0)
    mask, normals, _ = synth._random_object(rng, 24)
    transport = synth.transport_matrix(normals[mask], (8, 16))  # (P, 128)
    albedo = rng.uniform(0.1, 0.9, (int(mask.sum()), 3))
    a, b = synth.random_env(rng, (8, 16)), synth.random_env(rng, (8, 16))
    mixed = synth.shade(albedo, transport, 0.3 * a + 2.0 * b)
    np.testing.assert_allclose(mixed, 0.3 * synth.shade(albedo, transport, a) + 2.0 * synth.shade(albedo, transport, b),
                               rtol=1e-12)
    lights = np.stack([a, b])  # (2, 8, 16, 3): batched, and chunked over pixels, gives the same
    np.testing.assert_allclose(synth.render_radiance(albedo, normals[mask], lights, chunk=7),
                               np.stack([synth.shade(albedo, transport, a), synth.shade(albedo, transport, b)]),
                               rtol=1e-12)
    # A uniform env of radiance 1 gives irradiance pi on any visible normal (cosine integral).
    flat = synth.shade(np.ones((1, 3)), synth.transport_matrix(np.array([[0.0, 0.0, 1.0]]), (64, 128)),
                       np.ones((64, 128, 3)))
    np.testing.assert_allclose(flat, np.pi, rtol=2e-3)


def test_masks_images_and_prompts(synth_dir):
    colours = "|".join(synth.PALETTE)
    prompt_re = re.compile(rf"^an? ({colours}) (striped|checkered|mottled) (sphere|rounded box|blob), "
                           rf"light from (the left|the right|above|below|the front|behind)$")
    for rec in records(synth_dir):
        assert prompt_re.match(rec["prompt"]), rec["prompt"]
        mask = np.asarray(Image.open(synth_dir / rec["mask"]))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert 0.15 <= (mask == 255).mean() <= 0.60
        target = np.asarray(Image.open(synth_dir / rec["target"]))
        expected = float_to_uint8(linear_to_srgb(np.load(synth_dir / rec["target_linear"])))
        np.testing.assert_array_equal(target, expected)  # PNG = tone-mapped linear frame
        fg = np.asarray(Image.open(synth_dir / rec["foreground"]))
        assert (fg[mask == 0] == 0).all() and fg[mask == 255].mean() > 5  # object only, and lit
        # Outside the object the target shows the background view of the same env map.
        bg = np.asarray(Image.open(synth_dir / rec["background"]))
        np.testing.assert_array_equal(target[mask == 0], bg[mask == 0])


def test_light_phrase_follows_the_brightest_direction():
    dirs, _ = synth.env_directions((16, 32))
    for direction, phrase in (((-1, 0, 0), "the left"), ((0, 1, 0), "above"), ((0, 0, 1), "the front"),
                              ((0.2, -1, 0.1), "below")):
        d = np.array(direction, float) / np.linalg.norm(direction)
        env = 0.05 + np.exp(-20 * (1 - dirs @ d))[:, None] * np.ones(3)
        assert synth.light_phrase(env.reshape(16, 32, 3)) == phrase


def test_srgb_helpers_numpy_and_torch():
    x = np.linspace(0, 1, 101)
    np.testing.assert_allclose(srgb_to_linear(linear_to_srgb(x)), x, atol=1e-12)
    np.testing.assert_allclose(linear_to_srgb(np.array([0.0, 0.0031308, 0.5, 1.0, 4.0])),
                               [0.0, 0.04045, 0.735357, 1.0, 1.0], atol=1e-5)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.is_tensor(linear_to_srgb(t)) and torch.is_tensor(srgb_to_linear(t))
    np.testing.assert_allclose(linear_to_srgb(t).numpy(), linear_to_srgb(x), atol=1e-12)
    np.testing.assert_allclose(srgb_to_linear(t).numpy(), srgb_to_linear(x), atol=1e-12)
    np.testing.assert_allclose(linear_to_srgb(x, exposure=2.0), linear_to_srgb(2 * x), atol=1e-12)


def test_cli_writes_a_dataset(tmp_path, capsys):
    synth.main(["--out", str(tmp_path / "cli"), "--n", "3", "--size", "24", "--seed", "1"])
    recs = records(tmp_path / "cli")
    assert [r["id"] for r in recs] == ["000000", "000001", "000002"]
    assert Image.open(tmp_path / "cli" / recs[0]["target"]).size == (24, 24)
    assert "wrote 3 samples" in capsys.readouterr().out
    synth.main(["--out", str(tmp_path / "lean"), "--n", "1", "--size", "24", "--no-extras"])
    (lean,) = records(tmp_path / "lean")
    assert set(lean) == {"id", "prompt", "target", "foreground", "mask", "background", "env"}
    assert not (tmp_path / "lean" / "linear").exists() and len(list((tmp_path / "lean" / "env").iterdir())) == 1


def test_parallel_workers_get_one_blas_thread_each(tmp_path, monkeypatch):
    """Workers start with one BLAS thread (12 workers x 16 threads ran no faster than one process); the parent's
    environment is left as it was."""
    seen = []
    real = synth.multiprocessing.get_context

    class Recording:
        def __init__(self, method):
            self.ctx = real(method)

        def Pool(self, workers):
            seen.append({k: os.environ.get(k) for k in synth.BLAS_THREADS})
            return self.ctx.Pool(workers)

    monkeypatch.setattr(synth.multiprocessing, "get_context", Recording)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    synth.generate(tmp_path / "p", 4, workers=2)
    assert seen == [{k: "1" for k in synth.BLAS_THREADS}]
    assert os.environ["OMP_NUM_THREADS"] == "7" and "OPENBLAS_NUM_THREADS" not in os.environ


def test_target_shift_changes_only_the_targets_by_one_gain_per_channel(synth_dir, tmp_path):
    """Imperfect supervision: each target (and its parts) under one exposure and white balance, the input, mask,
    background and maps those of the exact set, the parts still summing to the target."""
    shifted = synth.generate(tmp_path / "shifted", N, size=SIZE, seed=7, target_shift=1.0)
    assert synth.target_shift_of(shifted) == 1.0 and synth.target_shift_of(synth_dir) == 0.0
    gains = []
    for exact, other in zip(records(synth_dir), records(shifted)):
        for key in ("foreground", "mask", "background", "env"):
            assert (synth_dir / exact[key]).read_bytes() == (shifted / other[key]).read_bytes(), key
        a = np.load(synth_dir / exact["target_linear"])
        b = np.load(shifted / other["target_linear"])
        lit = a.sum(-1) > 1e-3
        gain = (b[lit] / a[lit]).mean(0)
        np.testing.assert_allclose(b[lit], a[lit] * gain, rtol=1e-4)  # one gain per channel over the whole frame
        assert np.all(gain > 2 ** -1.5 - 1e-6) and np.all(gain < 2 ** 1.5 + 1e-6)
        parts = sum(np.load(shifted / p) for p in other["target_parts_linear"])
        np.testing.assert_allclose(parts, b, rtol=1e-4, atol=1e-5)
        gains.append(gain)
    assert np.ptp(np.stack(gains), axis=0).min() > 0.05  # a gain of each scene's own, per channel


def test_cli_refuses_a_negative_target_shift(tmp_path, capsys):
    with pytest.raises(SystemExit):
        synth.main(["--out", str(tmp_path / "x"), "--n", "1", "--target-shift", "-1"])
    assert "--target-shift -1.0: expected a number >= 0" in capsys.readouterr().err


def test_the_trainers_set_is_written_again_for_another_target_shift(tmp_path):
    from iclight_ds.config import DEFAULT_ENV_SHAPE
    from iclight_ds.train.build import make_synthetic

    root = tmp_path / "data"
    make_synthetic(root, 2, seed=0, resolution=32, env_shape=DEFAULT_ENV_SHAPE)
    exact = (root / "target" / "000000.png").read_bytes()
    make_synthetic(root, 2, seed=0, resolution=32, env_shape=DEFAULT_ENV_SHAPE, target_shift=0.5)
    assert synth.target_shift_of(root) == 0.5 and (root / "target" / "000000.png").read_bytes() != exact
