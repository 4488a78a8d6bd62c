"""swa_fast behind the averaging APIs people already use: one import swap each.

* :mod:`swa_fast.integrations.lightning`: Lightning's ``WeightAveraging``,
  ``EMAWeightAveraging`` and ``StochasticWeightAveraging`` callbacks;
* :mod:`swa_fast.integrations.timm`: timm's ``ModelEmaV3``;
* :mod:`swa_fast.integrations.diffusers`: diffusers' ``EMAModel``.

Each module imports its package when it is imported itself (nothing here does), so swa_fast
needs none of them.
"""
