"""Typed run configuration: one dataclass per concern, loaded from YAML/JSON, overridable by dotted keys.

Micro-batch, gradient accumulation, precision, ZeRO stage, offload and clipping are NOT here: they live in
the DeepSpeed JSON (`train.ds_config`) and are read from there (see `engine.read_ds_config`).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration file, key or value is wrong; the message names the key."""


# The equirectangular environment-map size (H, W) of FC models, unless model.env_shape says otherwise
DEFAULT_ENV_SHAPE = (16, 32)
# A run's resolved record: what every `auto` became (DeepSpeed config, batch geometry, dtype, optimizer, ...), written
# by the trainer into the run folder and beside every checkpoint's config.json (iclight_ds/train/resolve.py)
RESOLVED_FILE = "resolved.json"
AUTO_CACHE = "auto"  # data.cache: the trainer encodes its training set once (see DataConfig.cache)
AUTO_CACHE_DIR = "latent_cache"  # its folder inside the run's output_dir
NUM_TIMESTEPS = 1000  # the SD1.5 schedule's training timesteps (model/schedule.py builds the schedule)
# The shipped tiny pretrained base (iclight_ds/model/tinybase.py, trained by `python -m iclight_ds.tools.tiny_base`):
# what `model.base: tiny` loads
SHIPPED_TINY_BASE = Path(__file__).resolve().parent / "model" / "assets" / "tiny_base.safetensors"
# model.lora_targets by default: the UNet layers kohya's sd-scripts and the diffusers examples put LoRA on. In every
# transformer block the attention projections (to_q, to_k, to_v, to_out.0 of self- and cross-attention), the
# transformer's input and output projections (proj_in, proj_out: 1x1 convolutions in SD1.5) and its feed-forward
# layers (ff.net.0.proj, ff.net.2); in every resnet block both 3x3 convolutions (conv1, conv2), the 1x1 shortcut
# (conv_shortcut) and the time-embedding projection (time_emb_proj), the resnet layers kohya's conv_dim adds. The
# down/upsamplers' convolutions, which conv_dim also adds, are left out: diffusers' SD1.5 loader misnames the
# upsampler that follows a resnet-only up block in LDM-named files.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "conv_shortcut", "time_emb_proj")


