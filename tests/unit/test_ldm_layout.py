"""The `ldm` export's keys and shapes for the full SD1.5 UNet (conv_in widened to 8 or 12 channels), against the
original LDM UNet layout written out here from the architecture itself, not from any converter.

The layout (the original `openaimodel.UNetModel` of Stable Diffusion 1.x, as in every SD1.5 single-file checkpoint):
  time_embed.0 / .2         Linear 320 -> 1280 -> 1280
  input_blocks.0.0          Conv2d C_in -> 320, 3x3
  input_blocks.1-11         per level (320, 640, 1280, 1280): two ResBlocks (each followed by a SpatialTransformer on
                            the first three levels), then, except at the last level, a Downsample (`.0.op`, Conv2d
                            stride 2)
  middle_block.0 / .1 / .2  ResBlock, SpatialTransformer, ResBlock at 1280
  output_blocks.0-11        per level, deepest first: three ResBlocks over the concatenated skip features (each
                            followed by a SpatialTransformer on the last three levels), then, except at the last level,
                            an Upsample (`.conv`, Conv2d 3x3) after them
  out.0 / out.2             GroupNorm(320), Conv2d 320 -> 4, 3x3
  ResBlock(i -> o):         in_layers.0 GroupNorm(i), in_layers.2 Conv i -> o 3x3, emb_layers.1 Linear 1280 -> o,
                            out_layers.0 GroupNorm(o), out_layers.3 Conv o -> o 3x3, skip_connection Conv 1x1 if i != o
  SpatialTransformer(c):    norm GroupNorm(c), proj_in / proj_out Conv 1x1, one transformer block: attn1 (self) and
                            attn2 (cross, keys/values from the 768-wide text tokens) with to_q/to_k/to_v (no bias) and
                            to_out.0, ff.net.0.proj (GEGLU: c -> 2 x 4c) and ff.net.2 (4c -> c), norm1-3 LayerNorm(c)
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from iclight_ds.model import formats as fmt
from iclight_ds.model.arch import SD15_UNET
from iclight_ds.train.export import DEFAULT_LDM_PREFIX, build_parser

WIDTHS = (320, 640, 1280, 1280)
TIME, TEXT = 1280, 768


def _conv(name: str, c_in: int, c_out: int, k: int) -> dict:
    return {f"{name}.weight": (c_out, c_in, k, k), f"{name}.bias": (c_out,)}


def _linear(name: str, c_in: int, c_out: int, bias: bool = True) -> dict:
    return {f"{name}.weight": (c_out, c_in), **({f"{name}.bias": (c_out,)} if bias else {})}


def _norm(name: str, c: int) -> dict:
    return {f"{name}.weight": (c,), f"{name}.bias": (c,)}


def _resblock(p: str, c_in: int, c_out: int) -> dict:
    keys = {**_norm(f"{p}.in_layers.0", c_in), **_conv(f"{p}.in_layers.2", c_in, c_out, 3),
            **_linear(f"{p}.emb_layers.1", TIME, c_out),
            **_norm(f"{p}.out_layers.0", c_out), **_conv(f"{p}.out_layers.3", c_out, c_out, 3)}
    if c_in != c_out:
        keys.update(_conv(f"{p}.skip_connection", c_in, c_out, 1))
    return keys


def _transformer(p: str, c: int) -> dict:
    b = f"{p}.transformer_blocks.0"
    keys = {**_norm(f"{p}.norm", c), **_conv(f"{p}.proj_in", c, c, 1), **_conv(f"{p}.proj_out", c, c, 1)}
    for attn, context in (("attn1", c), ("attn2", TEXT)):
        keys.update(_linear(f"{b}.{attn}.to_q", c, c, bias=False))
        keys.update(_linear(f"{b}.{attn}.to_k", context, c, bias=False))
        keys.update(_linear(f"{b}.{attn}.to_v", context, c, bias=False))
        keys.update(_linear(f"{b}.{attn}.to_out.0", c, c))
    keys.update(_linear(f"{b}.ff.net.0.proj", c, 8 * c))
    keys.update(_linear(f"{b}.ff.net.2", 4 * c, c))
    for i in (1, 2, 3):
        keys.update(_norm(f"{b}.norm{i}", c))
    return keys


def expected_sd15_ldm_unet(in_channels: int) -> dict[str, tuple[int, ...]]:
    """Bare LDM key -> shape of the SD1.5 UNet with `in_channels` inputs, from the layout in the module docstring."""
    keys = {**_linear("time_embed.0", WIDTHS[0], TIME), **_linear("time_embed.2", TIME, TIME),
            **_conv("input_blocks.0.0", in_channels, WIDTHS[0], 3)}
    skips = [WIDTHS[0]]  # channels of each input block's output, consumed in reverse by the output blocks
    block, c = 1, WIDTHS[0]
    for level, width in enumerate(WIDTHS):
        for _ in range(2):
            keys.update(_resblock(f"input_blocks.{block}.0", c, width))
            c = width
            if level < 3:
                keys.update(_transformer(f"input_blocks.{block}.1", c))
            skips.append(c)
            block += 1
        if level < 3:
            keys.update(_conv(f"input_blocks.{block}.0.op", c, c, 3))
            skips.append(c)
            block += 1
    keys.update({**_resblock("middle_block.0", c, c), **_transformer("middle_block.1", c),
                 **_resblock("middle_block.2", c, c)})
    block = 0
    for level, width in enumerate(reversed(WIDTHS)):
        for i in range(3):
            keys.update(_resblock(f"output_blocks.{block}.0", c + skips.pop(), width))
            c = width
            has_attention = level > 0
            if has_attention:
                keys.update(_transformer(f"output_blocks.{block}.1", c))
            if i == 2 and level < 3:
                keys.update(_conv(f"output_blocks.{block}.{2 if has_attention else 1}.conv", c, c, 3))
            block += 1
    keys.update({**_norm("out.0", c), **_conv("out.2", c, 4, 3)})
    assert block == 12 and not skips
    return keys


def test_the_written_layout_has_the_known_size():
    """686 tensors and 859.5M parameters at 4 input channels (DOMAIN.md; the Forge report's '0 of 686 patches')."""
    layout = expected_sd15_ldm_unet(4)
    assert len(layout) == 686
    assert sum(torch.Size(s).numel() for s in layout.values()) == 859_520_964


@pytest.mark.parametrize("in_channels", [8, 12], ids=["fc", "fbc"])
def test_ldm_export_keys_and_shapes_are_the_sd15_ldm_layout(in_channels):
    with torch.device("meta"):  # full size, no memory
        unet = UNet2DConditionModel(**dict(SD15_UNET, in_channels=in_channels))
    ours = fmt.unet_to_ldm(unet.state_dict(), unet.config, prefix=DEFAULT_LDM_PREFIX)
    got = {k: tuple(v.shape) for k, v in ours.items()}
    want = expected_sd15_ldm_unet(in_channels)
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}
    assert got["input_blocks.0.0.weight"] == (320, in_channels, 3, 3)


def test_the_ldm_default_is_bare_keys():
    """The layout of the published *_unet_ldm files: no prefix, on the command line and in the functions."""
    assert DEFAULT_LDM_PREFIX == ""
    assert build_parser().parse_args(["--run", "r"]).ldm_prefix == ""
    assert fmt.detect_unet_ldm_prefix(expected_sd15_ldm_unet(8)) == ""
