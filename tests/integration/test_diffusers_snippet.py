"""The diffusers snippet of docs/weights-and-export.md, run as written on a tiny `--format diffusers` export: its
hooked UNet forward inside diffusers' own StableDiffusionPipeline gives the image our reference wrapper
(iclight_ds.infer.sampling.ConcatConditionUNet) gives with the same scheduler, noise and prompt, for an FBC export
and, with the env block, for an FC that sees the light through its environment encoder."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_parts, write_pipeline_folder
from iclight_ds.config import ModelConfig
from iclight_ds.infer.sampling import ConcatConditionUNet, _env_tokens, prompt_embeddings
from iclight_ds.model.base import BaseModel, unet_hash
from iclight_ds.model.iclight import build_iclight_model, env_encoder_from_state
from iclight_ds.model.schedule import make_scheduler
from iclight_ds.train.export import export_formatted, split_state_dict

DOC = Path(__file__).resolve().parents[2] / "docs" / "weights-and-export.md"
PROMPT = "a red cube, light from the left"


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny UNet is far too small to gain from threads; on a loaded 2-core machine two made each call 25x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def doc_snippet(name: str) -> str:
    """The ```python block that follows `<!-- snippet: NAME -->` in the docs page."""
    m = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```python\n(.*?)\n```", DOC.read_text(), re.S)
    assert m, f"no snippet {name!r} in {DOC}"
    return m[1]


def _export_and_base(tmp_path: Path, variant: str):
    """A tiny base as a diffusers pipeline folder (deterministic DDIM scheduler), a 'trained' model exported with
    --format diffusers from it, and the trained model itself."""
    base_unet, vae, text_encoder, tokenizer = parts = tiny_parts(seed=0)
    for module in (base_unet, vae, text_encoder):
        module.eval()
    write_pipeline_folder(tmp_path / "base", parts)
    model = build_iclight_model(ModelConfig(variant=variant), unet=copy.deepcopy(base_unet))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # away from the base, conv_in's condition channels included
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    trained, small = split_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    base = BaseModel(base_unet, vae, text_encoder, tokenizer, "tiny test base", unet_hash(base_unet.state_dict()))
    export_formatted(trained, small, fmt_name="diffusers", out=tmp_path / "unet_diffusers", base=base, step=1,
                     config={"model": {"variant": variant}})
    return model.eval(), base


def _inputs(variant: str) -> dict:
    g = torch.Generator().manual_seed(2)
    images = [torch.rand(1, 3, 64, 64, generator=g) * 2 - 1 for _ in range(1 if variant == "fc" else 2)]
    return dict(prompt=PROMPT, images=images, env=torch.rand(1, 3, 16, 32, generator=g) * 4)


def _reference(model, base, namespace, prompt_embeds=None, negative_embeds=None):
    """The same sampling through our own wrapper of the trained UNet (not the exported files)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=ConcatConditionUNet(model.unet), scheduler=make_scheduler("ddim"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    text = dict(prompt=PROMPT) if prompt_embeds is None else dict(prompt_embeds=prompt_embeds,
                                                                   negative_prompt_embeds=negative_embeds)
    return pipe(**text, latents=namespace["latents"], **namespace["size"], num_inference_steps=25,
                cross_attention_kwargs={"concat_conds": namespace["conds"]}).images[0]


def _assert_same_image(got, want):
    got, want = np.asarray(got, dtype=np.int16), np.asarray(want, dtype=np.int16)
    assert got.shape == want.shape == (64, 64, 3)
    assert np.abs(got - want).max() <= 1
    assert got.std() > 1  # an image, not a constant


def test_snippet_relights_an_fbc_export(tmp_path):
    model, base = _export_and_base(tmp_path, "fbc")
    namespace = dict(export_dir=str(tmp_path / "unet_diffusers"), base_dir=str(tmp_path / "base"), **_inputs("fbc"))
    exec(doc_snippet("diffusers-export"), namespace)
    unet = namespace["pipe"].unet
    assert unet.config.in_channels == 12
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in model.unet.state_dict().items())
    assert namespace["conds"].shape == (1, 8, 8, 8)  # foreground + background latents
    _assert_same_image(namespace["image"], _reference(model, base, namespace))
    # the hooked forward feeds the conditions to conv_in: other condition latents, another prediction
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        a, b = (unet(x, 500, text, cross_attention_kwargs={"concat_conds": c}).sample
                for c in (namespace["conds"], -namespace["conds"]))
        want = model.unet(torch.cat([x, namespace["conds"].repeat(2, 1, 1, 1)], 1), 500, text).sample
    torch.testing.assert_close(a, want)
    assert (a - b).abs().max() > 1e-3


def test_snippet_with_the_env_block_relights_an_env_fc_export(tmp_path):
    model, base = _export_and_base(tmp_path, "fc")
    namespace = dict(export_dir=str(tmp_path / "unet_diffusers"), base_dir=str(tmp_path / "base"), **_inputs("fc"))
    exec(doc_snippet("diffusers-export"), namespace)
    exec(doc_snippet("diffusers-export-env"), namespace)
    assert namespace["pipe"].unet.config.in_channels == 8
    env_encoder = env_encoder_from_state(model.small_modules_state())
    tokens = _env_tokens(env_encoder, namespace["env"])
    embeds = prompt_embeddings(base.text_encoder, base.tokenizer, [PROMPT], tokens)
    negative = prompt_embeddings(base.text_encoder, base.tokenizer, [""], tokens)
    assert embeds.shape[1] == base.tokenizer.model_max_length + model.env_encoder.tokens
    _assert_same_image(namespace["image"], _reference(model, base, namespace, embeds, negative))


@pytest.mark.parametrize("name", ["diffusers-export", "diffusers-export-env"])
def test_snippets_are_short(name):
    assert len([line for line in doc_snippet(name).splitlines() if line.strip()]) <= 16
