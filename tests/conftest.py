"""Shared fixtures. GPU tests carry @pytest.mark.cuda and skip without a GPU."""

import pytest
import torch

import swa_fast


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and swa_fast.BUILD_INFO["cuda"]:
        return
    reason = "needs a CUDA GPU and swa_fast built with CUDA kernels"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def devices():
    """The devices the op tests run on: CPU always, CUDA when it can."""
    found = ["cpu"]
    if torch.cuda.is_available() and swa_fast.BUILD_INFO["cuda"]:
        found.append(pytest.param("cuda", marks=pytest.mark.cuda))
    return found