@dataclass
class ModelConfig:
    size: Literal["tiny", "full"] = "tiny"
    """Architecture built from configs in code: 'tiny' (tests, default run) or 'full' (real SD1.5 shapes)."""
    base: Optional[str] = None
    """Local SD1.5 weights to start from (diffusers folder or one .safetensors/.ckpt); tiny: the shipped tiny
    pretrained base (SHIPPED_TINY_BASE, the CPU default run's); None: random from `size`."""
    tokenizer: Optional[str] = None
    """Local CLIP tokenizer folder for a single-file base (which carries none)."""
    iclight_weights: Optional[str] = None
    """An IC-Light offset file (e.g. iclight_sd15_fc.safetensors) added to the base before training."""
    variant: Literal["fc", "fbc"] = "fc"
    """fc: UNet input = noisy + foreground latent (8 ch); fbc: + background latent (12 ch)."""
    light_input: Literal["env", "text"] = "env"
    """FC only: how the model is told the light. env: an HDR environment map through a learned encoder whose tokens
    join the text tokens (every sample needs `env`); text: the official FC, the light is described in the prompt (no
    encoder, no env maps; the consistency term is off, see method.md). FBC sees the light in its background."""
    env_tokens: int = 4
    """FC with light_input=env: cross-attention tokens the environment-map encoder appends to the text tokens."""
    env_shape: tuple[int, int] = DEFAULT_ENV_SHAPE
    """Equirectangular environment map size (H, W) the encoder takes."""
    merger_hidden: int = 64
    """Width of the latent-space consistency MLP (per latent pixel, 8 -> hidden -> ... -> 4)."""
    merger_layers: int = 5
    """Number of linear layers in the consistency MLP."""
    merger_init: Literal["mean", "sum"] = "mean"
    """What phi starts as (its last layer is zero-initialised, a residual around this): mean = the mean of its two
    inputs, a neutral prior for noise predictions; sum = their sum, what additive light makes of the two clean latents
    of objective.consistency x0 (up to the VAE's non-linearity, which the MLP learns), and which a light-blind model
    (x0_1 = x0_2 = x0) does not satisfy."""
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    """Recompute UNet activations in backward: ~1/3 more compute for most of the activation memory. auto: on for a
    UNet of SD1.5's size, off for the tiny ones, whose activations are a few MB (models.wants_checkpointing)."""
    attention: Literal["auto", "xformers", "sdpa"] = "auto"
    """auto: xformers when it imports and the device is CUDA, else PyTorch SDPA."""
    channels_last: bool = False
    """Run the UNet's convolutions in the channels-last (NHWC) memory format: its input is made channels-last before
    conv_in, so cuDNN picks NHWC kernels (the weights stay contiguous, as DeepSpeed needs them). Off until measured
    on a GPU (bench/throughput.py, docs/performance.md); changes no weight, checkpoint or export format."""
    compile: bool = False
    """torch.compile the UNet in place (nn.Module.compile: checkpoint and export keys unchanged). The first step
    compiles (minutes with inductor, even the tiny UNet on a 2-core CPU; the full UNet's time on a GPU is not
    measured), a new batch shape compiles again.
    Off until measured on a GPU (bench/throughput.py, docs/performance.md). Inductor needs a C/C++ compiler (and
    Triton on CUDA): without one the run is refused before step 1."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """torch.compile's backend for model.compile: inductor generates kernels; aot_eager and eager are torch's
    debugging backends (the same graph capture, eager kernels): to tell an inductor problem from a capture problem."""
    frozen_dtype: Literal["bf16", "fp16", "fp32", "auto"] = "auto"
    """dtype of the frozen VAE and text encoder; auto = the engine's training dtype."""
    vae: str = "auto"
    """Frozen VAE of a run without `base`: auto = the shipped trained tiny VAE for size=tiny (8x, random for full);
    tiny-4x = the shipped 4x one (16x16 latents at 64 px; the GPU default run's); random = random weights from the
    size's config; or a file written by `python -m iclight_ds.tiny_vae`.
    With `base` set the base's own VAE is used and this must stay auto."""

    lora_rank: int = 0
    """LoRA rank on the UNet (peft): 0 trains every UNet weight (a full fine-tune); r > 0 freezes the UNet and trains
    rank-r updates of the `lora_targets` layers instead. The widened conv_in, the consistency MLP and the environment
    encoder always train in full."""
    lora_alpha: Optional[float] = None
    """LoRA alpha: each update is scaled by lora_alpha / lora_rank; None: equal to lora_rank (scale 1)."""
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """The UNet layers that get LoRA: a layer is chosen when its name is an entry or ends with '.' + an entry
    (peft's rule). Default: the attention projections, proj_in/proj_out and feed-forward layers of every transformer
    block, and conv1, conv2, conv_shortcut and time_emb_proj of every resnet block (config.DEFAULT_LORA_TARGETS)."""

    @property
    def in_channels(self) -> int:
        return 8 if self.variant == "fc" else 12

    @property
    def env_input(self) -> bool:
        """Whether the model reads an environment map (FC with light_input=env): the encoder, and `env` per sample."""
        return self.variant == "fc" and self.light_input == "env"

    @property
    def lora_scale_alpha(self) -> float:
        """lora_alpha as it applies: lora_rank where it is None."""
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)


