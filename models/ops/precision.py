"""Precision helpers shared by the ops."""

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 when it is in a lower precision (autocast's bf16/fp16), else unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
