"""Procedural relighting data with exact light transport (the dataset format of `dataset.py`).

Each sample is one object (sphere, superquadric or height-field blob) with a procedural albedo,
rendered in linear HDR with Lambertian shading under an equirectangular environment map L:

    E(n) = sum_k L_k * max(0, n . w_k) * dOmega_k        (irradiance; a matrix product, linear in L)
    I_L  = albedo * E(n)

The degraded input is the same object under an independent random map. L is also split by a random
binary mask m over env pixels into L1 = L*m and L2 = L*(1-m); the appearances under L1 and L2 sum to
the appearance under L (the paper's light transport consistency, I_{L1+L2} = I_{L1} + I_{L2}).
The background is the map L itself, bilinearly resized to size x size (also linear in L), so the whole
composited target frame is additive too.

`target_shift` > 0 makes the supervision imperfect as in-the-wild pairs are: each target (and its light parts)
under a random exposure and white balance that the input does not share (`shift_target`).

Conventions: camera looks down -z with x right, y up; env row i has polar angle theta from +y, column
j has azimuth phi in (-pi, pi) with phi = 0 towards the camera (+z) and phi = -pi/2 to the left (-x).

CLI: python -m iclight_ds.data.synth --out DIR --n N --size S --seed K [--env-shape H W] [--no-extras] [--workers P]
     [--target-shift S]
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import DEFAULT_ENV_SHAPE
from .imageio import float_to_uint8, linear_to_srgb

# Linear albedo colours, named in prompts.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.80, 0.08, 0.06), "green": (0.10, 0.60, 0.12), "blue": (0.08, 0.15, 0.75),
    "yellow": (0.85, 0.75, 0.10), "orange": (0.90, 0.40, 0.05), "purple": (0.45, 0.12, 0.60),
    "white": (0.85, 0.85, 0.85), "grey": (0.40, 0.40, 0.40), "cyan": (0.10, 0.65, 0.70),
    "pink": (0.90, 0.40, 0.55), "brown": (0.40, 0.20, 0.08),
}
LUMA = np.array([0.2126, 0.7152, 0.0722])
# Largest component of the mean light direction -> phrase; index = axis * 2 + (component < 0).
DIRECTION_WORDS = ("the right", "the left", "above", "below", "the front", "behind")
COVERAGE = (0.15, 0.60)  # accepted fraction of object pixels


@dataclass
class SynthSample:
    """One rendered scene; images (S, S, 3) float32 linear, env maps (He, We, 3) float32."""

    prompt: str
    mask: np.ndarray  # (S, S) bool
    target: np.ndarray  # object under L composited over the background view of L
    target_parts: tuple[np.ndarray, np.ndarray]  # the same under L1 and L2; sum == target
    foreground: np.ndarray  # object under the degraded map, zero outside the mask
    background: np.ndarray  # view of L
    env: np.ndarray
    env_parts: tuple[np.ndarray, np.ndarray]  # L * m, L * (1 - m)


# ----------------------------------------------------------------------------- environment maps

def env_directions(env_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Unit direction (K, 3) and solid angle (K,) of each env pixel, K = He * We, row-major."""
    h, w = env_shape
    theta = (np.arange(h) + 0.5) * np.pi / h  # (He,) polar angle from +y
    phi = (np.arange(w) + 0.5) * 2 * np.pi / w - np.pi  # (We,) azimuth, 0 = towards the camera
    t, p = np.meshgrid(theta, phi, indexing="ij")
    dirs = np.stack([np.sin(t) * np.sin(p), np.cos(t), np.sin(t) * np.cos(p)], -1).reshape(-1, 3)
    d_omega = (np.sin(t) * (np.pi / h) * (2 * np.pi / w)).reshape(-1)
    return dirs, d_omega


def _random_colour(rng: np.random.Generator, max_saturation: float) -> np.ndarray:
    """(3,) light colour with mean 1: white mixed with a random tint."""
    c = 1.0 + rng.uniform(0, max_saturation) * (rng.uniform(0, 1, 3) - 0.5) * 2
    return c / c.mean()