@dataclass
class DataConfig:
    path: Optional[str] = None
    """Dataset folder with manifest.jsonl; None generates the synthetic set into <output_dir>/data."""
    resolution: int = 64
    """Training resolution in pixels (square; resize short side, centre-crop)."""
    buckets: bool = False
    """Aspect-ratio buckets (kohya-style): each sample is sized to the bucket (W, H <= resolution^2 pixels, sides
    multiples of resolution/8, aspect up to 2:1) nearest its target's aspect instead of a centre-cropped square, and
    each micro-batch comes from one bucket. Not with data.cache (its shards hold one size)."""
    num_workers: int = 1
    """DataLoader worker processes per rank."""
    synth_samples: int = 1024
    """Synthetic samples generated when `path` is None."""
    synth_seed: int = 0
    """Seed of the synthetic generator."""
    synth_target_shift: float = 0.0
    """Imperfect supervision in the synthetic scenes: each target under a random exposure 2^U(-S, S) and white
    balance 2^U(-S/2, S/2) per channel that its input does not share, as in-the-wild pairs are (0: exact targets).
    The held-out scenes of the training-time evaluation stay exact."""
    skip_bad: bool = False
    """Skip samples whose files fail to decode (counted and reported) instead of stopping."""
    validate: bool = True
    """Decode and check every sample of `path` before step 1 (rank 0); a dataset with problems is refused unless
    skip_bad. The synthetic scenes the trainer writes itself (path None) are not checked: they are the generator's,
    which the tests check, and 12288 of them (the GPU default run's) take minutes on one core."""
    cache: Optional[str] = None
    """Train from a latent cache, so that a step does no VAE or text-encoder work. A folder: a cache made by
    `python -m iclight_ds.cache`, whose metadata must match this run (variant, resolution, model size/base, seed,
    frozen dtype, ...); the VAE and text encoder are then not built at all (no previews, no training-time
    evaluation). `auto`: the trainer encodes its training set (data.path, or its synthetic scenes) once into
    <output_dir>/latent_cache before step 1 with the run's own frozen encoders, keeps them for the previews and
    evaluations, and trains from the cache; a resumed run reuses it. FBC with the consistency term then draws its
    light split from 4 cached per sample instead of a new one each step. Rank 0 writes it while the other ranks wait
    up to train.collective_timeout_s: for a large dataset on several ranks, write it beforehand with the cache
    command. None: every step encodes its batch."""


@dataclass
class ObjectiveConfig:
    lambda_vanilla: float = 1.0
    """Weight of the noise-prediction loss (paper: lambda_v)."""
    lambda_consistency: float = 0.1
    """Weight of the light-transport consistency loss (paper: lambda_c); 0 trains vanilla only."""
    noise_offset: float = 0.0
    """Offset noise (the FCON recipe); 0 disables."""
    snr_gamma: float = 5.0
    """Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' --snr_gamma): each sample's loss times
    min(SNR_t, gamma) / SNR_t; 0 disables it (plain noise-prediction MSE)."""
    consistency: Literal["paper", "x0", "linear"] = "paper"
    """How the consistency term merges the predictions under L1 and L2: paper = phi(eps_1, eps_2) against the noise
    (the paper's); x0 = phi over the clean latents they imply, (z_t - sqrt(1 - abar_t) eps_i) / sqrt(abar_t), against
    the target latent (can express an additive image; train/objectives.py); linear = those clean latents decoded by
    the frozen VAE into linear light, where light adds, their sum against the target's image (phi unused; a VAE
    decode with gradients a step, objective.linear_samples). docs/quality.md ablates them."""
    linear_samples: int = 8
    """objective.consistency linear: how many samples of each micro-batch the term decodes (0: all). Its VAE decodes
    with gradients cost more than the UNet's rows for small UNets; the term's gradient then comes from these."""
    consistency_min_timestep: int = 0
    """The consistency term counts only the samples whose timestep is >= this (of 1000; 0: every sample). At low
    noise z_t, noised from the image under L, pins the clean estimates under L1 and L2 to that image whatever the
    light, so there the term can only be met by a merge that averages; at high noise the light is still open."""
    consistency_weighting: Literal["snr", "noise"] = "snr"
    """Per-sample weights of the consistency term. snr: the form's Min-SNR weights (paper: those of the vanilla term;
    x0 and linear: min(SNR_t, snr_gamma), which make an x0 error cost what the same error in noise space costs, and
    so weigh the low-noise samples most); noise: 1 - abar_t for every form, rising from about 0 at t = 0 to about 1
    at t = 999, which weighs most the samples whose z_t leaves the light most open. objective.consistency_min_timestep
    applies to either."""
    split_cells: int = 4
    """The random complementary split of the illumination is drawn on a split_cells x (2*split_cells) grid."""


