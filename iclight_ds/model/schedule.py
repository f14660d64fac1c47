"""The SD1.5 noise schedule (IC-Light keeps it), for training and for sampling: 1000 steps, scaled_linear betas
0.00085 -> 0.012, epsilon prediction. The one place these numbers live, but the step count: config.NUM_TIMESTEPS,
which the config's validation checks timesteps against."""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
)

from ..config import NUM_TIMESTEPS

SD15_SCHEDULE = dict(num_train_timesteps=NUM_TIMESTEPS, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", prediction_type="epsilon")
DEFAULT_SAMPLER = "dpmpp_2m_sde_karras"  # the official demo's
SAMPLERS = ("dpmpp_2m_sde_karras", "dpmpp_2m_karras", "euler_a", "ddim")


def alphas_cumprod() -> torch.Tensor:
    """(NUM_TIMESTEPS,) cumulative products of 1 - beta: what the training objective noises with."""
    return DDPMScheduler(**SD15_SCHEDULE).alphas_cumprod.clone()


def make_scheduler(name: str = DEFAULT_SAMPLER):
    """A diffusers sampling scheduler on the SD1.5 schedule; the default is the demo's DPM++ 2M SDE Karras."""
    common = dict(SD15_SCHEDULE, steps_offset=1)
    if name == "dpmpp_2m_sde_karras":
        return DPMSolverMultistepScheduler(**common, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", use_karras_sigmas=True)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler(**common)
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    raise ValueError(f"unknown sampler {name!r}; one of {SAMPLERS}")
