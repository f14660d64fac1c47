"""LoRA on the SD1.5 UNet through peft, and the layouts LoRA weights are written in.

`add_lora` puts peft LoRA layers on the UNet's target modules in place (model.lora_rank / lora_alpha /
lora_targets) and leaves trainable only the LoRA matrices and the widened `conv_in`, whose extra input channels start
at zero and must learn in full. Everything else here is a pure function on state dicts:

* peft's keys: `<module>.base_layer.weight` (the frozen weight), `<module>.lora_A.default.weight` (down, (r, in) or
  (r, in, k, k)) and `<module>.lora_B.default.weight` (up, (out, r) or (out, r, 1, 1)); the update is
  `scale * up @ down` with `scale = alpha / r` (peft's LoRA, without rsLoRA or DoRA);
* the kohya / ComfyUI layout: `lora_unet_<module path, dots as underscores>.lora_down.weight`, `.lora_up.weight`
  (the same tensors) and `.alpha` (a scalar), the module path in LDM names (`input_blocks.1.1.proj_in`, what ComfyUI
  and single-file tools name the UNet's layers) or in diffusers names (`down_blocks.0.attentions.0.proj_in`, what
  kohya's SD1.5 scripts and diffusers' loader use).
"""

from __future__ import annotations

import contextlib
import re
from typing import Mapping

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from . import formats as fmt

ADAPTER = "default"  # peft's adapter name, part of every LoRA key: '<module>.lora_A.default.weight'
KOHYA_PREFIX = "lora_unet_"
LAYOUTS = ("ldm", "diffusers")  # module names of a kohya-layout file (see the module docstring)
# The trained modules that LoRA does not cover: the widened conv_in, in full
FULL_MODULES = ("conv_in",)
_PEFT_KEY = re.compile(rf"(.+)\.lora_([AB])\.{ADAPTER}\.weight")
_KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


class LoraError(ValueError):
    """LoRA settings or weights that do not fit the UNet; the message names the targets or keys."""


def target_modules(unet: nn.Module, targets: list[str]) -> list[str]:
    """The names of the UNet's Linear and Conv2d modules that `targets` select: a module is selected when its name is a
    target or ends with '.' + a target (peft's rule), e.g. 'to_q' selects every attention's query projection.
    conv_in is never selected (it trains in full). A target that selects nothing is refused by name."""
    layers = {name: m for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    chosen, unmatched = [], []
    for target in targets:
        if target in FULL_MODULES:
            raise LoraError(f"model.lora_targets: {target!r} trains in full (IC-Light's widened input channels start "
                            "at zero); leave it out of the LoRA targets")
        hits = [n for n in layers if (n == target or n.endswith("." + target)) and n not in FULL_MODULES]
        if not hits:
            unmatched.append(target)
        chosen += [n for n in hits if n not in chosen]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] if not n[-1].isdigit() else ".".join(n.split(".")[-2:])
                         for n in layers})
        raise LoraError(f"model.lora_targets: {unmatched} match no Linear or Conv2d module of the UNet; module names "
                        f"end in e.g. {leaves[:16]}")
    return chosen


def add_lora(unet: nn.Module, *, rank: int, alpha: float, targets: list[str], gather=contextlib.nullcontext
             ) -> list[str]:
    """Put peft LoRA layers (rank `rank`, scale alpha / rank) on the selected modules of `unet`, in place, and leave
    only them and conv_in trainable. The LoRA up matrices start at zero (peft's default), so the UNet computes what it
    computed before. The down matrices draw from torch's global RNG: seed it first for identical ranks. Returns the
    names of the modules that got LoRA layers.

    `gather(params)` is a context in which `params` have their whole shapes (peft sizes the LoRA layers from them);
    partitioned-parameter schemes such as ZeRO-3 pass one that gathers them, read-only."""
    if rank < 1:
        raise LoraError(f"model.lora_rank={rank}: LoRA needs a rank >= 1 (0 is a full fine-tune)")
    names = target_modules(unet, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0, bias="none",
                        init_lora_weights=True)
    with gather([unet.get_submodule(n).weight for n in names]):
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    for name, param in unet.named_parameters():
        param.requires_grad_(".lora_" in name or name.split(".", 1)[0] in FULL_MODULES)
    return names


def lora_parameter_count(unet: nn.Module, *, rank: int, targets: list[str]) -> int:
    """Parameters the LoRA layers of `add_lora` would add (r x (in x k x k + out) per module); `unet` may live on the
    meta device."""
    total = 0
    for name in target_modules(unet, targets):
        layer = unet.get_submodule(name)
        if isinstance(layer, nn.Linear):
            total += rank * (layer.in_features + layer.out_features)
        else:
            kh, kw = layer.kernel_size
            total += rank * (layer.in_channels * kh * kw + layer.out_channels)
    return total


# ---------------------------------------------------------------------------------------------------------
# peft state dicts