@dataclass
class TrainConfig:
    ds_config: str = "auto"
    """DeepSpeed JSON: a name in ds_configs/, a path, or 'auto' (the memory planner's choice for this machine and the
    ranks started on it; `python -m iclight_ds.plan` shows its table)."""
    output_dir: str = "runs/default"
    """Run folder: metrics.jsonl, checkpoints/, unet.safetensors, resolved config."""
    steps: int = 2000
    """Optimizer steps to train (each = gradient_accumulation_steps micro-batches per rank)."""
    lr: float = 3e-3
    """Peak learning rate."""
    warmup_steps: int = 50
    """Linear warm-up, in optimizer steps."""
    schedule: Literal["constant", "cosine"] = "cosine"
    """LR after warm-up: constant, or cosine decay to 10% of the peak at `steps`."""
    optimizer: Literal["auto", "adamw8bit", "adamw", "cpu_adam"] = "auto"
    """adamw8bit: bitsandbytes AdamW8bit; adamw: torch AdamW (fused on the CPU); cpu_adam: DeepSpeedCPUAdam (offload).
    auto: where the step runs on the host, where bitsandbytes' 8-bit AdamW is ~30-50x slower per parameter
    (bench/host_optimizer.py), cpu_adam when the DeepSpeed config offloads the optimizer and adamw on a CPU-only
    machine, each only if its fp32 moments fit the RAM; else (and on a GPU) adamw8bit."""
    weight_decay: float = 1e-2
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    seed: int = 0
    """One seed from which every random stream is derived (per rank)."""
    checkpoint_every: int = 500
    """Save a checkpoint every N optimizer steps (0: no step cadence); with checkpoint_minutes, whichever comes
    first, and always at the end. `keep` bounds how many stay."""
    checkpoint_minutes: float = 30.0
    """Also save when this many minutes of training have passed since the last save (0: no time cadence)."""
    resume: Optional[str] = None
    """'latest' or a checkpoint folder to continue from; it is checked against its manifest (every file's size and
    sha256) before anything in it is loaded."""
    collective_timeout_s: float = 600.0
    """How long a rank waits for the others in one collective (gradient all-reduce, barrier, broadcast) before the run
    stops with a message naming what it was doing: a lost or stuck rank or node ends the run instead of hanging it."""
    resume_unverified: bool = False
    """Resume a checkpoint that has no manifest (written by another tool), unchecked (--resume-unverified)."""
    export: bool = True
    """Export <output_dir>/unet.safetensors at the end."""
    keep: int = 3
    """Keep the newest N checkpoints (older ones are deleted after a complete save); 0 keeps all."""
    max_bad_steps: int = 5
    """Non-finite losses tolerated in a row (each micro-batch skipped) before stopping with a checkpoint."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the trainable weights (diffusers' EMAModel, fp32; on the host when the
    DeepSpeed config offloads): at its n-th update the decay is min(ema_decay, (1 + n) / (10 + n)). 0: off (the tiny
    default run); 0.9999 is usual for real runs. Saved in every checkpoint; export defaults to it. Not with ZeRO-3."""
    nvme_path: Optional[str] = None
    """A folder on a fast local SSD for ZeRO-Infinity's NVMe offload: it replaces the nvme_path of the DeepSpeed
    config's offload sections that swap to NVMe (ds_configs/1gpu-nvme.json, 1gpu-6gb-nvme.json); None keeps the
    config's own. It must exist, be writable and have the room the planner counts; the run swaps into a folder of its
    own under it (one per train.output_dir), removed when the run ends."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """The DeepSpeed config's precision as shipped (auto), or that config with only its precision switched (fp16 for
    GPUs before Ampere, fp32): the derived JSON is what the run records in ds_config.json."""


@dataclass
class LoggingConfig:
    every: int = 10
    """Log metrics every N optimizer steps (the only place the device is synchronised)."""
    wandb: bool = True
    """Log to Weights & Biases; offline (WANDB_MODE=offline) unless the user sets WANDB_MODE."""
    wandb_project: str = "iclight-ds"
    """wandb project name."""
    progress: bool = True
    """tqdm progress bar on rank 0."""
    preview_every: int = 100
    """Every N optimizer steps (and at the end) rank 0 relights fixed samples into previews/ (0: never)."""
    preview_samples: int = 4
    """Samples in a preview grid (the first ones of the dataset, always the same)."""
    preview_steps: int = 10
    """Sampler steps of a preview (DPM++ 2M SDE Karras, fixed seed)."""
    eval_every: int = 500
    """Every N optimizer steps (and at the end) relight `eval_samples` held-out scenes and log PSNR/SSIM vs the
    copy-the-input baseline, albedo drift and light additivity as eval/* (python -m iclight_ds.eval; 0: never)."""
    eval_samples: int = 8
    """Scenes scored by the training-time evaluation."""
    eval_at_start: bool = False
    """Also score the weights the run starts from before its first step, logged as step 0 (a fresh fine-tune: the
    base with its widened conv_in channels still zero) beside the trained model's scores. Not on a resumed run."""
    eval_data: Optional[str] = None
    """Dataset of held-out scenes for it; None: synthetic scenes generated into <output_dir>/eval_data (seed
    data.synth_seed + 1000) when the run trains on synthetic data, else the last `eval_samples` training samples."""
    eval_steps: int = 20
    """Sampler steps of the training-time evaluation."""
    tensorboard: bool = True
    """Also write the logged scalars, eval numbers and previews as TensorBoard events under <output_dir>/tensorboard
    (`tensorboard --logdir runs`); needs no wandb."""
    preview_images: list[str] = field(default_factory=list)
    """Your own foregrounds (RGBA, alpha as mask) relit at every preview with a fixed seed and the official demo's
    sampler settings; written to previews/user_step_N.png."""
    preview_prompts: list[str] = field(default_factory=list)
    """Their prompts: one per image, or one for all."""
    preview_backgrounds: list[str] = field(default_factory=list)
    """FBC: their backgrounds, one per image or one for all."""
    preview_envs: list[str] = field(default_factory=list)
    """FC: their (H, W, 3) linear HDR environment maps (.npy), one per image or one for all."""
    preview_image_steps: int = 25
    """Sampler steps of the user-image previews (the demo's 25)."""
    preview_image_cfg: float = 2.0
    """Classifier-free guidance of the user-image previews (the demo's 2.0; its negative prompt too)."""
    preview_weights: Literal["ema", "raw"] = "ema"
    """Which weights previews and the training-time evaluation use when train.ema_decay is on."""


@dataclass
class DegradationConfig:
    """The relight degradation of `python -m iclight_ds.data.prepare` (iclight_ds/data/degrade.py); not part of a
    training run. Ranges are (low, high), drawn uniformly per variant from the prepare seed."""

    shading_blur: float = 0.06
    """Scale of the smoothed luminance taken as the photo's shading, as a fraction of the image's short side."""
    albedo_strength: float = 0.85
    """Share of the estimated shading divided out of the photo (1: all of it, 0: the photo's shading stays)."""
    grey_world: float = 0.6
    """Share of the photo's light colour (grey-world estimate over the object) removed from the albedo estimate."""
    normal_detail: float = 0.4
    """Weight of the luminance-gradient detail added to the mask-shape normals (0: the mask's dome shape only)."""
    light_polar_max: float = 100.0
    """Largest angle in degrees between the random light direction and the view axis (> 90: some light from behind)."""
    light_saturation: tuple[float, float] = (0.0, 0.6)
    """Saturation of the random light colour (0: white)."""
    ambient: tuple[float, float] = (0.05, 0.4)
    """Ambient light relative to the directional light."""
    exposure: tuple[float, float] = (-0.7, 0.5)
    """log2 brightness of the degraded object relative to the photo's object."""
    shadow_prob: float = 0.7
    """Chance that a variant gets a shadow mask (noise, shapes or, with --shadow-materials, a material)."""
    shadow_strength: tuple[float, float] = (0.5, 0.95)
    """How much of the directional light a shadow blocks."""
    material_prob: float = 0.5
    """With --shadow-materials: chance that a shadow is a material image rather than a procedural one."""
    highlight_prob: float = 0.5
    """Chance of a specular highlight (Blinn-Phong on the estimated normals)."""
    highlight_strength: tuple[float, float] = (0.1, 0.6)
    """Specular intensity relative to the directional light."""
    shininess: tuple[float, float] = (8.0, 64.0)
    """Blinn-Phong exponent of the highlight."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------------------
# Conversion and checking of values


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Return `value` converted to the type `hint`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for hint_ in inner:  # the first type that takes the value, e.g. "auto" or true/false
            try:
                return _coerce(value, hint_, key)
            except ConfigError as e:
                errors.append(str(e).removeprefix(f"{key}: "))
        raise ConfigError(f"{key}: " + "; or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, str) and value.lstrip().startswith("["):  # from the command line: a YAML/JSON list
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"{key}: cannot parse {value!r} as a list: {e}") from e
        elif isinstance(value, str):  # or comma-separated
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {hint}")


def _section_hints(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _apply(cfg: RunConfig, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    sections = {f.name for f in dataclasses.fields(RunConfig)}
    if len(parts) != 2 or parts[0] not in sections:
        raise ConfigError(f"unknown config key {dotted!r}: keys look like <section>.<name>, sections: {sorted(sections)}")
    section = getattr(cfg, parts[0])
    hints = _section_hints(type(section))
    if parts[1] not in hints:
        raise ConfigError(f"unknown config key {dotted!r}; valid keys in '{parts[0]}': {sorted(hints)}")
    setattr(section, parts[1], _coerce(value, hints[parts[1]], dotted))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def read_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            tree = json.loads(text)
        else:
            tree = yaml.safe_load(text) or {}
    except Exception as e:  # the parser's own message says where
        raise ConfigError(f"{path}: cannot parse: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return tree


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """`['--train.lr', '1e-5', '--model.variant=fbc']` -> {'train.lr': '1e-5', 'model.variant': 'fbc'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg} has no value")
            value = argv[i + 1]
            i += 2
        out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults <- file <- overrides, then one validation step."""
    cfg = RunConfig()
    if path is not None:
        for key, value in _flatten(read_config_file(path)).items():
            _apply(cfg, key, value)
    for key, value in (overrides or {}).items():
        _apply(cfg, key, value)
    if cfg.model.base == "tiny":  # the keyword, as a path: what every reader of model.base loads
        cfg.model.base = str(SHIPPED_TINY_BASE)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Reject bad values and bad combinations, naming the keys."""
    problems = []
    if cfg.data.resolution % 8 != 0 or cfg.data.resolution < 32:
        problems.append(f"data.resolution={cfg.data.resolution}: must be a multiple of 8 and >= 32")
    if cfg.train.steps < 1:
        problems.append(f"train.steps={cfg.train.steps}: must be >= 1")
    if cfg.train.lr <= 0:
        problems.append(f"train.lr={cfg.train.lr}: must be > 0")
    if cfg.train.warmup_steps < 0:
        problems.append("train.warmup_steps: must be >= 0")
    if cfg.data.synth_target_shift < 0:
        problems.append(f"data.synth_target_shift={cfg.data.synth_target_shift}: must be >= 0")
    problems += _objective_problems(cfg)
    if cfg.model.merger_layers < 1 or cfg.model.merger_hidden < 1:
        problems.append("model.merger_layers / model.merger_hidden: must be >= 1")
    if cfg.model.env_input and cfg.model.env_tokens < 1:
        problems.append("model.env_tokens: FC with light_input=env needs >= 1 environment token (it is how the model "
                        "sees the light)")
    if cfg.model.variant == "fbc" and cfg.model.light_input != "env":
        problems.append(f"model.light_input={cfg.model.light_input}: applies to FC only (FBC sees the light in its "
                        "background); leave it at env")
    problems += _lora_problems(cfg.model)
    if cfg.train.keep < 0 or cfg.train.max_bad_steps < 0:
        problems.append("train.keep / train.max_bad_steps: must be >= 0")
    if cfg.logging.every < 1:
        problems.append("logging.every: must be >= 1")
    if cfg.data.skip_bad and cfg.data.cache == AUTO_CACHE:
        problems.append("data.skip_bad with data.cache=auto: the cache encodes every sample; remove or mend the bad "
                        "ones (python -m iclight_ds.data.validate DIR lists them), or leave data.cache unset")
    if cfg.data.buckets and cfg.data.cache:
        problems.append("data.buckets with data.cache: a latent cache holds one square size per sample; train "
                        "buckets from data.path, or the cache without buckets")
    if cfg.data.num_workers < 0:
        problems.append("data.num_workers: must be >= 0")
    if cfg.model.size == "full" and cfg.model.base is None and cfg.data.resolution < 256:
        problems.append("model.size=full with data.resolution < 256: the full SD1.5 UNet expects >= 256 px")
    for key, value in (("model.base", cfg.model.base), ("model.tokenizer", cfg.model.tokenizer),
                       ("model.iclight_weights", cfg.model.iclight_weights), ("data.path", cfg.data.path),
                       ("data.cache", None if cfg.data.cache == AUTO_CACHE else cfg.data.cache)):
        if value is not None and not Path(value).exists():
            problems.append(f"{key}={value}: no such file or folder")
    if cfg.model.vae not in ("auto", "random"):
        if cfg.model.base:
            problems.append(f"model.vae={cfg.model.vae}: with model.base the base's own VAE is used; leave model.vae "
                            "auto")
        elif cfg.model.vae == "tiny-4x" and cfg.model.size != "tiny":
            problems.append("model.vae=tiny-4x: the shipped 4x VAE is the tiny one; it needs model.size=tiny")
        elif cfg.model.vae != "tiny-4x" and not Path(cfg.model.vae).is_file():
            problems.append(f"model.vae={cfg.model.vae}: no such file (auto, tiny-4x, random, or a file written by "
                            "`python -m iclight_ds.tiny_vae`)")
    if cfg.model.iclight_weights and not cfg.model.base:
        problems.append("model.iclight_weights needs model.base: offsets are added to the base they were made from")
    if cfg.logging.preview_every < 0 or cfg.logging.preview_samples < 1 or cfg.logging.preview_steps < 1:
        problems.append("logging.preview_every >= 0, logging.preview_samples >= 1, logging.preview_steps >= 1")
    if cfg.logging.eval_every < 0 or cfg.logging.eval_samples < 1 or cfg.logging.eval_steps < 1:
        problems.append("logging.eval_every >= 0, logging.eval_samples >= 1, logging.eval_steps >= 1")
    if not 0 <= cfg.train.ema_decay < 1:
        problems.append(f"train.ema_decay={cfg.train.ema_decay}: must be in [0, 1) (0: off)")
    if cfg.train.checkpoint_every < 0 or cfg.train.checkpoint_minutes < 0:
        problems.append("train.checkpoint_every / train.checkpoint_minutes: must be >= 0 (0: no such cadence)")
    problems += _preview_image_problems(cfg)
    if cfg.logging.eval_data is not None and not Path(cfg.logging.eval_data).exists():
        problems.append(f"logging.eval_data={cfg.logging.eval_data}: no such folder")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def consistency_off_reason(cfg: RunConfig) -> str | None:
    """Why this run cannot train the light-transport consistency term although objective.lambda_consistency > 0, or
    None when it can (or the term is not asked for)."""
    if cfg.objective.lambda_consistency > 0 and cfg.model.variant == "fc" and cfg.model.light_input == "text":
        return ("model.light_input=text: the light is in the prompt, so there is no illumination input to split into "
                "complementary parts (the term needs eps(L1) and eps(L2)); objective.lambda_consistency is not used")
    return None


def encodes_once(cfg: RunConfig) -> bool:
    """data.cache=auto: the trainer writes the latent cache itself, and keeps the frozen encoders."""
    return cfg.data.cache == AUTO_CACHE


def builds_frozen_encoders(cfg: RunConfig) -> bool:
    """The run builds the VAE and text encoder: every run but one from a latent cache made beforehand."""
    return not cfg.data.cache or encodes_once(cfg)


def trains_consistency(cfg: RunConfig) -> bool:
    """The run evaluates the consistency term (three UNet rows per sample): asked for and possible."""
    return cfg.objective.lambda_consistency > 0 and consistency_off_reason(cfg) is None


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` (a YAML value or command-line text) as the type `hint`; ConfigError naming `key` when it is not one."""
    return _coerce(value, hint, key)


def to_dict(cfg: RunConfig) -> dict:
    """Nested plain dict (tuples as lists): what is saved beside every checkpoint."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    tmp.replace(path)


def read_resolved(folder: str | Path) -> dict:
    """The resolved record (RESOLVED_FILE) in `folder`: a run folder or a checkpoint; {} where there is none."""
    path = Path(folder) / RESOLVED_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); expected the JSON record the trainer writes") from e
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record


def field_docs(section_cls: type) -> dict[str, str]:
    """{field: its docstring}: the string literal under each field of a config dataclass (read from the source)."""
    tree = ast.parse(inspect.getsource(section_cls)).body[0]
    docs, previous = {}, None
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            previous = node.target.id
        elif previous and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[previous] = " ".join(str(node.value.value).split())
            previous = None
        else:
            previous = None
    return docs


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is tuple:
        return "(" + ", ".join(_type_name(a) for a in args) + ")"
    if origin is list:
        return f"list[{_type_name(args[0])}] (a,b or [\"a, with commas\", b])"
    return "none" if hint is type(None) else getattr(hint, "__name__", str(hint))


def help_text() -> str:
    """Every config key with its type, default and one-line doc, generated from the dataclasses above."""
    lines = ["config keys (override with --section.key VALUE, or set them in a YAML/JSON --config file):"]
    defaults = RunConfig()
    for section in dataclasses.fields(RunConfig):
        cls = type(getattr(defaults, section.name))
        hints, docs = _section_hints(cls), field_docs(cls)
        lines.append(f"\n{section.name}:")
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section.name), f.name)
            lines.append(f"  --{section.name}.{f.name} {_type_name(hints[f.name])}  (default: {default!r})")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


def _objective_problems(cfg: RunConfig) -> list[str]:
    """The objective section's bad values and combinations, naming the keys."""
    problems = []
    obj = cfg.objective
    if obj.lambda_vanilla < 0 or obj.lambda_consistency < 0:
        problems.append("objective.lambda_vanilla / objective.lambda_consistency: must be >= 0")
    if obj.lambda_vanilla == 0 and obj.lambda_consistency == 0:
        problems.append("objective.lambda_vanilla and objective.lambda_consistency are both 0: nothing to train")
    if obj.consistency == "linear" and not builds_frozen_encoders(cfg):
        problems.append(f"objective.consistency=linear decodes with the frozen VAE, which a run from the latent cache "
                        f"data.cache={cfg.data.cache} does not build; use data.cache=auto (or none), or another "
                        "objective.consistency")
    if obj.linear_samples < 0:
        problems.append(f"objective.linear_samples={obj.linear_samples}: must be >= 0 (0: every sample)")
    if not 0 <= obj.consistency_min_timestep < NUM_TIMESTEPS:
        problems.append(f"objective.consistency_min_timestep={obj.consistency_min_timestep}: must be in "
                        f"[0, {NUM_TIMESTEPS}) (0: every sample)")
    if obj.snr_gamma < 0:
        problems.append("objective.snr_gamma: must be >= 0 (0 disables Min-SNR weighting)")
    if obj.split_cells < 1:
        problems.append("objective.split_cells: must be >= 1")
    return problems


def _lora_problems(model_cfg: ModelConfig) -> list[str]:
    if model_cfg.lora_rank < 0:
        return [f"model.lora_rank={model_cfg.lora_rank}: must be >= 0 (0: full fine-tune)"]
    if model_cfg.lora_rank == 0:
        return []
    problems = []
    if model_cfg.lora_alpha is not None and model_cfg.lora_alpha <= 0:
        problems.append(f"model.lora_alpha={model_cfg.lora_alpha}: must be > 0 (or null: equal to model.lora_rank)")
    if not model_cfg.lora_targets:
        problems.append("model.lora_targets is empty: LoRA needs at least one target layer")
    if "conv_in" in model_cfg.lora_targets:
        problems.append("model.lora_targets: conv_in always trains in full (its extra input channels start at zero); "
                        "leave it out")
    return problems


def _preview_image_problems(cfg: RunConfig) -> list[str]:
    """logging.preview_images and the lists that go with them: files that exist, one entry each or one for all."""
    log_cfg, problems = cfg.logging, []
    images = log_cfg.preview_images
    lists = {"logging.preview_prompts": log_cfg.preview_prompts}
    if cfg.model.variant == "fbc":
        lists["logging.preview_backgrounds"] = log_cfg.preview_backgrounds
    else:
        lists["logging.preview_envs"] = log_cfg.preview_envs
    for key, paths in (("logging.preview_images", images), ("logging.preview_backgrounds",
                                                            log_cfg.preview_backgrounds),
                       ("logging.preview_envs", log_cfg.preview_envs)):
        problems += [f"{key}: {p}: no such file" for p in paths if not Path(p).is_file()]
    if not images:
        return problems
    for key, values in lists.items():
        needed = key != "logging.preview_prompts"  # a prompt may be left out (empty); the light may not
        if len(values) not in (len(images), 1) and (values or needed):
            problems.append(f"{key}: {len(values)} given for {len(images)} logging.preview_images (one each, or one "
                            "for all)")
    return problems
