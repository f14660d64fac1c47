"""Drop known-harmless third-party start-up messages at their source, and nothing else.

A default run used to open with lines that say nothing about it:

- diffusers (`diffusers.models.modeling_utils`, on every `model.to(dtype)`): "There are modules in UNet2DConditionModel
  that should be kept in float32: []." -- an empty list, i.e. there are none;
- bitsandbytes (`bitsandbytes.backends.cpu.ops`, at import on AVX512-BF16 CPUs): "Failed to load CPU gemm_4bit_forward
  from kernels-community: No module named 'kernels'" -- an optional 4-bit CPU kernel this trainer never uses;
- transformers (`transformers.utils.import_utils`): "`SiglipImageProcessor` requires torchvision (not installed);
  falling back to `SiglipImageProcessorPil` ..." (and the same for CLIP and other image processors) -- diffusers
  touches those classes at import; this trainer uses none of them.

Each is matched by the emitting logger's name and the message text, so the same loggers' other records, every other
logger and all warnings still show. `install()` runs from `iclight_ds/__init__.py`, before any of these libraries is
imported. ICLIGHT_DS_VERBOSE=1 in the environment keeps them.
"""

from __future__ import annotations

import logging
import os
import re

# logger name -> message patterns (re.search on the formatted message) dropped from that logger only
LOG_RECORDS: dict[str, tuple[str, ...]] = {
    "diffusers.models.modeling_utils": (r"^There are modules in \w+ that should be kept in float32: \[\]\.",),
    "bitsandbytes.backends.cpu.ops": (
        r"^Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'",
    ),
    "transformers.utils.import_utils": (r"^`\w+` requires torchvision \(not installed\); falling back to `\w+`",),
}


class _DropMessages(logging.Filter):
    """Drops a logger's records whose message matches one of the patterns; passes all others."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = tuple(re.compile(p) for p in patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to hide
            return True
        return not any(p.search(message) for p in self.patterns)


def install() -> None:
    """Attach the filters to the emitting loggers (idempotent). The loggers need not exist yet: a library's
    later `logging.getLogger(name)` returns the same logger object, filter included."""
    if os.environ.get("ICLIGHT_DS_VERBOSE", "").strip() not in ("", "0"):
        return
    for name, patterns in LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
