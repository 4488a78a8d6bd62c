"""SWAG (Maddox et al., "A Simple Baseline for Bayesian Uncertainty in Deep Learning", NeurIPS 2019):
a Gaussian over the SGD iterates, collected in one fused pass, sampled on the device.

::

    from swa_fast.swag import SWAG, bma_predict
    swag = SWAG(model, max_rank=20)
    for epoch in range(swa_start, epochs):
        train_one_epoch(model)
        swag.collect(model)                      # mean, variance, deviation column: one fused pass
    with swag.sampled_into(model, scale=0.5, cov=True, generator=g):
        ...                                      # one sample in the model, restored on exit
    probs = bma_predict(swag, model, test_loader, n_samples=30, bn_loader=train_loader, scale=0.5)

The metrics the paper reports (accuracy, NLL, expected calibration error, reliability diagrams)
are :mod:`swa_fast.swag.metrics`.
"""

from swa_fast.swag.bma import MultiSWAG, bma_predict
from swa_fast.swag.metrics import (
    CalibrationBins,
    accuracy,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_diagram,
)
from swa_fast.swag.swag import SWAG

__all__ = [
    "CalibrationBins",
    "MultiSWAG",
    "SWAG",
    "accuracy",
    "bma_predict",
    "calibration_bins",
    "classification_metrics",
    "expected_calibration_error",
    "negative_log_likelihood",
    "reliability_diagram",
]
