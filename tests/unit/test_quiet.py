"""iclight_ds.quiet: the known-harmless third-party start-up lines are gone, everything else still shows."""

import logging
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# what the silenced lines say: diffusers, bitsandbytes, transformers' torchvision fallbacks (filtered by
# iclight_ds.quiet), and wandb's reinit deprecation (avoided: the trainer passes reinit as a string)
SILENCED = (
    "should be kept in float32: []",
    "Failed to load CPU gemm_4bit_forward from kernels-community",
    "requires torchvision (not installed); falling back to",
    "Using a boolean value for 'reinit' is deprecated",
)

SCRIPT = """
import logging, warnings
import torch
import iclight_ds.model.arch, iclight_ds.infer.sampling
from diffusers import AutoencoderKL

# diffusers logs "... should be kept in float32: []" on every model.to(dtype)
AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4).to(torch.bfloat16)
# the same loggers' other records, our own loggers and warnings from any module still show
logging.getLogger("diffusers.models.modeling_utils").warning("diffusers-other-record")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("bitsandbytes-other-record")
logging.getLogger("iclight_ds.train.trainer").warning("our-own-log-record")
warnings.warn("our-own-warning", UserWarning)
warnings.warn_explicit("third-party-warning", UserWarning, "site-packages/other/mod.py", 1, module="other.mod")
"""


def test_import_and_cast_print_none_of_the_silenced_lines():
    env = {k: v for k, v in os.environ.items() if k != "ICLIGHT_DS_VERBOSE"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    for line in SILENCED:
        assert line not in out, f"{line!r} still printed:\n{out}"
    for shown in ("diffusers-other-record", "bitsandbytes-other-record", "our-own-log-record", "our-own-warning",
                  "third-party-warning"):
        assert shown in out, f"{shown!r} was silenced too:\n{out}"


def test_filters_drop_only_the_matching_records():
    from iclight_ds.quiet import install

    install()  # idempotent: importing iclight_ds already did

    logger = logging.getLogger("transformers.utils.import_utils")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("`SiglipImageProcessor` requires torchvision (not installed); falling back to "
                       "`SiglipImageProcessorPil` for backward compatibility.")
        logger.warning("`SiglipImageProcessor` needs something else")
    finally:
        logger.removeHandler(handler)
    assert seen == ["`SiglipImageProcessor` needs something else"]


WANDB_SCRIPT = """
import sys
from pathlib import Path
from iclight_ds.config import RunConfig
from iclight_ds.train.metrics import MetricsWriter

writer = MetricsWriter(Path(sys.argv[1]) / "metrics.jsonl", RunConfig(), enabled=True)
assert writer.wandb is not None
writer.write({"step": 1, "loss": 1.0})
writer.close()
"""


def test_the_trainers_wandb_run_starts_without_a_deprecation(tmp_path):
    """The trainer's wandb.init (offline) passes reinit as a string: a boolean is deprecated."""
    env = {k: v for k, v in os.environ.items() if k != "ICLIGHT_DS_VERBOSE"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", WANDB_SCRIPT, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert SILENCED[-1] not in out, out
