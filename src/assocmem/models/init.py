"""Initialisation shared by the model families."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def linear_init(shape: Sequence[int], fan_in: int, g: torch.Generator) -> Tensor:
    """PyTorch's default nn.Linear weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from ``g``."""
    return (torch.rand(*shape, generator=g) * 2 - 1) / math.sqrt(fan_in)
