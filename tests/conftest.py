"""pytest hooks. GPU tests carry @pytest.mark.cuda and skip without a GPU and a CUDA build.
(Shared test code is in helpers.py.)"""

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
