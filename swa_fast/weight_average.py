"""``from swa_fast.weight_average import WeightAverage`` keeps working: the class lives in
:mod:`swa_fast.averaging.weight_average`, the averaging core."""

from swa_fast.averaging.weight_average import WeightAverage

__all__ = ["WeightAverage"]
