"""Pure-torch float64 reference of the distance op."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor


def distance_reference(a: List[Tensor], b: Optional[List[Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """Per-tensor L2 norms of ``a[i] - b[i]`` (of ``a[i]``) and of the whole list, in float64 on the CPU."""
    sums = []
    for i, x in enumerate(a):
        d = x.detach().double().cpu()
        if b is not None:
            d = d - b[i].detach().double().cpu()
        sums.append((d * d).sum())
    sums = torch.stack(sums)
    return sums.sqrt(), sums.sum().sqrt()
