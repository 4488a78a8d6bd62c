"""swa_fast behind the averaging APIs people already use: one import swap each.

* :mod:`swa_fast.integrations.lightning`: Lightning's ``WeightAveraging``,
  ``EMAWeightAveraging`` and ``StochasticWeightAveraging`` callbacks;
* :mod:`swa_fast.integrations.timm`: timm's ``ModelEmaV3``;
* :mod:`swa_fast.integrations.diffusers`: diffusers' ``EMAModel``.

The Lightning and diffusers modules import their package when they are imported themselves
(nothing here does); the timm drop-in needs only torch (its state dict is timm's layout). So
swa_fast itself needs none of these packages.
"""