def random_env(rng: np.random.Generator, env_shape: tuple[int, int]) -> np.ndarray:
    """(He, We, 3) HDR map: an ambient term plus 1-4 coloured Gaussian light blobs.

    Each blob is normalised to a given power sum_k L_k dOmega_k, i.e. the irradiance it gives a surface
    facing it; the key light stays out of the back hemisphere so objects are mostly lit from the front.
    """
    dirs, d_omega = env_directions(env_shape)
    env = np.tile(rng.uniform(0.02, 0.08) * _random_colour(rng, 0.3), (len(dirs), 1))  # (K, 3)
    for i in range(rng.integers(1, 5)):
        z = rng.uniform(-0.2, 1.0) if i == 0 else rng.uniform(-1.0, 1.0)
        a = rng.uniform(0, 2 * np.pi)
        centre = np.array([np.sqrt(1 - z * z) * np.cos(a), np.sqrt(1 - z * z) * np.sin(a), z])
        angle = np.arccos(np.clip(dirs @ centre, -1.0, 1.0))  # (K,)
        blob = np.exp(-0.5 * (angle / rng.uniform(0.15, 0.6)) ** 2)
        blob[blob < 1e-9] = 0.0  # no subnormal tails: they make every later matmul ~20x slower
        power = rng.uniform(0.6, 1.2) if i == 0 else rng.uniform(0.1, 0.5)
        env += (power / (blob @ d_omega)) * blob[:, None] * _random_colour(rng, 0.7)
    return env.reshape(*env_shape, 3)


def split_mask(rng: np.random.Generator, env_shape: tuple[int, int]) -> np.ndarray:
    """(He, We) bool: random on/off blocks of 2 or 4 pixels, both parts non-empty."""
    h, w = env_shape
    block = int(rng.choice([2, 4]))
    gh, gw = -(-h // block), -(-w // block)
    while True:
        cells = rng.random((gh, gw)) < 0.5
        m = np.kron(cells, np.ones((block, block), dtype=bool))[:h, :w]
        if m.any() and not m.all():
            return m


def light_phrase(env: np.ndarray) -> str:
    """Direction word of the power-weighted mean light direction of an (He, We, 3) map."""
    dirs, d_omega = env_directions(env.shape[:2])
    mean_dir = (env.reshape(-1, 3) @ LUMA * d_omega) @ dirs  # (3,)
    axis = int(np.argmax(np.abs(mean_dir)))
    return DIRECTION_WORDS[axis * 2 + int(mean_dir[axis] < 0)]


# ----------------------------------------------------------------------------- geometry, albedo

def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, S) x (right) and y (up) pixel-centre coordinates in [-1, 1]."""
    c = (np.arange(size) + 0.5) / size * 2 - 1
    return np.meshgrid(c, -c, indexing="xy")


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True).clip(1e-12)


def _sphere(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask (S, S) and analytic normals (S, S, 3) of a sphere."""
    r = rng.uniform(0.45, 0.8)
    dx, dy = (x - rng.uniform(-0.25, 0.25)) / r, (y - rng.uniform(-0.25, 0.25)) / r
    d2 = dx * dx + dy * dy
    return d2 < 1, np.stack([dx, dy, np.sqrt(np.clip(1 - d2, 0, 1))], -1)


def _superquadric(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Superellipsoid |u/a|^p + |v/b|^p + |z/c|^p = 1 rotated in the image plane; normal = grad F."""
    a, b, c, p = rng.uniform(0.4, 0.75), rng.uniform(0.4, 0.75), rng.uniform(0.4, 0.8), rng.uniform(2.5, 6)
    rot = rng.uniform(0, np.pi)
    dx, dy = x - rng.uniform(-0.2, 0.2), y - rng.uniform(-0.2, 0.2)
    u, v = dx * np.cos(rot) + dy * np.sin(rot), -dx * np.sin(rot) + dy * np.cos(rot)
    s = np.abs(u / a) ** p + np.abs(v / b) ** p
    z = c * np.clip(1 - s, 0, 1) ** (1 / p)
    gu = np.sign(u) * np.abs(u / a) ** (p - 1) / a
    gv = np.sign(v) * np.abs(v / b) ** (p - 1) / b
    gz = (z / c) ** (p - 1) / c
    normal = np.stack([gu * np.cos(rot) - gv * np.sin(rot), gu * np.sin(rot) + gv * np.cos(rot), gz], -1)
    return s < 1, _normalise(normal)


def _blob(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Height field of 3-6 Gaussian bumps, cut at the level giving a random coverage; FD normals."""
    h = np.zeros_like(x)
    for _ in range(rng.integers(3, 7)):
        cx, cy = rng.uniform(-0.35, 0.35, 2)
        h += rng.uniform(0.5, 1.0) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * rng.uniform(0.2, 0.4) ** 2))
    level = np.quantile(h, 1 - rng.uniform(0.2, 0.5))
    # sqrt: a rounded top and a near-vertical silhouette, like a sphere's.
    z = rng.uniform(0.8, 1.5) * np.sqrt(np.clip(h - level, 0, None))
    dz_dy, dz_dx = np.gradient(z, y[:, 0], x[0])
    return h > level, _normalise(np.stack([-dz_dx, -dz_dy, np.ones_like(h)], -1))


