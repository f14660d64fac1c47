"""The one map between precision names (config values, file metadata) and torch dtypes."""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """'bf16', 'fp16' or 'fp32' for one of DTYPES' values."""
    return {v: k for k, v in DTYPES.items()}[dtype]