def is_lora_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a UNet state dict holds peft LoRA layers ('<module>.lora_A.default.weight')."""
    return any(_PEFT_KEY.fullmatch(k) for k in state)


def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (down, up)} of a peft UNet state dict."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _PEFT_KEY.fullmatch(key)
        if m:
            found.setdefault(m[1], {})[m[2]] = value
    broken = sorted(k for k, v in found.items() if set(v) != {"A", "B"})
    if broken:
        raise LoraError(f"LoRA layers without both lora_A and lora_B weights: {broken[:5]}")
    return {k: (v["A"], v["B"]) for k, v in found.items()}


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight update of one LoRA layer, fp32: scale x up @ down, shaped as the layer's weight.
    down (r, in) or (r, in, kh, kw); up (out, r) or (out, r, 1, 1) -> (out, in) or (out, in, kh, kw)."""
    if up.dim() == 4 and up.shape[2:] != (1, 1):
        raise LoraError(f"a LoRA up weight of shape {tuple(up.shape)}: expected (out, r, 1, 1) for a convolution")
    delta = up.flatten(1).float() @ down.flatten(1).float()  # (out, in x kh x kw)
    return scale * delta.view(up.shape[0], *down.shape[1:])


def merge_lora(state: Mapping[str, torch.Tensor], *, alpha: float) -> dict[str, torch.Tensor]:
    """A peft UNet state dict -> the plain UNet state dict it computes: every LoRA layer's base weight plus its update
    (scale alpha / r), fp32 where merged; other tensors as they are, under their plain names."""
    pairs = lora_pairs(state)
    out = {k.replace(".base_layer.", "."): v for k, v in state.items() if not _PEFT_KEY.fullmatch(k)}
    for module, (down, up) in pairs.items():
        key = f"{module}.weight"
        out[key] = out[key].float() + lora_delta(down, up, alpha / down.shape[0])
    return out


# ---------------------------------------------------------------------------------------------------------
# The kohya / ComfyUI layout


def kohya_name(module: str, unet_config: Mapping, layout: str = "ldm") -> str:
    """'lora_unet_' + the module's path with dots as underscores, in LDM or diffusers names."""
    if layout not in LAYOUTS:
        raise LoraError(f"LoRA key layout {layout!r}: one of {LAYOUTS}")
    path = module if layout == "diffusers" else fmt.unet_key_to_ldm(f"{module}.weight", unet_config)[: -len(".weight")]
    return KOHYA_PREFIX + path.replace(".", "_")


def to_kohya(state: Mapping[str, torch.Tensor], unet_config: Mapping, *, alpha: float,
             layout: str = "ldm") -> dict[str, torch.Tensor]:
    """The LoRA layers of a peft UNet state dict in the kohya layout: lora_down, lora_up and alpha per module."""
    out = {}
    for module, (down, up) in lora_pairs(state).items():
        name = kohya_name(module, unet_config, layout)
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    if not out:
        raise LoraError("the state dict holds no LoRA layers")
    return out


def kohya_modules(unet_config: Mapping) -> dict[str, str]:
    """{kohya name (both layouts): diffusers module} for every Linear and Conv2d layer of a UNet with `unet_config`
    (built on the meta device)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    names = {}
    for module, layer in unet.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            for layout in LAYOUTS:
                names[kohya_name(module, unet_config, layout)] = module
    return names


def from_kohya(lora: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, tuple[torch.Tensor, torch.Tensor,
                                                                                          float]]:
    """A kohya-layout LoRA file's tensors -> {diffusers module: (down, up, alpha)}, checked against the UNet that
    `unet_config` describes: keys that name no module of it, or that are not lora_down / lora_up / alpha, are refused
    by name. A module without alpha gets alpha = its rank (scale 1), as kohya's loaders do."""
    modules = kohya_modules(unet_config)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in lora.items():
        name, _, part = key.partition(".")
        if part not in _KOHYA_PARTS or name not in modules:
            unknown.append(key)
        else:
            grouped.setdefault(name, {})[part] = value
    if unknown:
        raise LoraError(f"{len(unknown)} LoRA key(s) match no layer of this UNet (expected lora_unet_<layer>."
                        f"lora_down.weight / .lora_up.weight / .alpha), e.g. {sorted(unknown)[:5]}")
    out = {}
    for name, parts in grouped.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise LoraError(f"LoRA layer {name}: needs both lora_down.weight and lora_up.weight, has {sorted(parts)}")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(down.shape[0])
        module = modules[name]
        if module in out:
            raise LoraError(f"LoRA layer {module} appears twice (in LDM and in diffusers names)")
        out[module] = (down, up, alpha)
    return out


def apply_kohya(base: Mapping[str, torch.Tensor], modules: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]
                ) -> dict[str, torch.Tensor]:
    """`base` (a plain diffusers UNet state dict) with each LoRA layer's update added (fp32 where added); a layer
    whose shapes do not fit its weight is refused by name."""
    out = dict(base)
    for module, (down, up, alpha) in modules.items():
        key = f"{module}.weight"
        weight = out[key]
        if up.shape[0] != weight.shape[0] or down.shape[1:] != weight.shape[1:] or up.shape[1] != down.shape[0]:
            raise LoraError(f"LoRA layer {module}: down {tuple(down.shape)} and up {tuple(up.shape)} do not fit its "
                            f"weight {tuple(weight.shape)}")
        out[key] = weight.float() + lora_delta(down, up, alpha / down.shape[0])
    return out