SHAPES = {"sphere": _sphere, "rounded box": _superquadric, "blob": _blob}


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) bilinear resampling weights (half-pixel centres, clamped edges)."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(int)
    i1, frac = np.minimum(i0 + 1, n_in - 1), pos - i0
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def _pattern(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, str]:
    """(S, S) mixing weight in [0, 1] and its adjective: stripes, checker or value noise."""
    kind = rng.integers(3)
    if kind == 0:
        angle, freq = rng.uniform(0, np.pi), rng.uniform(3, 8)
        return (np.sin(np.pi * freq * (x * np.cos(angle) + y * np.sin(angle))) > 0).astype(float), "striped"
    if kind == 1:
        freq, (ox, oy) = rng.uniform(2, 5), rng.uniform(0, 1, 2)
        return ((np.floor(freq * (x + ox)) + np.floor(freq * (y + oy))) % 2).astype(float), "checkered"
    g = int(rng.integers(3, 7))
    noise = rng.random((g, g))
    up = _interp_matrix(x.shape[0], g) @ noise @ _interp_matrix(x.shape[1], g).T  # (S, S)
    return np.clip((up - 0.5) * 3 + 0.5, 0, 1), "mottled"


def _albedo(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, str]:
    """(S, S, 3) linear albedo in [0.02, 0.95] and the prompt phrase ('red striped')."""
    names = list(PALETTE)
    name = names[rng.integers(len(names))]
    base = np.clip(np.array(PALETTE[name]) * rng.uniform(0.85, 1.1, 3), 0.02, 0.95)
    other = np.array(PALETTE[names[rng.integers(len(names))]])
    second = np.clip(base * rng.uniform(0.2, 0.5) + other * rng.uniform(0.2, 0.5), 0.02, 0.95)
    weight, adjective = _pattern(rng, x, y)
    return base * (1 - weight[..., None]) + second * weight[..., None], f"{name} {adjective}"


# ----------------------------------------------------------------------------- rendering

def transport_matrix(normals: np.ndarray, env_shape: tuple[int, int]) -> np.ndarray:
    """(P, K) Lambertian transport: T[p, k] = max(0, n_p . w_k) dOmega_k, so E = T @ L."""
    dirs, d_omega = env_directions(env_shape)
    transport = normals @ (dirs * d_omega[:, None]).T  # dOmega > 0 commutes with the clamp
    return np.maximum(transport, 0.0, out=transport)


def shade(albedo: np.ndarray, transport: np.ndarray, env: np.ndarray) -> np.ndarray:
    """Radiance (..., P, 3) = albedo (P, 3) * transport (P, K) @ env (..., He, We, 3).

    Leading env dims are batched into one matrix product (P, K) @ (K, n * 3).
    """
    (p, k), lead = transport.shape, env.shape[:-3]
    flat = env.reshape(-1, k, 3).transpose(1, 0, 2).reshape(k, -1)  # (K, n * 3)
    irradiance = (transport @ flat).reshape(p, -1, 3).transpose(1, 0, 2)  # (n, P, 3)
    return (irradiance * albedo).reshape(*lead, p, 3)


