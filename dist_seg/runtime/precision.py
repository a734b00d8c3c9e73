"""Mixed precision shared by training, evaluation and prediction: config key train.amp -> autocast dtype."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """torch.autocast for `dtype` on `device`; a null context when dtype is None (train.amp=off)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