def render_radiance(albedo: np.ndarray, normals: np.ndarray, lights: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """(n, P, 3) radiance of P pixels (albedo, normals (P, 3)) under n maps (n, He, We, 3).

    Pixels go in chunks so the (chunk, K) transport matrix stays small at large sizes.
    """
    out = [shade(albedo[i:i + chunk], transport_matrix(normals[i:i + chunk], lights.shape[1:3]), lights)
           for i in range(0, len(albedo), chunk)]
    return np.concatenate(out, axis=1)


def background_view(env: np.ndarray, size: int) -> np.ndarray:
    """(S, S, 3): the whole (He, We, 3) map bilinearly resized to a square; linear in `env`."""
    rows, cols = _interp_matrix(size, env.shape[0]), _interp_matrix(size, env.shape[1])
    half = np.tensordot(rows, env, axes=(1, 0))  # (S, We, 3)
    return np.tensordot(cols, half, axes=(1, 1)).transpose(1, 0, 2)  # (S, S, 3)


def _random_object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Mask (S, S), normals (S, S, 3), shape name; resampled until the coverage is in COVERAGE."""
    x, y = _pixel_grid(size)
    names = list(SHAPES)
    name = names[rng.integers(len(names))]
    for _ in range(100):
        mask, normals = SHAPES[name](rng, x, y)
        if COVERAGE[0] <= mask.mean() <= COVERAGE[1]:
            return mask, normals, name
    raise RuntimeError(f"could not place a {name} covering {COVERAGE} of a {size}px frame")


def render_sample(rng: np.random.Generator, size: int, env_shape: tuple[int, int]) -> SynthSample:
    """Render one scene (see the module docstring)."""
    mask, normals, shape_name = _random_object(rng, size)
    albedo, look = _albedo(rng, *_pixel_grid(size))
    env, env_degraded = random_env(rng, env_shape), random_env(rng, env_shape)
    m = split_mask(rng, env_shape)[..., None]  # (He, We, 1)
    parts = (np.where(m, env, 0.0), np.where(m, 0.0, env))  # sums to env exactly

    lights = np.stack([env, *parts, env_degraded])  # (4, He, We, 3)
    radiance = render_radiance(albedo[mask], normals[mask], lights)  # (4, P, 3)

    def frame(i: int, with_background: bool) -> np.ndarray:
        """(S, S, 3) float32: object under lights[i], over the view of lights[i] or over black."""
        out = background_view(lights[i], size) if with_background else np.zeros((size, size, 3))
        out[mask] = radiance[i]
        return out.astype(np.float32)

    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    return SynthSample(
        prompt=f"{'an' if look[0] in 'aeiou' else 'a'} {look} {shape_name}, light from {light_phrase(env)}",
        mask=mask,
        target=frame(0, True),
        target_parts=(frame(1, True), frame(2, True)),
        foreground=frame(3, False),
        background=f32(background_view(env, size)),
        env=f32(env),
        env_parts=(f32(parts[0]), f32(parts[1])),
    )


def shift_target(s: SynthSample, rng: np.random.Generator, strength: float) -> SynthSample:
    """`s` with its target under a random exposure 2^U(-strength, strength) and white balance (per-channel gains
    2^U(-strength/2, strength/2)) in linear light, the input, background and maps untouched. The parts are scaled
    alike, so they still sum to the target (a camera's gains are linear)."""
    gain = (2.0 ** (rng.uniform(-strength, strength) + rng.uniform(-strength / 2, strength / 2, 3))).astype(np.float32)
    return replace(s, target=s.target * gain, target_parts=tuple(p * gain for p in s.target_parts))


# ----------------------------------------------------------------------------- writing

def _save_png(path: Path, linear: np.ndarray) -> None:
    Image.fromarray(float_to_uint8(linear_to_srgb(linear)), "RGB").save(path)


def write_sample(out_dir: Path, sample_id: str, s: SynthSample, extras: bool = True) -> dict:
    """Write one sample's files under `out_dir`; return its manifest record (paths relative).

    `extras` adds the env parts and the linear target and parts (3 x S*S*12 bytes of .npy).
    """
    rec = {
        "id": sample_id, "prompt": s.prompt,
        "target": f"target/{sample_id}.png", "foreground": f"foreground/{sample_id}.png",
        "mask": f"mask/{sample_id}.png", "background": f"background/{sample_id}.png",
        "env": f"env/{sample_id}.npy",
    }
    arrays = [(rec["env"], s.env)]
    if extras:
        rec["env_parts"] = [f"env/{sample_id}_part1.npy", f"env/{sample_id}_part2.npy"]
        rec["target_linear"] = f"linear/{sample_id}.npy"
        rec["target_parts_linear"] = [f"linear/{sample_id}_part1.npy", f"linear/{sample_id}_part2.npy"]
        arrays += [(rec["target_linear"], s.target), *zip(rec["env_parts"], s.env_parts),
                   *zip(rec["target_parts_linear"], s.target_parts)]
    for key, img in (("target", s.target), ("foreground", s.foreground), ("background", s.background)):
        _save_png(out_dir / rec[key], img)
    Image.fromarray(s.mask.astype(np.uint8) * 255, "L").save(out_dir / rec["mask"])
    for rel, arr in arrays:
        np.save(out_dir / rel, arr)
    return rec


def _write_one(out: Path, i: int, size: int, seed: int, env_shape: tuple[int, int], extras: bool,
               target_shift: float) -> str:
    sample = render_sample(np.random.default_rng([seed, i]), size, env_shape)
    if target_shift > 0:  # a stream of its own: the scene is the one the unshifted set has
        sample = shift_target(sample, np.random.default_rng([seed, i, 1]), target_shift)
    return json.dumps(write_sample(out, f"{i:06d}", sample, extras=extras))


BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def generate(out_dir: str | Path, n: int, size: int = 64, seed: int = 0,
             env_shape: tuple[int, int] = DEFAULT_ENV_SHAPE, extras: bool = True, workers: int = 1,
             target_shift: float = 0.0) -> Path:
    """Write `n` samples, `manifest.jsonl` and SYNTH_FILE (the arguments) to `out_dir`; bit-identical for the same
    arguments.

    Sample i depends only on (seed, i), so a larger `n` extends a smaller one, and `workers` processes
    write the same files as one. `extras=False` skips the env parts and linear images (the trainer
    draws its own light splits). `target_shift` > 0: imperfect supervision (`shift_target`).
    """
    out = Path(out_dir)
    for sub in ("target", "foreground", "mask", "background", "env") + (("linear",) if extras else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    env_shape = (int(env_shape[0]), int(env_shape[1]))
    job = functools.partial(_write_one, out, size=size, seed=seed, env_shape=env_shape, extras=extras,
                            target_shift=float(target_shift))
    if workers > 1 and n > 1:
        # one BLAS thread per worker: each would otherwise start one per core, and on 16 cores 12 workers ran no
        # faster than one process (an H200 machine); the spawned children read these when numpy loads
        saved = {k: os.environ.get(k) for k in BLAS_THREADS}
        os.environ.update({k: "1" for k in BLAS_THREADS})
        try:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                lines = pool.map(job, range(n), chunksize=max(1, n // (workers * 8)))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    else:
        lines = [job(i) for i in range(n)]
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n" if lines else "")
    (out / SYNTH_FILE).write_text(json.dumps({"n": n, "size": size, "seed": seed, "env_shape": list(env_shape),
                                              "extras": extras, "target_shift": float(target_shift)}) + "\n")
    return out


# the generator's arguments, beside the manifest of a generated set
SYNTH_FILE = "synth.json"


def target_shift_of(folder: str | Path) -> float:
    """The target_shift a generated set was written with (0 for a set without SYNTH_FILE)."""
    path = Path(folder) / SYNTH_FILE
    return float(json.loads(path.read_text()).get("target_shift", 0.0)) if path.is_file() else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output dataset folder")
    parser.add_argument("--n", type=int, default=512, help="number of samples")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--env-shape", type=int, nargs=2, default=DEFAULT_ENV_SHAPE, metavar=("H", "W"),
                        help="environment map height and width (equirectangular, W = 2H)")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip env parts and linear .npy images (large at high resolution)")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering in parallel (same files)")
    parser.add_argument("--target-shift", type=float, default=0.0,
                        help="imperfect supervision: each target under a random exposure 2^U(-S, S) and white "
                             "balance 2^U(-S/2, S/2) per channel that the input does not share (0: none)")
    args = parser.parse_args(argv)
    if args.target_shift < 0:
        parser.error(f"--target-shift {args.target_shift}: expected a number >= 0")
    generate(args.out, args.n, size=args.size, seed=args.seed, env_shape=tuple(args.env_shape),
             extras=not args.no_extras, workers=args.workers, target_shift=args.target_shift)
    print(f"wrote {args.n} samples to {args.out}")


if __name__ == "__main__":
    main()
